"""A class-conditional domain-adversarial head on the film's origin (DANN: Ganin & Lempitsky, 2015).

The classifier should read the lungs, not the hospital. Origin and label are confounded here (the
COVID-19 films come from many hospitals, the normals from few), so an adversary that predicts the
origin from the pooled features would also remove the label. Instead there is one small linear
head per class label that predicts the source *among the training films of that label*: what it can
still tell apart is origin information beyond the label. Its gradient reaches the classifier through
a gradient-reversal layer, so the classifier is pushed to make the origins of each class
indistinguishable, while the heads themselves learn to tell them apart.

The heads exist only in training: they are not part of the saved classifier (``model.safetensors``,
ONNX, ``model.json``), only of the resumable state (``last.safetensors``) and the optimiser.

    adversary = OriginAdversary(model, arch, labels, sources, weight=0.3, seed=0)
    with adversary.watch(model):
        logits = model(x)
    loss = F.cross_entropy(logits, y) + adversary.loss(y, sources_of_batch, progress)
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .models import get_spec

__all__ = ["OriginAdversary", "build_adversary", "pooled_features", "reverse_gradient", "reversal_strength"]

log = logging.getLogger(__name__)


class _Reverse(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``-strength``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, strength: float) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.strength * grad, None


@contextmanager
def pooled_features(model: nn.Module, head_name: str, who: str) -> Iterator[list[torch.Tensor]]:
    """A list that collects the pooled features (the input of ``head_name``) of the forward passes inside the block."""
    features: list[torch.Tensor] = []
    handle = distributed.unwrap(model).get_submodule(head_name).register_forward_pre_hook(
        lambda module, args: features.append(args[0]))
    try:
        yield features
    finally:
        handle.remove()
    if not features:
        raise RuntimeError(f"{who} saw no features at {head_name!r} (a compiled model hides its hooks: train without "
                           "--compile)")


def reverse_gradient(x: torch.Tensor, strength: float) -> torch.Tensor:
    """``x`` unchanged; the gradient flowing back through it is flipped in sign and scaled by ``strength``."""
    return _Reverse.apply(x, strength)


def reversal_strength(progress: float) -> float:
    """DANN's ramp ``2 / (1 + exp(-10 p)) - 1`` over training progress ``p`` in [0, 1]: 0 at the start, ~1 at the end."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


class OriginAdversary(nn.Module):
    """Per class label with two or more training sources, a linear head from the pooled features to those sources.

    Args:
        model: the (unwrapped) classifier whose head's input are the pooled features.
        arch: its registry name (`covidxray.models.ModelSpec.head` names the head).
        labels: the training films' labels.
        sources: the training films' source indices (same order).
        weight: the adversary loss's weight in the training loss.
        seed: seeds the heads' initialisation with a generator of their own (the global stream is untouched).
    """

    def __init__(self, model: nn.Module, arch: str, labels: torch.Tensor, sources: torch.Tensor, weight: float,
                 seed: int) -> None:
        super().__init__()
        self.head_name, self.weight = get_spec(arch).head, weight
        width = model.get_submodule(self.head_name).in_features
        # target[label, source]: the source's index among that label's training sources, -1 when it has none
        self.target = torch.full((int(labels.max()) + 1, int(sources.max()) + 1), -1, dtype=torch.long)
        g = torch.Generator().manual_seed(seed * 7919 + 17)
        self.heads = nn.ModuleDict()
        for label in range(self.target.shape[0]):
            own = torch.unique(sources[labels == label])
            if len(own) < 2:
                continue  # one source: nothing beyond the label to hide
            self.target[label, own] = torch.arange(len(own))
            head = nn.utils.skip_init(nn.Linear, width, len(own))  # nn.Linear's own init would draw from the global stream
            with torch.no_grad():
                head.weight.normal_(0.0, 0.01, generator=g)
                head.bias.zero_()
            self.heads[str(label)] = head
        self._features: list[torch.Tensor] = []
        self._strength = 0.0
        self._sums = torch.zeros(3, dtype=torch.float64)  # CE sum, correct, counted films
        self._counts = torch.zeros_like(self.target, dtype=torch.float64)  # counted films per (label, source)
        if distributed.get_env().enabled:
            for p in self.heads.parameters():  # the heads sit outside DDP: average their gradients here
                p.register_hook(distributed.average_gradient)

    @contextmanager
    def watch(self, model: nn.Module) -> Iterator[None]:
        """Capture the pooled features (the classifier head's input) of the forward passes inside the block."""
        with pooled_features(model, self.head_name, "the origin adversary") as self._features:
            yield

    def loss(self, labels: torch.Tensor, sources: torch.Tensor, progress: float) -> torch.Tensor:
        """``weight`` x the mean, over labels with two or more sources in the batch, of the heads' cross-entropy.

        Uses the features of the last `watch` block; the reversal strength follows `reversal_strength(progress)`.
        Every head runs on every batch (films of other labels weighted 0), so every head always has a gradient.
        """
        self._strength = reversal_strength(progress)
        feats = reverse_gradient(self._features[-1].flatten(1).float(), self._strength)
        target = self.target.to(labels.device)[labels, sources]
        total, used = feats.sum() * 0, 0
        for key, head in self.heads.items():
            mine = labels == int(key)
            counted = mine & (torch.unique(target[mine]).numel() >= 2)
            logits = head(feats)
            ce = F.cross_entropy(logits, torch.where(mine, target, 0).clamp(min=0), reduction="none")  # others: weight 0
            total = total + (ce * counted).sum() / counted.sum().clamp(min=1)
            if counted.any():
                used += 1
                self._record(logits[counted].detach(), target[counted], ce[counted].detach(), int(key), sources[counted])
        return self.weight * total / max(1, used)

    def _record(self, logits: torch.Tensor, target: torch.Tensor, ce: torch.Tensor, label: int,
                sources: torch.Tensor) -> None:
        self._sums[0] += float(ce.sum())
        self._sums[1] += float((logits.argmax(1) == target).sum())
        self._sums[2] += len(target)
        self._counts[label] += torch.bincount(sources.cpu(), minlength=self._counts.shape[1]).double()

    def epoch_stats(self) -> dict[str, float]:
        """This epoch's mean adversary cross-entropy per counted film, the heads' accuracy in naming the origin,
        the accuracy of always naming each label's most frequent origin (chance), and the final reversal strength;
        summed over ranks under DDP. Resets the tallies."""
        ce, correct, n, *counts = distributed.all_reduce_sum([*self._sums.tolist(), *self._counts.flatten().tolist()])
        majority = float(torch.tensor(counts).reshape(self._counts.shape).max(1).values.sum())
        self._sums.zero_()
        self._counts.zero_()
        n = max(n, 1.0)
        stats = {"adv_loss": ce / n, "adv_origin_acc": correct / n, "adv_origin_chance": majority / n,
                 "adv_strength": self._strength}
        if distributed.get_env().is_main:
            log.info("origin adversary: loss %.4f, origin named %.3f of the time (chance %.3f), reversal strength %.3f",
                     *stats.values())
        return stats


def build_adversary(model: nn.Module, arch: str, labels: torch.Tensor, sources: torch.Tensor, weight: float,
                    seed: int, device: torch.device) -> OriginAdversary | None:
    """The `OriginAdversary` of a run (on ``device``) with weight ``weight``; None when it is 0 or no label has two sources.

    With weight 0 nothing is built and no random number is drawn, so training is exactly what it was without one.
    """
    if not weight:
        return None
    adversary = OriginAdversary(model, arch, labels, sources, weight, seed)
    if not adversary.heads:
        log.warning("origin adversary off: no label of the training films comes from two or more sources")
        return None
    log.info("origin adversary (weight %g) on %s", weight, ", ".join(
        f"label {k}: {h.out_features} sources" for k, h in adversary.heads.items()))
    return adversary.to(device)
