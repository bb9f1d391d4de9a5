"""Model card: a markdown page generated from a run's checkpoint and evaluation reports.

Sections follow the spirit of the CLAIM / TRIPOD+AI checklists: what the model is for and not for,
the data and how it was split, results with 95% CIs overall and per source, the operating
threshold and how it was chosen, and the known limitations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .checkpoint import read_model_meta
from .utils import atomic_write_text

__all__ = ["write_card"]

_METRIC_NAMES = {
    "accuracy": "Accuracy", "sensitivity": "Sensitivity (recall, COVID-19)", "specificity": "Specificity",
    "ppv": "PPV (precision)", "npv": "NPV", "f1": "F1", "roc_auc": "ROC-AUC", "pr_auc": "PR-AUC",
}


def _fmt(m: dict[str, Any]) -> str:
    if m.get("value") is None:
        return "n/a"
    return f"{m['value']:.4f} ({m['ci_low']:.4f}–{m['ci_high']:.4f})"


def _metrics_table(reports: dict[str, dict[str, Any]]) -> list[str]:
    names = list(reports)
    lines = ["| Metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label in _METRIC_NAMES.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(r["metrics"][key]) for r in reports.values()) + " |")
    lines.append("| Images (COVID-19 / normal) | " + " | ".join(f"{r['n']} ({r['n_covid']} / {r['n_normal']})" for r in reports.values()) + " |")
    return lines


def _per_source(report: dict[str, Any]) -> list[str]:
    lines = ["| Source | Images (COVID-19 / normal) | Sensitivity | Specificity | ROC-AUC |", "|---|---:|---:|---:|---:|"]
    for name, r in report.get("per_source", {}).items():
        m = r["metrics"]
        lines.append(f"| {name} | {r['n']} ({r['n_covid']} / {r['n_normal']}) | {_fmt(m['sensitivity'])} | "
                     f"{_fmt(m['specificity'])} | {_fmt(m['roc_auc'])} |")
    return lines


def write_card(run: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write ``MODEL_CARD.md`` for the run (default: into the run folder) from ``model.json`` and ``eval-*/report.json``."""
    meta, json_path = read_model_meta(run)
    run_dir = json_path.parent
    cfg = meta.get("train_config", {})
    reports = {}
    for split in ("val", "test"):
        f = run_dir / f"eval-{split}" / "report.json"
        if f.is_file():
            reports[f"{split} split"] = json.loads(f.read_text())
    pre = meta["preprocess"]
    lines = [
        f"# Model card — covidxray {meta['arch']} @ {pre['size']} px", "",
        "> **Research software. Not a medical device. Not for diagnosis or any clinical decision.**", "",
        "## Model", "",
        f"- Architecture: `{meta['arch']}` (1-channel input, 2 classes `{meta['class_names']}`); "
        f"pretrained weights: `{cfg.get('weights')}`; recipe `{cfg.get('recipe')}`.",
        "- Output: P(COVID-19). **COVID-19 (`covid`) is the positive class.**",
        f"- Operating threshold: **{meta['threshold']:.4f}** — {meta.get('threshold_rule', '')}.",
        f"- Temperature: {meta.get('temperature', 1.0)}; epoch kept: {meta.get('epoch')} (best validation ROC-AUC "
        f"{meta.get('val_auc', float('nan')):.4f}); training wall time: {meta.get('train_seconds', 0) / 60:.1f} min.",
        f"- Preprocessing: decode → square resize to {pre['size']} px → "
        f"{'histogram equalisation → ' if pre['equalize'] else ''}normalise (mean {pre['mean']}, std {pre['std']}).",
        f"- Weights: `{meta.get('weights_file')}`, SHA-256 `{meta['weights_sha256']}`.", "",
        "## Intended use", "",
        "Research and education on COVID-19 detection from frontal chest X-rays of adults: benchmarking, studying "
        "shortcut learning, prototyping. It must not be used to diagnose, triage or exclude COVID-19 in any person. "
        "COVID-19 status is established by RT-PCR; a chest X-ray can be normal in infection and abnormal for many "
        "other reasons, and this model only ever saw COVID-19 and normal films (no other pneumonia).", "",
        "## Data", "",
        f"- Training data: `{cfg.get('data')}`; split file: `{cfg.get('splits')}`; data fingerprint (SHA-256 of "
        f"manifest + split): `{meta.get('data_fingerprint')}`.",
        "- Split: patient-grouped (and near-duplicate-grouped, pHash ≤ 4) 70/15/15, stratified by label × source "
        "(`covidxray data split`). Model selection and the threshold used the validation split only; the test split "
        "was used once, for the numbers below.",
    ]
    if reports:
        lines += ["", "## Results (95% bootstrap CIs)", "", *_metrics_table(reports), ""]
        for name, r in reports.items():
            if r.get("per_source"):
                lines += [f"### Per source — {name}", "", *_per_source(r), ""]
    lines += [
        "## Limitations and known risks", "",
        "- **Source confounding.** In the shared data almost all normal films come from one source (RSNA/NIH via the "
        "COVID-19 Radiography Database) while COVID-19 films come from many hospitals, papers and websites. A model can "
        "learn the hospital instead of the disease; internal metrics are therefore optimistic. Square resizing, "
        "histogram equalisation and resolution/intensity/erasing augmentation are used to weaken such cues, but they "
        "are not removed. Validate on your own hospital's films before trusting any number here.",
        "- Labels are folder/metadata labels of public compilations (some COVID-19 films may be RT-PCR-positive with "
        "a normal-looking X-ray); patient IDs are missing for most images, so patient-level separation is partial.",
        "- Normals are adults; 14 COVID-19 images are pediatric. Not evaluated on children, lateral views, CT, or "
        "other lung diseases.",
        "- Probabilities are not calibrated unless a temperature other than 1 is shown above.",
        "- Training images carry mixed licences, some non-commercial (CC BY-NC-SA, ieee8023 rows); check the data "
        "set's `provenance.csv` before any commercial use of these weights.", "",
        "## Reproduce", "",
        "```sh", "bash bench/train_default.sh   # trains, evaluates and regenerates this card", "```", "",
    ]
    out = Path(out) if out else run_dir / "MODEL_CARD.md"
    atomic_write_text(out, "\n".join(lines))
    return out
