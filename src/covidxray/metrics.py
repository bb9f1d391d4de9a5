"""Metrics for COVID-19 detection, with percentile-bootstrap 95% confidence intervals.

COVID-19 (label 1, ``covid``) is the positive class: sensitivity is the share of COVID-19
cases flagged, PPV the share of flags that are COVID-19, specificity and NPV the same for
normal cases. Values come from scikit-learn. A metric whose denominator is empty (sensitivity
on a set with no COVID-19 case, an AUC on a set with one class) is ``nan``, never a
misleading 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from .errors import DataError

__all__ = [
    "METRICS", "COUNTS", "DEFAULT_THRESHOLDS",
    "point_metrics", "bootstrap_metrics", "choose_threshold", "operating_points", "format_ci",
]

METRICS = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc", "pr_auc")
DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
COUNTS = ("tp", "fp", "tn", "fn")  # confusion-matrix cells, COVID-19 positive
_CHUNK_CELLS = 2_000_000  # resamples x cases per vectorised chunk: bounds memory at ~100 MB


def _check(y_true: ArrayLike, prob: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y_true).ravel(), np.asarray(prob, dtype=float).ravel()
    if y.size == 0 or y.shape != p.shape:
        raise ValueError(f"y_true and prob must be non-empty and equally long, got {y.size} and {p.size}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must hold only 0 (normal) and 1 (COVID-19)")
    if not np.isfinite(p).all():
        raise ValueError("prob holds NaN or infinite values; check the model's output")
    return y.astype(int), p


def _threshold_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    undefined = {"zero_division": np.nan, "labels": [0, 1]}
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "sensitivity": float(recall_score(y, pred, pos_label=1, **undefined)),
        "specificity": float(recall_score(y, pred, pos_label=0, **undefined)),
        "ppv": float(precision_score(y, pred, pos_label=1, **undefined)),
        "npv": float(precision_score(y, pred, pos_label=0, **undefined)),
        "f1": float(f1_score(y, pred, pos_label=1, **undefined)),
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
    }


def point_metrics(y_true: ArrayLike, prob: ArrayLike, threshold: float) -> dict[str, float | int]:
    """Every metric in `METRICS` plus the counts ``tp, fp, tn, fn`` (ints) at one threshold.

    Args:
        y_true: labels, 1 = COVID-19, 0 = normal.
        prob: predicted P(COVID-19) per case.
        threshold: a case is called COVID-19 when ``prob >= threshold``.

    Returns:
        ``{metric: value}``; undefined values (empty denominator, AUC with one class) are nan.
    """
    y, p = _check(y_true, prob)
    out = _threshold_metrics(y, p, threshold)
    both = np.unique(y).size == 2
    out["roc_auc"] = float(roc_auc_score(y, p)) if both else float("nan")
    out["pr_auc"] = float(average_precision_score(y, p)) if both else float("nan")
    return out


def _ratio(num: np.ndarray, den: np.ndarray, empty: float = np.nan) -> np.ndarray:
    return np.divide(num, den, out=np.full(np.shape(num), empty), where=den > 0)


def _resample_metrics(y: np.ndarray, p: np.ndarray, threshold: float, weights: np.ndarray) -> dict[str, np.ndarray]:
    """`METRICS` for each row of ``weights`` (how often each case is drawn in a resample).

    Calling scikit-learn per resample takes ~15 s for 1000 resamples of 1000 cases, so this
    computes the same quantities for all resamples at once: counts are matrix products and
    both AUCs follow from one sort of the scores. tests/test_metrics.py checks every value
    against `point_metrics` on the materialised resamples.
    """
    pos, pred = y == 1, p >= threshold
    tp, fn = weights @ (pos & pred), weights @ (pos & ~pred)
    fp, tn = weights @ (~pos & pred), weights @ (~pos & ~pred)
    out = {
        "accuracy": (tp + tn) / weights.sum(axis=1),
        "sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }
    # Per resample, weighted COVID-19 / normal counts at each distinct score, scores ascending.
    order = np.argsort(p, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(p[order]) > 0])
    w = weights[:, order]
    n_pos = np.add.reduceat(w * pos[order], starts, axis=1)
    n_neg = np.add.reduceat(w * ~pos[order], starts, axis=1)
    total_pos, total_neg = n_pos.sum(axis=1), n_neg.sum(axis=1)
    # Mann-Whitney: a COVID-19 case beats every normal case scored lower and half the tied ones.
    beaten = n_pos * (np.cumsum(n_neg, axis=1) - 0.5 * n_neg)
    out["roc_auc"] = _ratio(beaten.sum(axis=1), total_pos * total_neg)
    # Average precision as scikit-learn defines it: sum over thresholds, high to low, of
    # (recall gained) x (precision there). Scores no resampled case has gain no recall, so the
    # value standing in for their undefined precision never counts.
    tp_cum = np.cumsum(n_pos[:, ::-1], axis=1)
    precision = _ratio(tp_cum, tp_cum + np.cumsum(n_neg[:, ::-1], axis=1), empty=0.0)
    ap = _ratio((n_pos[:, ::-1] * precision).sum(axis=1), total_pos)
    out["pr_auc"] = np.where(total_neg > 0, ap, np.nan)  # AUCs need both classes
    return out


def bootstrap_metrics(
    y_true: ArrayLike, prob: ArrayLike, threshold: float, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, Any]:
    """Point values with percentile-bootstrap confidence intervals, resampling cases.

    Args:
        y_true: labels, 1 = COVID-19, 0 = normal.
        prob: predicted P(COVID-19) per case.
        threshold: a case is called COVID-19 when ``prob >= threshold``.
        n_boot: number of resamples.
        seed: seed of the resampling; the same seed gives the same intervals.
        alpha: the interval covers ``1 - alpha`` (0.05 gives a 95% CI).

    Returns:
        ``{metric: {"value", "ci_low", "ci_high"}}`` for each of `METRICS`, plus the counts
        ``tp, fp, tn, fn``, ``n`` (cases) and ``n_pos`` (COVID-19 cases). Resamples where a
        metric is undefined (e.g. an AUC on a resample with one class) are left out of its CI.
    """
    y, p = _check(y_true, prob)
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    point = point_metrics(y, p, threshold)
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // y.size)
    samples: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        idx = rng.integers(0, y.size, size=(rows, y.size)) + y.size * np.arange(rows)[:, None]
        weights = np.bincount(idx.ravel(), minlength=rows * y.size).reshape(rows, y.size).astype(float)
        for name, values in _resample_metrics(y, p, threshold, weights).items():
            samples[name].append(values)
    out: dict[str, Any] = {}
    for name in METRICS:
        values = np.concatenate(samples[name])
        values = values[~np.isnan(values)]
        low, high = np.percentile(values, [50 * alpha, 100 - 50 * alpha]) if values.size else (np.nan, np.nan)
        out[name] = {"value": point[name], "ci_low": float(low), "ci_high": float(high)}
    out.update({k: point[k] for k in COUNTS}, n=int(y.size), n_pos=int(y.sum()))
    return out


def choose_threshold(y_true: ArrayLike, prob: ArrayLike, target_sensitivity: float | None = None) -> float:
    """Pick the decision threshold on validation data (never on the test set).

    Args:
        y_true: validation labels, 1 = COVID-19, 0 = normal; both classes must be present.
        prob: predicted P(COVID-19) per validation case.
        target_sensitivity: if given, the highest threshold whose sensitivity reaches it
            (screening use: miss few COVID-19 cases); otherwise the threshold maximising
            Youden's J = sensitivity + specificity - 1.

    Returns:
        The threshold, a finite value in [0, 1].
    """
    y, p = _check(y_true, prob)
    if np.unique(y).size < 2:
        raise DataError("choosing a threshold needs COVID-19 and normal cases in the validation set; it has one class")
    if target_sensitivity is not None and not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")
    # Keep every threshold: the default drops collinear points, which can skip the one we want.
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    # Thresholds fall along the curve, so argmax (first hit) is the highest qualifying one.
    best = np.argmax(tpr - fpr) if target_sensitivity is None else np.argmax(tpr >= target_sensitivity)
    # roc_curve starts at +inf ("flag nothing"); keep the result a usable probability.
    return float(np.clip(thresholds[best], 0.0, 1.0))


def operating_points(
    y_true: ArrayLike, prob: ArrayLike, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
) -> list[dict[str, float]]:
    """Sensitivity, specificity, PPV and NPV (COVID-19 positive) at each threshold.

    Returns:
        One ``{"threshold", "sensitivity", "specificity", "ppv", "npv"}`` dict per threshold.
    """
    y, p = _check(y_true, prob)
    keys = ("sensitivity", "specificity", "ppv", "npv")
    points = []
    for t in thresholds:
        m = _threshold_metrics(y, p, t)
        points.append({"threshold": float(t), **{k: m[k] for k in keys}})
    return points


def format_ci(m: dict[str, Any] | None, digits: int = 3) -> str:
    """``"0.950 (0.930–0.960)"`` for a ``{"value", "ci_low", "ci_high"}`` metric; ``"n/a"`` when undefined.

    A metric without an interval (``ci_low`` None, e.g. a point value) prints as the value alone.
    """
    if not m or m.get("value") is None:
        return "n/a"
    if m.get("ci_low") is None or m.get("ci_high") is None:
        return f"{m['value']:.{digits}f}"
    return f"{m['value']:.{digits}f} ({m['ci_low']:.{digits}f}–{m['ci_high']:.{digits}f})"

