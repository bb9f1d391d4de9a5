"""A consistency term: the COVID-19 score should not move when the same film is made sharper or softer.

Acquisition augmentation shows the network sharpened and blurred films of both classes, yet a model
trained with it still reads sharpness as COVID-19 (`bench/pipeline_probe.py`: sharpening Shenzhen's
normals takes their specificity from 0.54 to 0.22), because augmenting both classes alike shifts both
distributions and leaves the cue where it was. Here every training film gets a twin, the same prepared
image blurred or unsharp-masked, and the loss pays for any difference between the two logit margins
(logit[COVID-19] - logit[normal]): invariance asked for directly, not hoped for.

    loss = F.cross_entropy(logits, y) + twin_loss(model, x, logits, pre, g, weight=0.3)

Training only: the saved model is the plain classifier, and a weight of 0 (the default) draws nothing.

`mixed_styles` asks for the same at the level of features (MixStyle; Zhou et al., ICLR 2021): inside the block,
the early stages' outputs of a training batch swap part of their per-channel mean and standard deviation (a
film's contrast and texture, which differ by hospital) with another film of the batch, drawn at random from
either class, so that those statistics stop telling the classes apart. Inference never sees it.

    with mixed_styles(model, get_spec(arch).style, p=0.5):
        logits = model(x)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DataError
from .inference import autocast
from .presets import Preprocess

__all__ = ["acquisition_twin", "twin_loss", "mix_style", "mixed_styles"]

_ALPHA = 0.1  # Beta(alpha, alpha) mixing weights: mostly near 0 or 1, a style nearly swapped

_RADIUS = 5  # kernel half-width: 3 sigma of the widest blur (1.5 px) and then some


def acquisition_twin(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``x`` ``(N, 1, H, W)`` in [0, 1], each film Gaussian-blurred or unsharp-masked (as often), sigma 0.5-1.5 px."""
    n = x.shape[0]
    sigma = 0.5 + torch.rand(n, generator=g)
    sharpen = (torch.rand(n, generator=g) < 0.5).view(n, 1, 1, 1).to(x.device)
    t = torch.arange(-_RADIUS, _RADIUS + 1, dtype=torch.float32)
    k = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).to(x.device, x.dtype)
    films = x.transpose(0, 1)  # (1, N, H, W): one group per film, each with its own kernel
    smooth = F.conv2d(F.pad(films, (_RADIUS, _RADIUS, 0, 0), mode="replicate"), k[:, None, None, :], groups=n)
    smooth = F.conv2d(F.pad(smooth, (0, 0, _RADIUS, _RADIUS), mode="replicate"), k[:, None, :, None], groups=n)
    smooth = smooth.transpose(0, 1)
    return torch.where(sharpen, (2 * x - smooth).clamp(0, 1), smooth)


def twin_loss(model: nn.Module, x: torch.Tensor, logits: torch.Tensor, pre: Preprocess, g: torch.Generator,
              weight: float) -> torch.Tensor:
    """``weight`` x the mean squared change of the logit margin from the network input ``x`` (normalised, as trained)
    to its `acquisition_twin`; ``logits`` are the model's on ``x``. Gradients reach the model through both."""
    films = (x.float() * pre.std + pre.mean).clamp(0, 1)
    twin = ((acquisition_twin(films, g) - pre.mean) / pre.std).contiguous(memory_format=torch.channels_last)
    with autocast(x.device):
        other = model(twin)
    margin = lambda z: z[:, 1].float() - z[:, 0].float()  # noqa: E731 - local shorthand
    return weight * F.mse_loss(margin(other), margin(logits))


def mix_style(x: torch.Tensor, alpha: float = _ALPHA) -> torch.Tensor:
    """``x`` ``(N, C, H, W)`` with each film's per-channel mean and standard deviation mixed with a random other film's,
    by a weight drawn from Beta(alpha, alpha) (torch's global generator: seeded per epoch in training)."""
    n = x.shape[0]
    mu = x.mean((2, 3), keepdim=True).detach()
    sigma = (x.var((2, 3), keepdim=True) + 1e-6).sqrt().detach()
    lam = torch.distributions.Beta(alpha, alpha).sample((n, 1, 1, 1)).to(x.device, x.dtype)
    other = torch.randperm(n).to(x.device)
    return (x - mu) / sigma * (lam * sigma + (1 - lam) * sigma[other]) + lam * mu + (1 - lam) * mu[other]


@contextmanager
def mixed_styles(model: nn.Module, layers: Sequence[str], p: float) -> Iterator[None]:
    """Forward passes inside the block mix the styles of ``layers``' outputs (`mix_style`), each layer with
    probability ``p`` per batch; ``p`` 0 leaves the model untouched.

    Raises:
        DataError: ``p`` is set and the architecture declares no ``layers`` (`covidxray.models.ModelSpec.style`).
    """
    if p and not layers:
        raise DataError("--mixstyle needs an architecture that declares its early stages (ModelSpec.style): "
                        "tf_efficientnet_lite0/1/2")
    if not p:
        yield
        return

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return mix_style(out) if out.shape[0] > 1 and torch.rand(()) < p else out

    handles = [model.get_submodule(name).register_forward_hook(hook) for name in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
