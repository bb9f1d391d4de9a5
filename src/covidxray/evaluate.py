"""Evaluate a trained run on a split of its data (or other data): metrics with CIs and a report."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from .data import load_samples
from .errors import DataError
from .predictor import Predictor

__all__ = ["evaluate_run"]

log = logging.getLogger(__name__)


def evaluate_run(
    run: str | os.PathLike, data: str | None = None, splits: str | None = None, split: str = "test",
    out: str | os.PathLike | None = None, n_boot: int = 1000, cache_dir: str | None = None,
) -> dict[str, Any]:
    """Evaluate the model in ``run`` on one split and write the report.

    Args:
        run: run folder or ``model.json``.
        data: folder tree or manifest; default: the data the run was trained on.
        splits: split CSV; default: the run's (when ``data`` is also the default).
        split: ``train``/``val``/``test``, or ``all`` for every image.
        out: report folder; default ``RUN/eval-<split>``.
        n_boot: bootstrap resamples for the 95% CIs.

    Returns:
        The report dict (also written as report.json).
    """
    from .engine import prepare_images
    from .report import write_report

    predictor = Predictor(run)
    cfg = predictor.meta.get("train_config", {})
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    if data is None:
        data = cfg.get("data")
        if not data:
            raise DataError(f"{run}: the checkpoint does not say which data it was trained on; pass --data")
        if splits is None:
            splits = cfg.get("splits") or (str(run_dir / "splits.csv") if (run_dir / "splits.csv").is_file() else None)
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
    samples = [samples[i] for i in keep]
    probs = predictor.predict_prepared(images[torch.tensor(keep, dtype=torch.long)])
    out = Path(out) if out else run_dir / f"eval-{split}"
    has_sources = any(s.source for s in samples)
    meta = {
        "model": predictor.name, "checkpoint": str(run), "data": str(data), "splits": splits, "split": split,
        "threshold_source": predictor.meta.get("threshold_rule", "stored in the checkpoint"),
        "unreadable": [{"path": p, "reason": r} for p, r in failed], "out": str(out),
    }
    return write_report(
        out, [s.label for s in samples], probs, predictor.threshold, sources=[s.source for s in samples] if has_sources else None,
        paths=[s.key for s in samples], meta=meta, n_boot=n_boot,
        title=f"covidxray evaluation — {predictor.name} on {split} split",
    )
