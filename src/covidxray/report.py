"""Evaluation report: metrics with 95% CIs, per-source breakdown, calibration and plots, as JSON and Markdown.

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
from sklearn.metrics import brier_score_loss, precision_recall_curve, roc_curve

from . import POSITIVE_CLASS
from .calibration import reliability
from .metrics import COUNTS, METRICS, bootstrap_metrics, format_ci, operating_points
from .utils import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["write_report", "save_predictions_csv", "json_safe", "write_history"]

logger = logging.getLogger(__name__)

POSITIVE_LABEL = f"{POSITIVE_CLASS} (COVID-19)"
PER_SOURCE_BOOT = 200  # per-source CIs are a guide; fewer resamples keep many sources quick
_DPI = 120
_NAMES = {
    "accuracy": "Accuracy", "sensitivity": "Sensitivity (COVID-19 recall)", "specificity": "Specificity",
    "ppv": "PPV (COVID-19 precision)", "npv": "NPV", "f1": "F1 (COVID-19)",
    "roc_auc": "ROC AUC", "pr_auc": "PR AUC (average precision)",
}


def json_safe(obj: Any) -> Any:
    """NumPy values to Python, NaN/inf to None (JSON has no NaN), paths to strings, recursively."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in obj]
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


def _reliability_png(cal: dict[str, Any]) -> bytes:
    fig = Figure(figsize=(4.8, 5.6))
    ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    before = cal.get("uncalibrated")
    if before:
        ax.plot(before["bins"]["mean_probability"], before["bins"]["fraction_covid"], "s--", color="C7", alpha=0.8,
                label=f"temperature 1 (ECE {before['ece']:.3f})")
    ax.plot(cal["bins"]["mean_probability"], cal["bins"]["fraction_covid"], "o-", color="C0",
            label=f"temperature {cal['temperature']:.3f} (ECE {cal['ece']:.3f})")
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), ylabel="Observed share of COVID-19",
           title=f"Reliability of P(COVID-19), {cal['bins']['n_bins']} equal-width bins")
    ax.legend(loc="upper left", fontsize=8)
    width = 1.0 / cal["bins"]["n_bins"]
    hist.bar(cal["bins"]["mean_probability"], cal["bins"]["count"], width=0.9 * width, color="C0")
    hist.set(yscale="log", xlabel="Predicted P(COVID-19)", ylabel="cases")
    return _png(fig)


def _calibration(y: np.ndarray, p: np.ndarray, temperature: float | None, raw: ArrayLike | None) -> dict[str, Any]:
    """ECE, Brier score and reliability bins of P(COVID-19); with ``raw`` also those before temperature scaling."""
    def one(q: np.ndarray) -> dict[str, Any]:
        bins = reliability(y, q)
        return {"ece": bins.pop("ece"), "brier": float(brier_score_loss(y, q, pos_label=1)), "bins": bins}

    cal = {"temperature": 1.0 if temperature is None else float(temperature), **one(p)}
    if raw is not None:
        raw = np.asarray(raw, dtype=float).ravel()
        if raw.shape != p.shape:
            raise ValueError(f"prob_uncalibrated has {raw.size} entries for {p.size} cases")
        cal["uncalibrated"] = one(raw)
    return cal


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.3f}"


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
            cells = " | ".join(format_ci(s["metrics"][k]) for k in cols)
            lines.append(f"| {name} | {s['n']} | {s['n_covid']} | {s['n_normal']} | {cells} |")
        lines.append("")
    if report.get("internal"):
        ref = report["internal"]
        lines += ["## External vs internal", "",
                  f"Internal: the run's own test split ({ref['n']} images, {ref['n_covid']} COVID-19; {ref['from']}). "
                  "Gap = external - internal; a large drop means the model learned something about its training "
                  "sources that other hospitals' films do not share.", "",
                  "| Metric | Internal (test) | External | Gap |", "|---|---|---|---:|",
                  *[f"| {_NAMES[k]} | {format_ci(ref['metrics'][k])} | {format_ci(m[k])} | {_signed(report['gap'][k])} |"
                    for k in METRICS], ""]
    lines += _gate_lines(report)
    cal = report["calibration"]
    before = cal.get("uncalibrated")
    lines += ["## Calibration", "",
              f"Temperature {cal['temperature']:.3f} (logits are divided by it before the softmax; fitted on the "
              f"validation split). Expected calibration error (ECE) of P(COVID-19), {cal['bins']['n_bins']} "
              "equal-width bins, on these cases:", "",
              "| | ECE | Brier score |", "|---|---:|---:|",
              *([f"| before temperature scaling (T = 1) | {before['ece']:.4f} | {before['brier']:.4f} |"] if before else []),
              f"| as used (T = {cal['temperature']:.3f}) | {cal['ece']:.4f} | {cal['brier']:.4f} |", "",
              "![Reliability diagram](reliability.png)", ""]
    lines += ["## Operating points", "",
              "Named thresholds first: the stored operating threshold, 0.5, and the highest thresholds that reached "
              "each sensitivity on the validation split; then a fixed grid.", "",
              "| Threshold from | Threshold | Sensitivity | Specificity | PPV | NPV |", "|---|---:|---:|---:|---:|---:|",
              *[f"| {o.get('name', 'grid')} | {o['threshold']:.3f} | {_fmt(o['sensitivity'])} | {_fmt(o['specificity'])} "
                f"| {_fmt(o['ppv'])} | {_fmt(o['npv'])} |" for o in report["key_operating_points"] + report["operating_points"]],
              "", "## Curves", "", "![ROC curve](roc.png)", "", "![Precision-recall curve](pr.png)", ""]
    if has_predictions:
        lines += ["Per-case predictions: [predictions.csv](predictions.csv)", ""]
    return "\n".join(lines)


def _gate_lines(report: dict[str, Any]) -> list[str]:
    """Markdown: how many films the input gate refused (by reason) and how unfamiliar the answered ones were."""
    lines: list[str] = []
    if "input_gate" in report:
        g = report["input_gate"]
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(g["by_reason"].items())) or "none"
        lines += ["## Input gate", "", f"{g['answered']} films answered, {g['not_answered']} not answered "
                  f"(not frontal chest X-rays: {reasons}). The metrics above are for the answered films.", ""]
        lines += [f"- not answered: `{f['path']}` ({f['label']}): {f['reason']}" for f in g["files"][:20]]
        lines += [""] if g["files"] else []
    if "unfamiliarity" in report:
        u = report["unfamiliarity"]
        rows = {"all": u["all"], **u.get("by_source", {})}
        lines += ["## Unfamiliarity", "",
                  "Share of validation films whose features lie closer to the training films' than each film's "
                  f"(Mahalanobis distance): 0.5 is typical; above {u['warn_above']} an answer carries a warning.", "",
                  "| Films | n | median | 95th percentile | share above the warning level |", "|---|---:|---:|---:|---:|",
                  *[f"| {k} | {r['n']} | {r['median']:.3f} | {r['p95']:.3f} | {r['share_above_warning']:.1%} |"
                    for k, r in rows.items()], ""]
    return lines


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
    n_boot: int = 1000, title: str = "Evaluation", temperature: float | None = None,
    prob_uncalibrated: ArrayLike | None = None, named_thresholds: dict[str, float] | None = None,
    internal: dict[str, Any] | None = None, gate: dict[str, Any] | None = None,
    unfamiliarity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write report.json, report.md, confusion_matrix.png, roc.png, pr.png, reliability.png (and predictions.csv).

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
        temperature: the temperature ``prob`` was computed with (reported; 1 when None).
        prob_uncalibrated: P(COVID-19) at temperature 1, to report the calibration error before scaling.
        named_thresholds: extra operating points, name -> threshold (e.g. chosen on validation
            for a target sensitivity); the stored threshold and 0.5 are always included.
        internal: for external data, the internal test metrics (``{"from", "n", "n_covid", "metrics"}``)
            to compare with; adds ``internal`` and ``gap`` (external - internal) to the report.
        gate: what the input gate did (``{"answered", "not_answered", "by_reason", "files"}``); the
            metrics are then those of the answered films.
        unfamiliarity: summary of the answered films' unfamiliarity (``{"warn_above", "all", "by_source"}``).

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
    named = {"stored operating threshold": float(threshold), "0.5": 0.5, **(named_thresholds or {})}
    report["key_operating_points"] = [
        {"name": name, **point} for name, point in zip(named, operating_points(y, p, tuple(named.values())))
    ]
    report["operating_points"] = operating_points(y, p)
    report["calibration"] = _calibration(y, p, temperature, prob_uncalibrated)
    if internal is not None:
        report["internal"] = internal
        ext, ref = _values(report), {k: v["value"] for k, v in internal["metrics"].items()}
        report["gap"] = {k: None if ref[k] is None or not math.isfinite(ext[k]) else ext[k] - ref[k] for k in METRICS}
    if gate is not None:
        report["input_gate"] = gate
    if unfamiliarity is not None:
        report["unfamiliarity"] = unfamiliarity
    report["meta"] = meta
    report = json_safe(report)

    atomic_write_bytes(out / "confusion_matrix.png", _confusion_png(report["confusion"], threshold))
    atomic_write_bytes(out / "roc.png", _roc_png(y, p, report))
    atomic_write_bytes(out / "pr.png", _pr_png(y, p, report))
    atomic_write_bytes(out / "reliability.png", _reliability_png(report["calibration"]))
    if paths is not None:
        save_predictions_csv(out / "predictions.csv", paths, y, p, threshold, sources)
    atomic_write_text(out / "report.md", _markdown(report, title, paths is not None))
    atomic_write_json(out / "report.json", report)  # last: its presence marks a complete report
    logger.info("wrote evaluation report to %s (sensitivity %s, specificity %s, ROC AUC %s)", out,
                *(_fmt(report["metrics"][k]["value"]) for k in ("sensitivity", "specificity", "roc_auc")))
    return report


def write_history(run: Path, history: list[dict[str, Any]]) -> None:
    """history.json, history.csv and curves.png (loss; validation ROC-AUC and accuracy) of a training run."""
    atomic_write_json(run / "history.json", history)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0]))
    w.writeheader()
    w.writerows(history)
    atomic_write_text(run / "history.csv", buf.getvalue())
    ep = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 3.6), dpi=110)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss")
    ax1.plot(ep, [h["val_loss"] for h in history], "o-", label="validation loss")
    ax1.set_xlabel("epoch"), ax1.set_title("loss"), ax1.legend()
    ax2.plot(ep, [h["val_auc"] for h in history], "o-", color="firebrick", label="validation ROC-AUC")
    ax2.plot(ep, [h["val_acc"] for h in history], "o-", color="gray", label="validation accuracy @0.5")
    ax2.set_xlabel("epoch"), ax2.set_title("validation (positive class: COVID-19)"), ax2.legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write_bytes(run / "curves.png", png.getvalue())
