"""Evaluation report: metrics with 95% CIs, per-source breakdown and plots, as JSON and Markdown.

Every file is written atomically, so an interrupted evaluation never leaves a half-written
report. COVID-19 (``covid``, label 1) is the positive class in every number and plot.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from sklearn.metrics import precision_recall_curve, roc_curve

from . import POSITIVE_CLASS
from .metrics import COUNTS, METRICS, bootstrap_metrics, operating_points
from .utils import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["write_report", "save_predictions_csv"]

logger = logging.getLogger(__name__)

POSITIVE_LABEL = f"{POSITIVE_CLASS} (COVID-19)"
PER_SOURCE_BOOT = 200  # per-source CIs are a guide; fewer resamples keep many sources quick
_DPI = 120
_NAMES = {
    "accuracy": "Accuracy", "sensitivity": "Sensitivity (COVID-19 recall)", "specificity": "Specificity",
    "ppv": "PPV (COVID-19 precision)", "npv": "NPV", "f1": "F1 (COVID-19)",
    "roc_auc": "ROC AUC", "pr_auc": "PR AUC (average precision)",
}


def _json_safe(obj: Any) -> Any:
    """NumPy values to Python, NaN/inf to None (JSON has no NaN), paths to strings."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def _summary(boot: dict[str, Any]) -> dict[str, Any]:
    return {"n": boot["n"], "n_covid": boot["n_pos"], "n_normal": boot["n"] - boot["n_pos"],
            "metrics": {m: boot[m] for m in METRICS}, "confusion": {k: boot[k] for k in COUNTS}}


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    return buf.getvalue()


def _confusion_png(conf: dict[str, int], threshold: float) -> bytes:
    cells = np.array([[conf["tn"], conf["fp"]], [conf["fn"], conf["tp"]]])
    fig = Figure(figsize=(4.4, 3.8))
    ax = fig.add_subplot()
    ax.imshow(cells, cmap="Blues")
    ticks = ["normal", "COVID-19\n(positive)"]
    ax.set_xticks([0, 1], ticks)
    ax.set_yticks([0, 1], ticks)
    ax.set(xlabel="Predicted", ylabel="True", title=f"Confusion matrix, threshold {threshold:.3f}")
    for (i, j), count in np.ndenumerate(cells):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=14,
                color="white" if count > cells.max() / 2 else "black")
    return _png(fig)


def _curve_axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(4.8, 4.4))
    ax = fig.add_subplot()
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title=title, xlabel=xlabel, ylabel=ylabel)
    return fig, ax


def _values(report: dict[str, Any]) -> dict[str, float]:
    return {k: np.nan if v["value"] is None else v["value"] for k, v in report["metrics"].items()}


def _roc_png(y: np.ndarray, p: np.ndarray, report: dict[str, Any]) -> bytes:
    fig, ax = _curve_axes("ROC, positive class COVID-19", "1 - specificity (false-positive rate)",
                          "Sensitivity (COVID-19 true-positive rate)")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    if np.unique(y).size == 2:  # undefined with one class; the chance line alone says so
        m = _values(report)
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"ROC (AUC = {m['roc_auc']:.3f})")
        ax.plot(1 - m["specificity"], m["sensitivity"], "o", color="C3", label=f"threshold {report['threshold']:.3f}")
    ax.legend(loc="lower right")
    return _png(fig)


def _pr_png(y: np.ndarray, p: np.ndarray, report: dict[str, Any]) -> bytes:
    fig, ax = _curve_axes("Precision-recall, positive class COVID-19", "Sensitivity (COVID-19 recall)",
                          "PPV (COVID-19 precision)")
    ax.axhline(y.mean(), ls=":", color="grey", label=f"prevalence {y.mean():.3f}")
    if np.unique(y).size == 2:
        m = _values(report)
        precision, recall, _ = precision_recall_curve(y, p)
        ax.plot(recall, precision, drawstyle="steps-post", label=f"PR (AP = {m['pr_auc']:.3f})")
        ax.plot(m["sensitivity"], m["ppv"], "o", color="C3", label=f"threshold {report['threshold']:.3f}")
    ax.legend(loc="lower left")
    return _png(fig)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _with_ci(m: dict[str, float | None]) -> str:
    return "n/a" if m["value"] is None else f"{m['value']:.3f} ({_fmt(m['ci_low'])} – {_fmt(m['ci_high'])})"


def _markdown(report: dict[str, Any], title: str, has_predictions: bool) -> str:
    meta = report["meta"] or {}
    m, c = report["metrics"], report["confusion"]
    # meta["threshold_source"] is a free-text rule, e.g. "Youden's J on the validation split (412 images)".
    source = f" ({meta['threshold_source']})" if "threshold_source" in meta else " chosen on the validation set"
    lines = [
        f"# {title}", "",
        f"Positive class: COVID-19 (`{POSITIVE_CLASS}`). Threshold {report['threshold']:.3f}{source}.", "",
        f"{report['n']} cases: {report['n_covid']} COVID-19, {report['n_normal']} normal. 95% CIs: percentile "
        f"bootstrap over cases, {report['n_boot']} resamples. n/a = undefined (e.g. an AUC with one class).", "",
        *[f"- {k}: {v}" for k, v in meta.items() if k != "threshold_source" and isinstance(v, (str, int, float))],
        "", "## Metrics", "", "| Metric | Value | 95% CI |", "|---|---:|---|",
        *[f"| {_NAMES[k]} | {_fmt(v['value'])} | {_fmt(v['ci_low'])} – {_fmt(v['ci_high'])} |" for k, v in m.items()],
        "", "## Confusion matrix", "", "| | Predicted normal | Predicted COVID-19 |", "|---|---:|---:|",
        f"| True normal | {c['tn']} (TN) | {c['fp']} (FP) |", f"| True COVID-19 | {c['fn']} (FN) | {c['tp']} (TP) |",
        "", "![Confusion matrix](confusion_matrix.png)", "",
    ]
    if report.get("per_source"):
        cols = ("sensitivity", "specificity", "roc_auc")
        lines += ["## Per source", "", f"Value (95% CI, {report['per_source_n_boot']} resamples).", "",
                  "| Source | n | COVID-19 | normal | " + " | ".join(_NAMES[k] for k in cols) + " |",
                  "|---|---:|---:|---:|" + "---|" * len(cols)]
        for name, s in report["per_source"].items():
            cells = " | ".join(_with_ci(s["metrics"][k]) for k in cols)
            lines.append(f"| {name} | {s['n']} | {s['n_covid']} | {s['n_normal']} | {cells} |")
        lines.append("")
    lines += ["## Operating points", "", "| Threshold | Sensitivity | Specificity | PPV | NPV |", "|---:|---:|---:|---:|---:|",
              *[f"| {o['threshold']:.2f} | {_fmt(o['sensitivity'])} | {_fmt(o['specificity'])} | {_fmt(o['ppv'])} "
                f"| {_fmt(o['npv'])} |" for o in report["operating_points"]],
              "", "## Curves", "", "![ROC curve](roc.png)", "", "![Precision-recall curve](pr.png)", ""]
    if has_predictions:
        lines += ["Per-case predictions: [predictions.csv](predictions.csv)", ""]
    return "\n".join(lines)


def save_predictions_csv(
    path: str | os.PathLike, paths: Sequence[Any], y_true: ArrayLike, prob: ArrayLike, threshold: float,
    sources: Sequence[str] | None = None,
) -> None:
    """Write one ``path,label,source,probability,pred`` row per case, atomically.

    ``label`` and ``pred`` are 0 (normal) or 1 (COVID-19); ``pred`` is ``probability >= threshold``.
    """
    y, p = np.asarray(y_true).ravel(), np.asarray(prob, dtype=float).ravel()
    sources = [""] * len(paths) if sources is None else sources
    if not len(paths) == len(y) == len(p) == len(sources):
        raise ValueError(f"paths, y_true, prob, sources differ in length: {len(paths)}, {len(y)}, {len(p)}, {len(sources)}")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "source", "probability", "pred"])
    writer.writerows([os.fspath(f) if isinstance(f, os.PathLike) else str(f), int(t), str(s), f"{q:.6f}", int(q >= threshold)]
                     for f, t, s, q in zip(paths, y, sources, p))
    atomic_write_text(path, buf.getvalue())


def write_report(
    out_dir: str | os.PathLike, y_true: ArrayLike, prob: ArrayLike, threshold: float, *,
    sources: Sequence[str] | None = None, paths: Sequence[Any] | None = None, meta: dict | None = None,
    n_boot: int = 1000, title: str = "Evaluation",
) -> dict[str, Any]:
    """Write report.json, report.md, confusion_matrix.png, roc.png, pr.png (and predictions.csv).

    Args:
        out_dir: folder to write into; created if missing.
        y_true: test labels, 1 = COVID-19, 0 = normal.
        prob: predicted P(COVID-19) per case.
        threshold: decision threshold, chosen beforehand on validation data.
        sources: per-case source dataset name; adds a per-source breakdown.
        paths: per-case image path; adds predictions.csv.
        meta: JSON-able facts about the run (model, checkpoint, data); ``"threshold_source"``
            says in the Markdown where the threshold came from.
        n_boot: bootstrap resamples for the overall CIs.
        title: heading of report.md.

    Returns:
        The dict written to report.json (undefined metrics are ``None``).
    """
    out = Path(out_dir)
    overall = bootstrap_metrics(y_true, prob, threshold, n_boot=n_boot)  # also validates the inputs
    y, p = np.asarray(y_true).ravel().astype(int), np.asarray(prob, dtype=float).ravel()
    report: dict[str, Any] = {
        "positive_class": POSITIVE_LABEL, "threshold": float(threshold), "n_boot": n_boot, **_summary(overall)
    }
    if sources is not None:
        src = np.asarray([str(s) for s in sources])
        if src.size != y.size:
            raise ValueError(f"sources has {src.size} entries for {y.size} cases")
        report["per_source_n_boot"] = min(n_boot, PER_SOURCE_BOOT)
        report["per_source"] = {}
        for name in sorted(set(src)):
            boot = bootstrap_metrics(y[src == name], p[src == name], threshold, n_boot=report["per_source_n_boot"])
            report["per_source"][name] = _summary(boot)
    report["operating_points"] = operating_points(y, p)
    report["meta"] = meta
    report = _json_safe(report)

    atomic_write_bytes(out / "confusion_matrix.png", _confusion_png(report["confusion"], threshold))
    atomic_write_bytes(out / "roc.png", _roc_png(y, p, report))
    atomic_write_bytes(out / "pr.png", _pr_png(y, p, report))
    if paths is not None:
        save_predictions_csv(out / "predictions.csv", paths, y, p, threshold, sources)
    atomic_write_text(out / "report.md", _markdown(report, title, paths is not None))
    atomic_write_json(out / "report.json", report)  # last: its presence marks a complete report
    logger.info("wrote evaluation report to %s (sensitivity %s, specificity %s, ROC AUC %s)", out,
                *(_fmt(report["metrics"][k]["value"]) for k in ("sensitivity", "specificity", "roc_auc")))
    return report
