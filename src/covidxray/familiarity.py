"""Unfamiliarity: how far a film's features lie from what the classifier saw in training.

A film from a hospital, detector or population unlike the training data can be a frontal chest
X-ray (the input gate lets it through) and still be answered badly. `Familiarity` measures the
Mahalanobis distance (Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution
Samples", NeurIPS 2018) of the classifier's pre-logit features to the training films' feature
distribution: a Gaussian whose covariance is kept in its top ``k`` principal directions, plus the
mean squared residual outside them. The distance is reported as **unfamiliarity**: the share of
validation films that lie closer, so 0.5 is a typical film and 0.99 is farther than 99 of 100
validation films. Above `WARN_ABOVE` the answer carries a warning.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .utils import atomic_write_bytes, read_verified

__all__ = ["WARN_ABOVE", "Familiarity", "FILE"]

WARN_ABOVE = 0.99  # unfamiliarity above which an answer is flagged
FILE = "familiarity.safetensors"
WARNING = ("this film is unlike the films the model was trained on (unfamiliarity {u:.3f}: farther from them than "
           "{pct:.0%} of validation films); its answer is less reliable than the reported metrics suggest")


class Familiarity:
    """The training films' feature distribution (mean, top principal directions, residual) and the
    validation films' distances, from which a film's unfamiliarity in [0, 1] is read."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, variances: torch.Tensor, residual: torch.Tensor,
                 reference: torch.Tensor):
        self.mean, self.components, self.variances = mean.double(), components.double(), variances.double()
        self.residual, self.reference = residual.double(), torch.sort(reference.double()).values

    @classmethod
    def fit(cls, train_feats: np.ndarray, val_feats: np.ndarray, k: int = 32) -> "Familiarity":
        """Fit on training features ``(N, D)``; calibrate the scale on validation features ``(M, D)``."""
        x = torch.from_numpy(np.asarray(train_feats, dtype=np.float64))
        mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
        k = min(k, len(s) - 1)
        variances = (s[:k] ** 2 / (len(x) - 1)).clamp_min(1e-12)
        residual = ((s[k:] ** 2).sum() / ((len(x) - 1) * max(1, x.shape[1] - k))).clamp_min(1e-12)
        model = cls(mean, vh[:k].T.contiguous(), variances, residual.reshape(1), torch.zeros(1))
        model.reference = torch.sort(model.distance(val_feats)).values
        return model

    def distance(self, feats: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance per row: within the top directions, plus the residual outside them."""
        z = torch.as_tensor(np.asarray(feats), dtype=torch.float64) - self.mean
        proj = z @ self.components
        rest = (z * z).sum(1) - (proj * proj).sum(1)
        return (proj * proj / self.variances).sum(1) + rest.clamp_min(0) / self.residual

    def __call__(self, feats: np.ndarray | torch.Tensor) -> np.ndarray:
        """Unfamiliarity of each row of ``feats``: the share of validation films that lie closer (0..1)."""
        d = self.distance(feats)
        return (torch.searchsorted(self.reference, d).double() / len(self.reference)).numpy()

    def save(self, folder: str | os.PathLike) -> str:
        """Write ``familiarity.safetensors`` into ``folder`` atomically; returns its SHA-256."""
        blob = st_save({"mean": self.mean, "components": self.components, "variances": self.variances,
                        "residual": self.residual, "reference": self.reference})
        atomic_write_bytes(Path(folder) / FILE, blob)
        return hashlib.sha256(blob).hexdigest()

    @classmethod
    def load(cls, folder: str | os.PathLike, sha256: str) -> "Familiarity":
        t = st_load(read_verified(Path(folder) / FILE, sha256, "the familiarity statistics", "model.json"))
        return cls(t["mean"], t["components"], t["variances"], t["residual"], t["reference"])


def warning(unfamiliarity: float) -> str | None:
    """The sentence attached to an answer whose unfamiliarity is above `WARN_ABOVE`, else None."""
    return WARNING.format(u=unfamiliarity, pct=min(unfamiliarity, 1.0)) if unfamiliarity > WARN_ABOVE else None
