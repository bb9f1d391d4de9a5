"""A consistency term: the COVID-19 score should not move when the same film is made sharper or softer.

Acquisition augmentation shows the network sharpened and blurred films of both classes, yet a model
trained with it still reads sharpness as COVID-19 (`bench/pipeline_probe.py`: sharpening Shenzhen's
normals takes their specificity from 0.54 to 0.22), because augmenting both classes alike shifts both
distributions and leaves the cue where it was. Here every training film gets a twin, the same prepared
image blurred or unsharp-masked, and the loss pays for any difference between the two logit margins
(logit[COVID-19] - logit[normal]): invariance asked for directly, not hoped for.

    loss = F.cross_entropy(logits, y) + twin_loss(model, x, logits, pre, g, weight=0.3)

Training only: the saved model is the plain classifier, and a weight of 0 (the default) draws nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .inference import autocast
from .presets import Preprocess

__all__ = ["acquisition_twin", "twin_loss"]

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
