"""Model-call helpers shared by training, evaluation, the audit and the `Predictor`.

* `classifier_forward` is how a classifier is called (device, channels-last, precision, features).
* `predict_logits` / `predict_probs` / `logits_and_features` run it over prepared images in eval mode.
* `autocast` is the one precision switch: bf16 on GPU, a no-op on CPU.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch
from torch import nn

from .models import forward_with_features
from .presets import Preprocess

__all__ = ["autocast", "classifier_forward", "predict_logits", "predict_probs", "logits_and_features"]


def autocast(device: torch.device):
    """bf16 autocast on GPU; a no-op on CPU, where bf16 convolutions are slower than fp32 here."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def classifier_forward(
    model: nn.Module, device: torch.device, arch: str | None = None,
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The classifier's forward as every caller runs it: input on ``device``, channels-last, under `autocast`.

    The returned function maps a normalised batch ``image`` ``(N, 1, S, S)`` to ``(logits,)``, or
    with ``arch`` to ``(logits, features)`` (`covidxray.models.forward_with_features`). It leaves
    the model's mode and gradients alone: the `Predictor` runs it in a `TorchRunner`, training and
    evaluation through `predict_logits` / `logits_and_features`.
    """
    def forward(image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = image.to(device).contiguous(memory_format=torch.channels_last)
        with autocast(device):
            return forward_with_features(model, x, arch) if arch else (model(x),)

    return forward


@torch.no_grad()
def _run(
    model: nn.Module, images: torch.Tensor, pre: Preprocess, batch_size: int, device: torch.device | None, arch: str | None,
) -> list[np.ndarray] | None:
    """`classifier_forward` over prepared uint8 images in batches, in eval mode (the model's mode is restored)."""
    forward = classifier_forward(model, device or next(model.parameters()).device, arch)
    was_training = model.training
    model.eval()
    out: list[tuple[torch.Tensor, ...]] = []
    try:
        for start in range(0, len(images), batch_size):
            out.append(tuple(t.float().cpu() for t in forward(pre.to_tensor(images[start:start + batch_size]))))
    finally:
        model.train(was_training)
    return [torch.cat(parts).numpy() for parts in zip(*out)] if out else None


def predict_logits(
    model: nn.Module, images: torch.Tensor, pre: Preprocess, batch_size: int = 128, device: torch.device | None = None,
) -> np.ndarray:
    """float32 logits ``(N, 2)`` for prepared uint8 images ``(N, S, S)``, in eval mode (the model's mode is restored)."""
    out = _run(model, images, pre, batch_size, device, None)
    return out[0] if out else np.zeros((0, 2), dtype=np.float32)


def predict_probs(
    model: nn.Module, images: torch.Tensor, pre: Preprocess, batch_size: int = 128, temperature: float = 1.0,
    device: torch.device | None = None,
) -> np.ndarray:
    """P(covid) for prepared uint8 images ``(N, S, S)`` after temperature scaling (see `predict_logits`)."""
    logits = torch.from_numpy(predict_logits(model, images, pre, batch_size, device))
    return torch.softmax(logits / temperature, dim=1)[:, 1].numpy()


def logits_and_features(
    model: nn.Module, arch: str, images: torch.Tensor, pre: Preprocess, batch_size: int = 128,
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N, 2)`` and pre-logit features ``(N, D)`` from one pass (the head's input; see `predict_logits`)."""
    out = _run(model, images, pre, batch_size, device, arch)
    return (out[0], out[1]) if out else (np.zeros((0, 2), dtype=np.float32), np.zeros((0, 0), dtype=np.float32))
