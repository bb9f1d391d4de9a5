"""The fit of a classifier's last layer on its features, apart from the network: NumPy in, a `LinearHead` out.

`fit_head` is the fit (`covidxray.head.refit_run` applies it to a run); `HeadFeatures` are the features it was
fitted on, kept beside the weights; `site_head` refits it with a site's own normal films added, for
``covidxray site add NAME --normals DIR --refit-head`` (`covidxray.onboarding.onboard_site`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from .errors import DataError
from .models import get_spec
from .utils import atomic_write_bytes, read_verified

__all__ = ["C_GRID", "FEATURES_FILE", "SITE_WEIGHT", "HeadFeatures", "LinearHead", "Refit", "fit_head", "model_head",
           "site_head"]

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)  # inverse L2 strength on the features; validation picks one
FEATURES_FILE = "head-features.safetensors"
# Each of a site's normal films weighs this many training films in its head (60 of them then count about a fifth of
# the 5,200 training films): `bench/site_head.py` measured it.
SITE_WEIGHT = 20.0


@dataclass(frozen=True)
class LinearHead:
    """A logit of COVID-19 linear in the features: ``feats @ weight + bias``."""

    weight: np.ndarray  # (D,)
    bias: float

    def margin(self, feats: np.ndarray) -> np.ndarray:
        """The logit of COVID-19 against normal, ``(N,)``."""
        return np.asarray(feats, np.float64) @ self.weight + self.bias

    def two_class(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The head as the network's two-logit layer (normal, COVID-19): their difference is `margin`."""
        w = torch.from_numpy(self.weight).float()
        return torch.stack([-w / 2, w / 2]), torch.tensor([-self.bias / 2, self.bias / 2], dtype=torch.float32)


@dataclass
class Refit:
    """The chosen head and what chose it."""

    c: float  # the chosen inverse regularisation strength
    head: LinearHead
    val_auc: dict[float, float] = field(default_factory=dict)  # each candidate's validation ROC-AUC
    candidates: dict[float, LinearHead] = field(default_factory=dict)


def fit_head(train_feats: np.ndarray, train_y: np.ndarray, val_feats: np.ndarray, val_y: np.ndarray,
             grid: tuple[float, ...] = C_GRID, sample_weight: np.ndarray | None = None) -> Refit:
    """A logistic regression on the training features (centred) for each C of ``grid``; the one with the best
    validation ROC-AUC (ties: the stronger regularisation). ``*_y``: 1 = COVID-19, 0 = normal; both classes needed.
    ``sample_weight``: each training film's weight (default 1)."""
    x, y, vy = np.asarray(train_feats, np.float64), np.asarray(train_y).astype(int), np.asarray(val_y).astype(int)
    for name, labels in (("training", y), ("validation", vy)):
        if np.unique(labels).size < 2:
            raise DataError(f"refitting the head needs COVID-19 and normal films in the {name} split; it has one class")
    mu = x.mean(0)  # centred for the solver's sake; the intercept takes the mean back
    out = Refit(c=grid[0], head=LinearHead(np.zeros(x.shape[1]), 0.0))
    for c in grid:  # lbfgs on a convex loss: the same answer on every machine, up to its tolerance
        lr = LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(x - mu, y, sample_weight=sample_weight)
        coef = lr.coef_[0]
        head = LinearHead(coef, float(lr.intercept_[0] - (mu * coef).sum()))
        out.candidates[c], out.val_auc[c] = head, float(roc_auc_score(vy, head.margin(val_feats)))
    out.c = max(grid, key=lambda c: (round(out.val_auc[c], 4), -c))
    out.head = out.candidates[out.c]
    return out


@dataclass(frozen=True)
class HeadFeatures:
    """The features a head was fitted on (train) and chosen on (val), with their labels (1 = COVID-19)."""

    train: np.ndarray
    train_y: np.ndarray
    val: np.ndarray
    val_y: np.ndarray

    def save(self, folder: str | os.PathLike) -> str:
        """Write `FEATURES_FILE` into ``folder`` atomically (features as float16); returns its SHA-256."""
        blob = st_save({"train": self.train.astype(np.float16), "train_y": np.asarray(self.train_y, np.uint8),
                        "val": self.val.astype(np.float16), "val_y": np.asarray(self.val_y, np.uint8)})
        atomic_write_bytes(Path(folder) / FEATURES_FILE, blob)
        return hashlib.sha256(blob).hexdigest()

    @classmethod
    def load(cls, folder: str | os.PathLike, meta: dict) -> "HeadFeatures":
        """The features a model's refitted head kept; `DataError` saying how to get them when it kept none."""
        sha = meta.get("head_refit", {}).get("features_sha256")
        if not sha:
            raise DataError(f"{folder}: this model keeps no head features (its head was not refitted by this version); "
                            f"run `covidxray refit-head RUN` first, or onboard the site without --refit-head")
        t = st_load(read_verified(Path(folder) / FEATURES_FILE, sha, "the head's training features", "model.json"))
        return cls(t["train"].astype(np.float64), t["train_y"].astype(np.int64), t["val"].astype(np.float64),
                   t["val_y"].astype(np.int64))


def site_head(kept: HeadFeatures, site_normals: np.ndarray, c: float, temperature: float, threshold: float,
              sensitivity: float, weight: float = SITE_WEIGHT) -> LinearHead:
    """The head refitted with a site's normal films (``site_normals``, their features) added to the training films,
    each weighing ``weight`` of them (`fit_head` at the model's ``c``), as a logit of the site's P(COVID-19): it
    reaches the model's ``threshold`` where ``sensitivity`` of the validation COVID-19 films stay at or above it (the
    model's own rule), and it is scaled by the model's ``temperature``. No film of the site sets the threshold."""
    x = np.concatenate([kept.train, np.asarray(site_normals, np.float64)])
    y = np.r_[kept.train_y, np.zeros(len(site_normals))]
    w = np.r_[np.ones(len(kept.train)), np.full(len(site_normals), weight)]
    head = fit_head(x, y, kept.val, kept.val_y, grid=(c,), sample_weight=w).head
    cut = float(np.quantile(head.margin(kept.val[kept.val_y == 1]), 1 - sensitivity, method="lower"))
    shift = float(np.log(threshold / (1 - threshold)))
    return LinearHead(head.weight / temperature, (head.bias - cut) / temperature + shift)


def model_head(model: torch.nn.Module, arch: str) -> LinearHead:
    """The network's own classifier layer (`covidxray.models.ModelSpec.head`) as a `LinearHead` (its logit margin)."""
    layer = model.get_submodule(get_spec(arch).head)
    weight, bias = layer.weight.detach().double().cpu().numpy(), layer.bias.detach().double().cpu().numpy()
    return LinearHead(weight[1] - weight[0], float(bias[1] - bias[0]))
