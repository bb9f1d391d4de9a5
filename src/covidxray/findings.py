"""A second task in training: another finding versus normal, learnt only within origins that give both.

The shared data confound the label with the origin (the normals come from one hospital, the COVID-19 films from
others), so the COVID-19 head can learn the hospital. An origin with normal films *and* another disease (JSRT:
nodules; Shenzhen and Montgomery: tuberculosis) holds a contrast the hospital cannot explain: same detectors, only the
lungs differ. With ``--finding-task W`` the films of such origins leave the COVID-19 question (its loss, its
validation, temperature and threshold) and train a linear head instead, another finding versus normal, on the same
pooled features, weighted ``W``: the backbone is asked to see findings, where the origin cannot help. The head exists
only in training, like the origin adversary (`covidxray.adversary`): the saved classifier is unchanged.

    task = build_finding_task(model, arch, finding_targets(train_samples), weight=0.3, seed=0, device=device)
    with pooled_features(model, head_name, "the finding task") as feats:
        logits = model(x)
    loss = covid_loss + task.loss(feats[-1], targets_of_batch)
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .data import Sample
from .models import get_spec

__all__ = ["FindingTask", "build_finding_task", "finding_sources", "finding_targets"]

log = logging.getLogger(__name__)


def finding_sources(samples: Sequence[Sample]) -> set[str]:
    """The sources of ``samples`` that give both normal films and films labelled ``other``."""
    normal = {s.source for s in samples if s.label == 0 and not s.other}
    return normal & {s.source for s in samples if s.other}


def finding_targets(samples: Sequence[Sample], sources: set[str] | None = None) -> torch.Tensor:
    """Per film: 1 another finding, 0 normal (films of ``sources``, by default `finding_sources`), -1 every other
    film (the COVID-19 task's)."""
    sources = finding_sources(samples) if sources is None else sources
    return torch.tensor([int(s.other) if s.source in sources else -1 for s in samples])


class FindingTask(nn.Module):
    """A linear head from the pooled features to "another finding" (a logit), and its weighted loss.

    Args:
        width: the pooled features' width (the classifier head's input).
        weight: the loss's weight in the training loss.
        seed: seeds the head's initialisation with a generator of its own (the global stream is untouched).
    """

    def __init__(self, width: int, weight: float, seed: int) -> None:
        super().__init__()
        self.weight = weight
        self.head = nn.utils.skip_init(nn.Linear, width, 1)  # nn.Linear's own init would draw from the global stream
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(seed * 7919 + 29))
            self.head.bias.zero_()
        self._sums = torch.zeros(3, dtype=torch.float64)  # BCE sum, correct, counted films
        if distributed.get_env().enabled:
            for p in self.head.parameters():  # the head sits outside DDP: average its gradients here
                p.register_hook(distributed.average_gradient)

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``weight`` x the mean binary cross-entropy over the films with a target (0 or 1); films of -1 weigh 0.

        The head runs on every film, so it always has a gradient (zero when the batch holds no film of the task)."""
        logits = self.head(features.flatten(1).float()).squeeze(1)
        counted = targets >= 0
        bce = F.binary_cross_entropy_with_logits(logits, targets.clamp(min=0).float(), reduction="none")
        right = (logits.detach() > 0) == (targets == 1)
        self._sums += torch.tensor([float(bce.detach()[counted].sum()), float(right[counted].sum()), float(counted.sum())],
                                   dtype=torch.float64)
        return self.weight * (bce * counted).sum() / counted.sum().clamp(min=1)

    def epoch_stats(self) -> dict[str, float]:
        """This epoch's mean cross-entropy and accuracy of the finding head over its films (summed over ranks); resets."""
        bce, correct, n = distributed.all_reduce_sum(self._sums.tolist())
        self._sums.zero_()
        stats = {"finding_loss": bce / max(n, 1.0), "finding_acc": correct / max(n, 1.0)}
        if distributed.get_env().is_main:
            log.info("finding task: loss %.4f, another finding told from normal %.3f of the time", *stats.values())
        return stats


def build_finding_task(model: nn.Module, arch: str, targets: torch.Tensor, weight: float, seed: int,
                       device: torch.device) -> FindingTask | None:
    """The `FindingTask` of a run (on ``device``); None when ``weight`` is 0 (nothing built, no random number drawn)."""
    if not weight:
        return None
    width = model.get_submodule(get_spec(arch).head).in_features
    log.info("finding task (weight %g): %d films (%d with another finding) leave the COVID-19 question", weight,
             int((targets >= 0).sum()), int((targets == 1).sum()))
    return FindingTask(width, weight, seed).to(device)
