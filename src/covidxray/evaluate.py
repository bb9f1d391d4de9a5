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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from .cache import readable_images
from .calibration import Calibration, calibrate_model, covid_probability
from .checkpoint import resolve_data, run_dir, save_model, update_model_meta
from .batch import expand_inputs
from .data import Sample, load_samples
from .errors import DataError, ImageError
from .familiarity import WARN_ABOVE
from .gate import Verdict
from .imaging import read_image
from .inference import logits_and_features
from .metrics import METRICS, bootstrap_metrics
from .predictor import Predictor
from .report import json_safe, save_predictions_csv, write_report
from .sites import site_threshold

__all__ = ["evaluate_run", "calibrate_run", "calibrate_site", "answered", "answered_probs", "predict_split", "probs_of",
           "rates", "threshold_for", "validation_split", "resolve_data", "screen"]

log = logging.getLogger(__name__)


def predict_split(
    predictor: Predictor, data: str, splits: str | None, split: str, cache_dir: str | None = None,
) -> tuple[list[Sample], np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Logits and features of every readable image in one split (``all``: every image) at temperature 1.

    Returns:
        ``(samples, logits, features, failed)``: the readable samples, their logits ``(N, 2)``
        (normal, COVID-19), their pre-logit features ``(N, D)``, and ``(path, reason)`` for each
        unreadable file (logged, left out).

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
    logits, feats = logits_and_features(predictor.model, predictor.meta["arch"], images, predictor.preprocess, 64,
                                        predictor.device)
    return samples, logits, feats, failed


def screen(predictor: Predictor, samples: Sequence[Sample], batch_size: int = 32) -> list[Verdict | None]:
    """The input gate's verdict on each sample's file (None: answered). Files are decoded again: the
    image cache holds network inputs, and the gate looks at the whole picture and its header."""
    if not predictor.gate:
        return [None] * len(samples)
    out: list[Verdict | None] = []
    with ThreadPoolExecutor(max_workers=2) as pool, tqdm(total=len(samples), desc="input gate", unit="img", leave=False) as bar:
        for start in range(0, len(samples), batch_size):
            decoded = list(pool.map(lambda s: read_image(s.path), samples[start:start + batch_size]))
            out += predictor.verdicts([image for image, _ in decoded], [info for _, info in decoded])
            bar.update(len(decoded))
    return out


def _gate_summary(samples: Sequence[Sample], verdicts: Sequence[Verdict | None]) -> dict[str, Any]:
    refused = [(s, v) for s, v in zip(samples, verdicts) if v is not None]
    return {"answered": len(samples) - len(refused), "not_answered": len(refused),
            "by_reason": dict(Counter(v.reason for _, v in refused)),
            "files": [{"path": s.key, "label": s.label_name, "reason": v.reason} for s, v in refused[:100]]}


def _unfamiliarity_summary(values: np.ndarray, sources: Sequence[str]) -> dict[str, Any]:
    def one(v: np.ndarray) -> dict[str, Any]:
        return {"n": int(len(v)), "median": float(np.median(v)), "p95": float(np.percentile(v, 95)),
                "share_above_warning": float((v > WARN_ABOVE).mean())}

    out = {"warn_above": WARN_ABOVE, "all": one(values)}
    if len(set(sources)) > 1:
        out["by_source"] = {src: one(values[np.asarray(sources) == src]) for src in sorted(set(sources))}
    return out


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
    samples, logits, _, _ = predict_split(predictor, data, splits, "test", cache_dir)
    keep = [v is None for v in screen(predictor, samples)]
    samples, logits = [s for s, k in zip(samples, keep) if k], logits[np.asarray(keep, dtype=bool)]
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
    predictor = Predictor(run, backend="torch")
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
    samples, logits, feats, failed = predict_split(predictor, data, splits, split, cache_dir)
    verdicts = screen(predictor, samples)
    gate = _gate_summary(samples, verdicts)
    # Metrics are for the films that get an answer; the refused ones are counted, by reason.
    keep = np.asarray([v is None for v in verdicts], dtype=bool)
    samples, logits, feats = [s for s, k in zip(samples, keep) if k], logits[keep], feats[keep]
    if not samples:
        raise DataError(f"{data}: the input gate answered none of the {len(verdicts)} images of split {split!r}")
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
    unfamiliar = predictor.familiarity(feats) if predictor.familiarity is not None else None
    val_points = {f"sensitivity >= {k} on validation": v for k, v in predictor.meta.get("sensitivity_thresholds", {}).items()}
    return write_report(
        out, [s.label for s in samples], probs, predictor.threshold, sources=[s.source for s in samples] if has_sources else None,
        paths=[s.key for s in samples], meta=meta, n_boot=n_boot, title=title,
        temperature=predictor.temperature, prob_uncalibrated=covid_probability(logits, 1.0),
        named_thresholds=val_points, internal=internal, gate=gate if predictor.gate else None,
        unfamiliarity=_unfamiliarity_summary(unfamiliar, [s.source for s in samples]) if unfamiliar is not None else None,
    )


def calibrate_run(
    run: str | os.PathLike, data: str | None = None, splits: str | None = None, target_sensitivity: float | None = None,
    threshold: float | None = None, keep_temperature: bool = False, shift: bool = False, cache_dir: str | None = None,
    pooled: bool = False,
) -> Calibration:
    """Refit the temperature and threshold of a trained run on its validation split; rewrite ``model.json``.

    The weights are not touched (their SHA-256 stays valid) unless ``shift``: then a logit shift is fitted
    with the temperature and folded into the classifier's bias, and the weights are rewritten with
    ``model.json`` (graphs exported before no longer match them: export again). Either file is replaced
    atomically. Evaluation reports written before are stale afterwards: evaluate again.

    Args:
        run: run folder or ``model.json``.
        data, splits: the data holding the validation split; default: what the run was trained on.
        target_sensitivity, threshold, pooled: threshold rule (see `calibrate`); default Youden's J.
        keep_temperature: keep the stored temperature and only choose the threshold (no shift).
        shift: also fit a logit shift (Platt scaling), kept in the weights.
        cache_dir: decoded-image cache.

    Returns:
        The new `Calibration`.
    """
    predictor = Predictor(run, backend="torch")
    data, splits = resolve_data(run, predictor.meta, data, splits)
    samples, logits, _, _ = predict_split(predictor, data, splits, "val", cache_dir)
    relogit = lambda: predict_split(predictor, data, splits, "val", cache_dir)[1]  # noqa: E731 - the model as it is now
    cal, logits = calibrate_model(predictor.model, predictor.meta["arch"], [s.label for s in samples], logits, relogit,
                                  shift and not keep_temperature, target_sensitivity=target_sensitivity, pooled=pooled,
                                  threshold=threshold, temperature=predictor.temperature if keep_temperature else None,
                                  sources=[s.source for s in samples])
    if cal.shift:  # save_model records the new weights' hash in place of the old
        save_model(run_dir(run), predictor.model.cpu(), {**predictor.meta, **cal.to_meta()})
    else:
        update_model_meta(run, cal.to_meta())
    if (run_dir(run) / "val_predictions.csv").is_file():  # training's record of what the threshold was chosen on
        save_predictions_csv(run_dir(run) / "val_predictions.csv", [s.key for s in samples], [s.label for s in samples],
                             covid_probability(logits, cal.temperature), cal.threshold, sources=[s.source for s in samples])
    log.info("calibrated %s on %d validation images: T=%.3f, logit shift %.3f, ECE %.4f -> %.4f, threshold %.4f (%s)",
             run, cal.n, cal.temperature, cal.shift, cal.ece_before, cal.ece_after, cal.threshold, cal.threshold_rule)
    return cal


def calibrate_site(
    run: str | os.PathLike, site_normals: str | os.PathLike, target_specificity: float = 0.95, cache_dir: str | None = None,
) -> dict[str, Any]:
    """Move the model's own threshold so that one site's normal films reach ``target_specificity`` (rewrites ``model.json``).

    Kept for ``covidxray calibrate --site-normals``; `onboard_site` is the path that leaves the
    model untouched and serves several sites. The threshold rule is the same (`site_threshold`);
    what it costs is measured on the run's validation split.

    Returns:
        ``{"threshold_before", "threshold", "site": {...}, "validation_before": {...}, "validation_after": {...}}``.
    """
    predictor = Predictor(run, backend="torch")
    probs, site = answered_probs(predictor, site_normals)
    threshold = threshold_for(probs, target_specificity, site_normals)
    y, p = validation_split(run, predictor, cache_dir)
    out = {
        "threshold_before": predictor.threshold, "threshold": threshold, "target_specificity": target_specificity,
        "site": {**site, "specificity_before": float((probs < predictor.threshold).mean()),
                 "specificity_after": float((probs < threshold).mean())},
        "validation_before": rates(y, p, predictor.threshold), "validation_after": rates(y, p, threshold),
    }
    rule = (f"site calibration: specificity >= {target_specificity:g} on {len(probs)} normal films of {site_normals} "
            f"(was {predictor.threshold:.4f}: {predictor.meta.get('threshold_rule', '')})")
    update_model_meta(run, {"threshold": threshold, "threshold_rule": rule, "site_calibration": json_safe(out)})
    log.info("site calibration of %s: threshold %.4f -> %.4f", run, predictor.threshold, threshold)
    return out


def answered_probs(predictor: Predictor, films: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """P(COVID-19) of every film in ``films`` that gets an answer, and the counts (`answered`)."""
    results, counts = answered(predictor, films)
    return probs_of(results), counts


def answered(predictor: Predictor, films: str | os.PathLike) -> tuple[list, dict[str, Any]]:
    """The answers (`Prediction`) of every film in ``films`` (a folder, searched recursively, or a manifest) that gets
    one, and the counts: files, answered, not answered (the input gate), unreadable."""
    files = expand_inputs([str(films)]) if Path(films).is_dir() else [s.path for s in load_samples(films)]
    results = [r for r in predictor.predict_paths(files) if not isinstance(r, ImageError)]
    kept = [r for r in results if r.answered]
    return kept, {"folder": str(films), "files": len(files), "answered": len(kept),
                  "not_answered": len(results) - len(kept), "unreadable": len(files) - len(results)}


def probs_of(results: list) -> np.ndarray:
    """The P(COVID-19) of answers (`covidxray.answer.Prediction`)."""
    return np.array([r.probability for r in results], dtype=float)


def threshold_for(probs: np.ndarray, target_specificity: float, films: str | os.PathLike, floor: float | None = None) -> float:
    """`site_threshold`, its error naming ``films``."""
    try:
        return site_threshold(probs, target_specificity, floor)
    except DataError as e:
        raise DataError(f"{films}: {e}") from None


def validation_split(run: str | os.PathLike, predictor: Predictor, cache_dir: str | None) -> tuple[list[int], np.ndarray]:
    """Labels and P(COVID-19) of the run's validation split (the films that chose its own threshold)."""
    data, splits = resolve_data(run, predictor.meta)
    samples, logits, _, _ = predict_split(predictor, data, splits, "val", cache_dir)
    return [s.label for s in samples], covid_probability(logits, predictor.temperature)


def rates(y: Sequence[int], p: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity and specificity (95 % bootstrap CIs) at ``threshold``; a rate the labels leave undefined is left out."""
    boot = bootstrap_metrics(y, p, threshold, n_boot=1000)
    return {k: boot[k] for k in ("sensitivity", "specificity") if not np.isnan(boot[k]["value"])}
