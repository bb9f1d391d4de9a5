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
import torch

from .data import Sample, load_samples
from .errors import DataError
from .predictor import Predictor

__all__ = ["evaluate_run", "predict_split", "resolve_data"]

log = logging.getLogger(__name__)


def _run_dir(run: str | os.PathLike) -> Path:
    return Path(run) if Path(run).is_dir() else Path(run).parent


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
            run_dir = _run_dir(run)
            splits = cfg.get("splits") or (str(run_dir / "splits.csv") if (run_dir / "splits.csv").is_file() else None)
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
    from .engine import predict_logits, prepare_images

    if predictor.model is None:
        raise DataError("evaluation needs the PyTorch model (logits for calibration); load the run with backend='torch'")
    samples = load_samples(data, splits)
    if split != "all":
        samples = [s for s in samples if s.split == split]
    if not samples:
        raise DataError(f"{data}: no images in split {split!r}")
    images, failed = prepare_images(samples, predictor.preprocess, cache_dir, desc=f"decoding {split}")
    for path, reason in failed:
        log.warning("skipping unreadable image %s: %s", path, reason)
    bad = {p for p, _ in failed}
    keep = [i for i, s in enumerate(samples) if str(s.path) not in bad]
    logits = predict_logits(predictor.model, images[torch.tensor(keep, dtype=torch.long)], predictor.preprocess,
                            batch_size=64, device=predictor.device)
    return [samples[i] for i in keep], logits, failed


def _internal_reference(
    run: str | os.PathLike, predictor: Predictor, n_boot: int, cache_dir: str | None,
) -> dict[str, Any]:
    """The run's internal test metrics for comparison: its stored report if current, else computed now."""
    from .calibration import covid_probability
    from .metrics import METRICS, bootstrap_metrics

    stored = _run_dir(run) / "eval-test" / "report.json"
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
    from .calibration import covid_probability
    from .report import write_report

    predictor = Predictor(run)
    run_dir = _run_dir(run)
    title = f"covidxray evaluation — {predictor.name} on {split} split"
    if external is not None:
        if data is not None or splits is not None:
            raise DataError("external evaluation uses every image of --external; leave out --data and --splits")
        ext = Path(external)
        name = ext.parent.name if ext.is_file() else ext.name  # a manifest is named by its folder
        data, splits, split = str(external), None, "all"
        out = Path(out) if out else run_dir / f"eval-external-{name}"
        title = f"covidxray external evaluation — {predictor.name} on {name}"
    else:
        data, splits = resolve_data(run, predictor.meta, data, splits)
    samples, logits, failed = predict_split(predictor, data, splits, split, cache_dir)
    internal = _internal_reference(run, predictor, n_boot, cache_dir) if external is not None else None
    probs = covid_probability(logits, predictor.temperature)
    out = Path(out) if out else run_dir / f"eval-{split}"
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
