"""Onboarding a site: its own operating point (and, asked, its own head), set on its normal films, and what it costs.

`onboard_site` is what ``covidxray site add NAME --normals DIR [--refit-head]`` runs; the profile it returns is kept
by `covidxray.sites.SiteRegistry` and applied per film by `covidxray.predictor.Predictor.at_site`.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np

from .checkpoint import default_model_path
from .errors import DataError
from .evaluate import answered, probs_of, rates, threshold_for, validation_split
from .headfit import SITE_WEIGHT, HeadFeatures, model_head, site_head
from .predictor import Predictor
from .report import json_safe
from .sites import MIN_NORMALS, SiteProfile, check_target

__all__ = ["onboard_site"]


def onboard_site(
    name: str, normals: str | os.PathLike, covid: str | os.PathLike | None = None, target_specificity: float = 0.95,
    model: str | os.PathLike | None = None, institutions: Sequence[str] = (), stations: Sequence[str] = (),
    ae_titles: Sequence[str] = (), allow_lower: bool = False, validation: bool = True, cache_dir: str | None = None,
    refit_head: bool = False,
) -> SiteProfile:
    """Onboard a site: its own operating point, set on its normal films, and what that costs; the model stays as it is.

    The films in ``normals`` (a folder, searched recursively, or a manifest; all taken as normal)
    go through the input gate and the model as served (``backend='auto'``); the site's threshold is
    the lowest at which at least ``target_specificity`` of the answered ones are called normal, and
    not below the model's own unless ``allow_lower`` (`site_threshold`). The cost is measured at the
    model's threshold and at the site's: specificity on the site's normals, sensitivity on its
    COVID-19 films (``covid``, optional), and sensitivity and specificity on the model's validation
    split (when its data is at hand and ``validation``), with 95 % CIs.

    With ``refit_head`` the site also gets a head of its own (`covidxray.headfit.site_head`: the model's head refitted
    with the site's normals added to the training films it keeps, float features), and the threshold rule applies to
    that head's probabilities; the cost then adds the specificity on each fifth of the site's normals under a head
    fitted without it (held out), and the validation numbers come from the kept features (no data needed).

    Returns:
        The `SiteProfile` (not yet saved: see `covidxray.sites.SiteRegistry.save`).

    Raises:
        DataError: fewer than 20 answered normal films, a bad name or target, an unreadable folder; with
            ``refit_head``, a model that keeps no head features.
    """
    check_target(target_specificity)  # before minutes of scoring, not after
    predictor = Predictor(model, backend="torch" if refit_head else "auto")
    kept = HeadFeatures.load(predictor.folder, predictor.meta) if refit_head else None  # before the scoring too
    results, counts = answered(predictor, normals)
    before, floor = predictor.threshold, None if allow_lower else predictor.threshold
    model_probs = probs_of(results)
    threshold = threshold_for(model_probs, target_specificity, normals, floor)  # too few films: said before any fit
    site = _SiteHead(predictor, kept, results, target_specificity, floor) if kept is not None else None
    score = site.probs if site is not None else probs_of
    probs = site.probs(results) if site is not None else model_probs
    if site is not None:  # the rule again, on the site head's probabilities
        threshold = threshold_for(probs, target_specificity, normals, floor)
    rule = (f"lowest threshold calling >= {target_specificity:g} of {len(probs)} answered normal films of the site "
            f"normal{'' if allow_lower else f', not below the model threshold {before:.4f}'}" + (site.rule if site else ""))
    zeros = [0] * len(probs)
    cost: dict[str, Any] = {"site_normals": {**counts, "specificity_before": rates(zeros, model_probs, before)["specificity"],
                                             "specificity_after": rates(zeros, probs, threshold)["specificity"]}}
    if site is not None and (held := site.held_out(normals)) is not None:
        cost["site_normals"]["specificity_held_out"] = rates([0] * len(held), held, 0.5)["specificity"]
    if covid is not None:
        cresults, ccounts = answered(predictor, covid)
        if not cresults:
            raise DataError(f"{covid}: no COVID-19 film here got an answer ({ccounts['files']} files)")
        ones = [1] * len(cresults)
        cost["site_covid"] = {**ccounts, "sensitivity_before": rates(ones, probs_of(cresults), before)["sensitivity"],
                              "sensitivity_after": rates(ones, score(cresults), threshold)["sensitivity"]}
    cost["validation"] = {"skipped": "not asked for (--no-validation)"}
    if validation:
        try:
            y, p, p_after = site.validation() if site is not None else _validation_probs(model, predictor, cache_dir)
            cost["validation"] = {"films": len(y), "covid": int(sum(y)), "before": rates(y, p, before),
                                  "after": rates(y, p_after, threshold)}
        except DataError as e:  # a hospital rarely has the training data: the site's own numbers still stand
            cost["validation"] = {"skipped": str(e)}
    return SiteProfile(
        name=name, threshold=threshold, target_specificity=target_specificity, rule=rule,
        weights_sha256=predictor.meta["weights_sha256"], model=predictor.name, default_threshold=before,
        institutions=tuple(institutions), stations=tuple(stations), ae_titles=tuple(ae_titles), cost=json_safe(cost),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), head=site.to_json() if site else None,
    )


def _validation_probs(model, predictor: Predictor, cache_dir: str | None) -> tuple[list[int], np.ndarray, np.ndarray]:
    torch_predictor = predictor if predictor.model is not None else Predictor(model, backend="torch")
    y, p = validation_split(model or default_model_path(), torch_predictor, cache_dir)
    return y, p, p


class _SiteHead:
    """A site's own head (`site_head`) for `onboard_site`: fitted on the answered normal films' features."""

    FOLDS = 5  # the held-out specificity: each fifth of the site's normals under a head fitted on the other four

    def __init__(self, predictor: Predictor, kept: HeadFeatures, results: list, target: float, floor: float | None):
        refit = predictor.meta["head_refit"]
        self.kept, self.target, self.floor, self.predictor = kept, target, floor, predictor
        self.feats = np.stack([r.features for r in results]) if results else np.zeros((0, kept.train.shape[1]))
        self.args = (float(refit["c"]), predictor.temperature, predictor.threshold, float(refit.get("val_sensitivity", 0.9)))
        self.head = site_head(kept, self.feats, *self.args)
        self.rule = (f"; under the site's own head (refitted with these {len(self.feats)} films, each weighing "
                     f"{SITE_WEIGHT:g} training films, C={self.args[0]:g}), which reaches {self.args[2]:.4f} where "
                     f"{self.args[3]:.3f} of the validation COVID-19 films stay at or above it")

    def probs(self, results: list) -> np.ndarray:
        return _sigmoid(self.head.margin(np.stack([r.features for r in results])))

    def held_out(self, films) -> np.ndarray | None:
        """Each fold's P(COVID-19) minus its threshold plus 0.5 (so that 0.5 decides), under a head without it; None
        when the other folds hold too few films to set a threshold (`MIN_NORMALS`)."""
        if len(self.feats) - -(-len(self.feats) // self.FOLDS) < MIN_NORMALS:
            return None
        order = np.random.default_rng(0).permutation(len(self.feats))
        out = []
        for fold in np.array_split(order, self.FOLDS):
            rest = np.setdiff1d(order, fold)
            head = site_head(self.kept, self.feats[rest], *self.args)
            t = threshold_for(_sigmoid(head.margin(self.feats[rest])), self.target, films, self.floor)
            out.append(_sigmoid(head.margin(self.feats[fold])) - t + 0.5)
        return np.concatenate(out)

    def validation(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The kept validation films: labels, P(COVID-19) under the model's head and under the site's."""
        model = model_head(self.predictor.model, self.predictor.meta["arch"])
        return self.kept.val_y, _sigmoid(model.margin(self.kept.val) / self.predictor.temperature), _sigmoid(
            self.head.margin(self.kept.val))

    def to_json(self) -> dict[str, Any]:
        return {"weight": self.head.weight.tolist(), "bias": self.head.bias, "c": self.args[0], "site_films": len(self.feats),
                "site_weight": SITE_WEIGHT, "val_sensitivity": self.args[3]}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))
