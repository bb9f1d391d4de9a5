"""Evaluate a trained run on a split of its data, or on external data: metrics with CIs and a report.

Internal evaluation uses a split of the data the run was trained on (default: its test split).
External evaluation (``external=DATA``) uses every labelled image of another collection, e.g.
another hospital's films, and puts its metrics next to the internal test metrics with the gap:
the honest estimate of how the model travels. COVID-19 is the positive class throughout.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import Calibration, calibrate, covid_probability
from .checkpoint import run_dir, update_model_meta
from .data import Sample, load_samples
from .errors import DataError
from .inference import predict_logits, readable_images
from .metrics import METRICS, bootstrap_metrics
from .predictor import Predictor
from .report import write_report

__all__ = ["evaluate_run", "calibrate_run", "predict_split", "resolve_data"]

log = logging.getLogger(__name__)


def resolve_data(
    run: str | os.PathLike, meta: dict[str, Any], data: str | None = None, splits: str | None = None,
) -> tuple[str, str | None]:
    """``(data, splits)``: the given data, else the run's training data and split file (from ``meta``)."""
    if data is None:
        cfg = meta.get("train_config", {})
        data = cfg.get("data")
        if not data:
            raise DataError(f"{run}: the checkpoint does not say which data it was trained on; pass --data")
        if splits is None:
            folder = run_dir(run)
            splits = cfg.get("splits") or (str(folder / "splits.csv") if (folder / "splits.csv").is_file() else None)
    return str(data), splits


def predict_split(
    predictor: Predictor, data: str, splits: str | None, split: str, cache_dir: str | None = None,
) -> tuple[list[Sample], np.ndarray, list[tuple[str, str]]]:
    """Logits of every readable image in one split (``all``: every image) at temperature 1.

    Returns:
        ``(samples, logits, failed)``: the readable samples, their logits ``(N, 2)`` (normal,
        COVID-19) and ``(path, reason)`` for each unreadable file (logged, left out).

    Raises:
        DataError: the split holds no image.
    """
    if predictor.model is None:
        raise DataError("evaluation needs the PyTorch model (logits for calibration); load the run with backend='torch'")
    samples = load_samples(data, splits)
    if split != "all":
        samples = [s for s in samples if s.split == split]
    if not samples:
        raise DataError(f"{data}: no images in split {split!r}")
    samples, images, failed = readable_images(samples, predictor.preprocess, cache_dir, desc=f"decoding {split}")
    logits = predict_logits(predictor.model, images, predictor.preprocess, batch_size=64, device=predictor.device)
    return samples, logits, failed


def _internal_reference(
    run: str | os.PathLike, predictor: Predictor, n_boot: int, cache_dir: str | None,
) -> dict[str, Any]:
    """The run's internal test metrics for comparison: its stored report if current, else computed now."""
    stored = run_dir(run) / "eval-test" / "report.json"
    if stored.is_file():
        r = json.loads(stored.read_text())
        # A report written before the last `covidxray calibrate` used another threshold or temperature.
        if r.get("threshold") == predictor.threshold and (r.get("calibration") or {}).get("temperature") == predictor.temperature:
            return {"from": str(stored), "n": r["n"], "n_covid": r["n_covid"], "metrics": r["metrics"]}
    data, splits = resolve_data(run, predictor.meta)
    samples, logits, _ = predict_split(predictor, data, splits, "test", cache_dir)
    boot = bootstrap_metrics([s.label for s in samples], covid_probability(logits, predictor.temperature),
                             predictor.threshold, n_boot=n_boot)
    return {"from": f"computed now on the test split of {data}", "n": boot["n"], "n_covid": boot["n_pos"],
            "metrics": {m: boot[m] for m in METRICS}}


def evaluate_run(
    run: str | os.PathLike, data: str | None = None, splits: str | None = None, split: str = "test",
    out: str | os.PathLike | None = None, n_boot: int = 1000, cache_dir: str | None = None,
    external: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate the model in ``run`` on one split, or on external data, and write the report.

    Args:
        run: run folder or ``model.json``.
        data: folder tree or manifest; default: the data the run was trained on.
        splits: split CSV; default: the run's (when ``data`` is also the default).
        split: ``train``/``val``/``test``, or ``all`` for every image.
        out: report folder; default ``RUN/eval-<split>`` (``RUN/eval-external-<name>`` for external data).
        n_boot: bootstrap resamples for the 95% CIs.
        cache_dir: decoded-image cache.
        external: labelled data from elsewhere (folder tree or manifest); every image is used and
            the report compares it with the run's internal test metrics.

    Returns:
        The report dict (also written as report.json).
    """
    predictor = Predictor(run)
    folder = run_dir(run)
    title = f"covidxray evaluation — {predictor.name} on {split} split"
    if external is not None:
        if data is not None or splits is not None:
            raise DataError("external evaluation uses every image of --external; leave out --data and --splits")
        ext = Path(external)
        name = ext.parent.name if ext.is_file() else ext.name  # a manifest is named by its folder
        data, splits, split = str(external), None, "all"
        out = Path(out) if out else folder / f"eval-external-{name}"
        title = f"covidxray external evaluation — {predictor.name} on {name}"
    else:
        data, splits = resolve_data(run, predictor.meta, data, splits)
    samples, logits, failed = predict_split(predictor, data, splits, split, cache_dir)
    internal = _internal_reference(run, predictor, n_boot, cache_dir) if external is not None else None
    probs = covid_probability(logits, predictor.temperature)
    out = Path(out) if out else folder / f"eval-{split}"
    has_sources = any(s.source for s in samples)
    meta = {
        "model": predictor.name, "checkpoint": str(run), "data": str(data), "splits": splits,
        "split": "external (every image)" if external is not None else split,
        "threshold_source": predictor.meta.get("threshold_rule", "stored in the checkpoint"),
        "unreadable": [{"path": p, "reason": r} for p, r in failed], "out": str(out),
    }
    val_points = {f"sensitivity >= {k} on validation": v for k, v in predictor.meta.get("sensitivity_thresholds", {}).items()}
    return write_report(
        out, [s.label for s in samples], probs, predictor.threshold, sources=[s.source for s in samples] if has_sources else None,
        paths=[s.key for s in samples], meta=meta, n_boot=n_boot, title=title,
        temperature=predictor.temperature, prob_uncalibrated=covid_probability(logits, 1.0),
        named_thresholds=val_points, internal=internal,
    )


def calibrate_run(
    run: str | os.PathLike, data: str | None = None, splits: str | None = None, target_sensitivity: float | None = None,
    threshold: float | None = None, keep_temperature: bool = False, cache_dir: str | None = None,
) -> Calibration:
    """Refit the temperature and threshold of a trained run on its validation split; rewrite ``model.json``.

    The weights are not touched (their SHA-256 stays valid); ``model.json`` is replaced atomically.
    Evaluation reports written before are stale afterwards: evaluate again.

    Args:
        run: run folder or ``model.json``.
        data, splits: the data holding the validation split; default: what the run was trained on.
        target_sensitivity, threshold: threshold rule (see `calibrate`); default Youden's J.
        keep_temperature: keep the stored temperature and only choose the threshold.
        cache_dir: decoded-image cache.

    Returns:
        The new `Calibration`.
    """
    predictor = Predictor(run)
    data, splits = resolve_data(run, predictor.meta, data, splits)
    samples, logits, _ = predict_split(predictor, data, splits, "val", cache_dir)
    cal = calibrate([s.label for s in samples], logits, target_sensitivity, threshold,
                    predictor.temperature if keep_temperature else None)
    update_model_meta(run, cal.to_meta())
    log.info("calibrated %s on %d validation images: T=%.3f, ECE %.4f -> %.4f, threshold %.4f (%s)", run, cal.n,
             cal.temperature, cal.ece_before, cal.ece_after, cal.threshold, cal.threshold_rule)
    return cal
