"""Model-call helpers shared by training, evaluation, the audit and the `Predictor`.

* `predict_logits` / `predict_probs` run a model over prepared images in eval mode.
* `autocast` is the one precision switch: bf16 on GPU, a no-op on CPU.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from torch import nn

from .models import get_spec
from .presets import Preprocess

__all__ = ["autocast", "predict_logits", "predict_probs", "logits_and_features"]


def autocast(device: torch.device):
    """bf16 autocast on GPU; a no-op on CPU, where bf16 convolutions are slower than fp32 here."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, pre: Preprocess, batch_size: int = 128, device: torch.device | None = None,
) -> np.ndarray:
    """float32 logits ``(N, 2)`` for prepared uint8 images ``(N, S, S)``, in eval mode (the model's mode is restored)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = pre.to_tensor(images[start:start + batch_size]).to(device).contiguous(memory_format=torch.channels_last)
            with autocast(device):
                out.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 2), dtype=np.float32)


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
    """Logits ``(N, 2)`` and pre-logit features ``(N, D)`` from one pass (the head's input, captured by a hook)."""
    head = model.get_submodule(get_spec(arch).head)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].float().flatten(1).cpu()))
    try:
        logits = predict_logits(model, images, pre, batch_size, device)
    finally:
        handle.remove()
    return logits, torch.cat(captured).numpy() if captured else np.zeros((0, 0), dtype=np.float32)

