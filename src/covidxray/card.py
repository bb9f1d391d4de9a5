"""Model card: MODEL_CARD.md and a self-contained MODEL_CARD.html from a run's checkpoint, reports and audit.

The sections follow the CLAIM (Checklist for Artificial Intelligence in Medical Imaging, 2024 update) and TRIPOD+AI
(BMJ 2024) reporting items that apply to a research model: intended use, data provenance, how the data were split,
the model, results with 95% CIs (internal and external), calibration, the shortcut audit and the limitations. Built
once as a list of blocks, rendered twice: Markdown (pictures linked) and HTML (pictures embedded as data URIs).
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

from . import DISCLAIMER
from .audit import summary
from .checkpoint import read_model_meta
from .data import load_samples
from .errors import DataError
from .metrics import format_ci
from .utils import atomic_write_text, sha256_file

__all__ = ["write_card", "build_card"]

log = logging.getLogger(__name__)

_METRIC_NAMES = {
    "accuracy": "Accuracy", "sensitivity": "Sensitivity (recall, COVID-19)", "specificity": "Specificity",
    "ppv": "PPV (precision, COVID-19)", "npv": "NPV", "f1": "F1 (COVID-19)", "roc_auc": "ROC-AUC", "pr_auc": "PR-AUC",
}

# A block: ("h2", text), ("p", text), ("ul", [text]), ("table", (header, rows)), ("img", (path, alt)), ("note", text).
Block = tuple[str, Any]


def _fmt(m: dict[str, Any] | None) -> str:
    return format_ci(m, digits=4)


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _data_blocks(meta: dict[str, Any]) -> list[Block]:
    """Provenance: sources and counts per split and label, manifest hash, split method."""
    cfg = meta.get("train_config", {})
    data, splits = cfg.get("data"), cfg.get("splits")
    blocks: list[Block] = [("ul", [
        f"Data: `{data}`; split file: `{splits}`.",
        f"Data fingerprint (SHA-256 of manifest + split file, recorded at training): `{meta.get('data_fingerprint')}`.",
    ])]
    try:
        samples = load_samples(data, splits)
    except (DataError, OSError, TypeError) as e:
        blocks.append(("p", f"The training data is not available here ({e}); counts are not shown."))
        return blocks
    if data and Path(data).is_file():
        blocks[0][1].append(f"Manifest SHA-256: `{sha256_file(data)}` ({len(samples)} images).")
    counts = Counter((s.source or "(unknown)", s.split or "-", s.label) for s in samples)
    sources = sorted({k[0] for k in counts})
    header = ["Source", *[f"{sp} COVID-19 / normal" for sp in ("train", "val", "test")], "Total"]
    rows = [[f"`{src}`", *[f"{counts[(src, sp, 1)]} / {counts[(src, sp, 0)]}" for sp in ("train", "val", "test")],
             str(sum(n for k, n in counts.items() if k[0] == src))] for src in sources]
    rows.append(["all", *[f"{sum(n for k, n in counts.items() if k[1] == sp and k[2] == 1)} / "
                          f"{sum(n for k, n in counts.items() if k[1] == sp and k[2] == 0)}" for sp in ("train", "val", "test")],
                 str(len(samples))])
    with_ids = sorted({s.source or "(unknown)" for s in samples if s.patient_id})
    blocks += [("table", (header, rows)),
               ("p", f"Patient IDs are given by: {', '.join(f'`{x}`' for x in with_ids) or 'no source'}.")]
    readme = Path(data).parent / "README.md" if Path(data).is_file() else Path(data) / "README.md"
    if readme.is_file():
        blocks.append(("p", f"Where each source comes from (repository and commit), how labels were assigned, licences, "
                            f"deduplication and known caveats: `{readme}`."))
    return blocks


def _results_blocks(reports: dict[str, dict[str, Any]], meta: dict[str, Any]) -> list[Block]:
    names = list(reports)
    header = ["Metric", *names]
    rows = [[label, *[_fmt(r["metrics"][key]) for r in reports.values()]] for key, label in _METRIC_NAMES.items()]
    rows.append(["Images (COVID-19 / normal)", *[f"{r['n']} ({r['n_covid']} / {r['n_normal']})" for r in reports.values()]])
    blocks: list[Block] = [("p", f"At the stored threshold {meta['threshold']:.4f}; 95% percentile-bootstrap CIs over cases. "
                                 "COVID-19 is the positive class."), ("table", (header, rows))]
    stale = [n for n, r in reports.items() if r.get("threshold") != meta["threshold"]
             or (r.get("calibration") or {}).get("temperature", 1.0) != meta.get("temperature", 1.0)]
    if stale:
        blocks.append(("note", f"Stale: {', '.join(stale)} used another threshold or temperature than model.json; "
                               "run `covidxray evaluate` again."))
    for name, r in reports.items():
        if r.get("internal"):
            gap = [[label, _fmt(r["internal"]["metrics"][k]), _fmt(r["metrics"][k]),
                    "n/a" if r["gap"][k] is None else f"{r['gap'][k]:+.3f}"] for k, label in _METRIC_NAMES.items()]
            blocks += [("h3", f"External vs internal — {name}"),
                       ("table", (["Metric", "Internal (test split)", "External", "Gap"], gap))]
        if r.get("per_source"):
            rows = [[f"`{src}`", f"{s['n']} ({s['n_covid']} / {s['n_normal']})", _fmt(s["metrics"]["sensitivity"]),
                     _fmt(s["metrics"]["specificity"]), _fmt(s["metrics"]["roc_auc"])] for src, s in r["per_source"].items()]
            blocks += [("h3", f"Per source — {name}"),
                       ("table", (["Source", "Images (COVID-19 / normal)", "Sensitivity", "Specificity", "ROC-AUC"], rows))]
    return blocks


def _loso_blocks(loso: dict[str, Any] | None) -> list[Block]:
    """Leave one origin out (`bench/loso.py`, its JSON copied beside the model as ``loso.json``)."""
    if not loso:
        return [("note", "No leave-one-origin-out results beside this model: run `bench/loso.py` for its recipe and "
                         "copy the JSON beside the model as `loso.json`.")]
    ms = lambda v: f"{mean(v):.3f}" + (f" ± {pstdev(v):.3f}" if len(v) > 1 else "")  # noqa: E731
    rows = [[f"`{k}`", str(c["n"]), c["metric"], *map(ms, (c["at_threshold"], c["threshold_free"], c["ece"]))]
            for k, c in loso["summary"]["cells"].items()]
    return [("p", "The same recipe trained with origins left out (all of their films), threshold chosen on validation as "
                  "for this model, then scored on every film of the held-out origins: the nearest the shared data comes to "
                  "a hospital the model never saw. Mean ± spread over seeds where there are several. "
                  f"{loso['table'][-1]} Command: `{loso.get('command', 'bench/loso.py')}`."),
            ("table", (["Held-out origin, finding", "Films", "Metric", "At its threshold", "Threshold-free", "ECE"], rows))]


def _origins_blocks(origins: dict[str, Any] | None) -> list[Block]:
    """This model scored on every origin of the shared data (`bench/origins.py --score`, copied as ``origins.json``)."""
    if not origins:
        return [("note", "No every-origin results beside this model: run `bench/origins.py --score` on it.")]
    rows = [[f"`{r['origin']}` {r['finding']}", str(r["n"]), r["metric"], format_ci(r["at_threshold"], digits=3),
             f"{r['threshold_free']:.3f}", f"{r['ece']:.3f}"] for r in origins["results"].values() if r["n"] >= 20]
    return [("p", f"{origins['title']}. Threshold-free: at the threshold giving 0.90 sensitivity on the internal test "
                  f"films (normals, other findings) or 0.90 specificity (COVID-19). Command: `{origins.get('command', '')}`."),
            ("table", (["Origin, finding", "Films", "Metric", "At the threshold (95% CI)", "Threshold-free", "ECE"], rows))]


def _segmenter_blocks(seg: dict[str, Any] | None) -> list[Block]:
    """The lung segmenter and input gate shipped beside the classifier (``segmenter.json``)."""
    if not seg:
        return [("p", "No lung segmenter and no input gate: every input is answered.")]
    test = seg.get("metrics", {}).get("test", {})
    items = [f"Lung segmenter: U-Net on the EfficientNet-Lite0 encoder at {seg['preprocess']['size']} px, trained on JSRT "
             f"lung masks split by patient; Dice on {test.get('n')} held-out patients {test.get('dice_mean', float('nan')):.3f} "
             f"(min {test.get('dice_min', float('nan')):.3f}). Weights SHA-256 `{seg['weights_sha256']}`."]
    if gate := seg.get("gate"):
        items.append(f"Input gate: DICOM headers, then a head on the segmenter's features over {', '.join(gate['classes'])}; "
                     f"threshold {gate['threshold']:.3f} ({gate['threshold_rule']}). A refused film gets no answer "
                     "(`not_answered` with a reason), never a COVID-19 probability.")
        items += [f"{what}: {r['rate']:.1%} of {r['n']}" for what, r in gate.get("test", {}).items()]
    return [("ul", items)]


def _calibration_blocks(meta: dict[str, Any], test: dict[str, Any] | None, run_dir: Path) -> list[Block]:
    cal = meta.get("calibration")
    if not cal:
        return [("p", f"Temperature {meta.get('temperature', 1.0)}: **not calibrated** (run `covidxray calibrate`).")]
    rows = [["validation (fit)", str(cal["n"]), f"{cal['ece_before']:.4f}", f"{cal['ece_after']:.4f}"]]
    if test and "calibration" in test:
        c = test["calibration"]
        before = c.get("uncalibrated", {}).get("ece")
        rows.append(["test (held out)", str(test["n"]), "n/a" if before is None else f"{before:.4f}", f"{c['ece']:.4f}"])
    blocks: list[Block] = [
        ("p", f"Temperature scaling (Guo et al. 2017): logits are divided by **T = {meta['temperature']:.4f}**, fitted by "
              f"minimising the validation negative log-likelihood; the threshold was chosen afterwards on the calibrated "
              f"probabilities. Expected calibration error (ECE) of P(COVID-19), {cal['bins']} equal-width bins:"),
        ("table", (["Split", "Images", "ECE at T = 1", f"ECE at T = {meta['temperature']:.3f}"], rows)),
    ]
    if (run_dir / "eval-test" / "reliability.png").is_file():
        blocks.append(("img", (run_dir / "eval-test" / "reliability.png", "Reliability diagram, test split")))
    return blocks


def _operating_blocks(test: dict[str, Any] | None) -> list[Block]:
    if not test or not test.get("key_operating_points"):
        return [("p", "No current test report with operating points; run `covidxray evaluate RUN --split test`.")]
    rows = [[o["name"], f"{o['threshold']:.4f}", _fmt({"value": o["sensitivity"]}), _fmt({"value": o["specificity"]}),
             _fmt({"value": o["ppv"]}), _fmt({"value": o["npv"]})] for o in test["key_operating_points"]]
    return [("p", "Test-split sensitivity, specificity, PPV and NPV at named thresholds; the sensitivity targets were "
                  "reached on the validation split, so the test values show how well they carry over. PPV and NPV depend "
                  f"on prevalence ({test['n_covid'] / test['n']:.0%} COVID-19 here), which will differ in any real setting."),
            ("table", (["Threshold from", "Threshold", "Sensitivity", "Specificity", "PPV", "NPV"], rows))]


def _audit_blocks(audit: dict[str, Any] | None, audit_dir: Path) -> list[Block]:
    if audit is None:
        return [("p", "No shortcut audit yet: run `covidxray audit RUN`.")]
    probe_rows = []
    for scope, r in audit["source_probe"].items():
        srcs = ", ".join(f"{k} {v}" for k, v in r["sources"].items())
        if "skipped" in r:
            probe_rows.append([scope, srcs or "–", "skipped", r["skipped"]])
        else:
            probe_rows.append([scope, srcs, f"**{r['balanced_accuracy']:.3f}**", f"chance {r['chance_balanced_accuracy']:.3f}"])
    blocks: list[Block] = [
        ("p", f"`covidxray audit` on the {audit['split']} split ({audit['n_images']} images); details in "
              f"`{audit_dir / 'audit.md'}`."),
        ("ul", summary(audit)),
        ("h3", "Source probe (logistic regression on the pre-logit features, 5-fold CV, balanced accuracy)"),
        ("table", (["Images", "Sources", "Balanced accuracy", "Reference"], probe_rows)),
        ("p", "Within one class, a probe well above chance means the network's features encode where a film came from; "
              "since normals come almost only from one source, such features can stand in for the label."),
    ]
    for name, alt in (("gradcam_mean.png", "Mean Grad-CAM per class"), ("gradcam_examples.png", "Grad-CAM examples")):
        if (audit_dir / name).is_file():
            blocks.append(("img", (audit_dir / name, alt)))
    return blocks


# Section 1 of every card: what the model is for, and what not.
_INTENDED_USE = [
    "Research and teaching on COVID-19 detection from frontal adult chest X-rays: benchmarking, studying "
    "shortcut learning, prototyping software around a model.",
    "**Not for diagnosis.** It must not be used to diagnose, triage, screen for or exclude COVID-19 in any "
    "person. COVID-19 is established by RT-PCR; a chest X-ray can be normal in infection and abnormal for many "
    "other reasons, and this model only saw COVID-19 and normal films (no other pneumonia).",
    "Out of scope: children, lateral views, CT, other lung disease, films from hospitals unlike the training "
    "sources (performance there is unknown; see the audit and the external results if any).",
]

# Section 9 of every card: what the data cannot show.
_LIMITATIONS = [
    "**Source confounding.** Almost every normal film comes from one source (RSNA/NIH via radiography-db) "
    "while COVID-19 films come from many hospitals, papers and websites. Internal metrics are therefore "
    "optimistic; the audit above measures how much of the source the network can see.",
    "Labels are the sources' folder/metadata labels; some COVID-19 films are RT-PCR-positive with a normal-"
    "looking X-ray, and no radiologist re-read any image.",
    "Normals are adults; 14 COVID-19 images are pediatric. No other lung disease is in the data, so the "
    "specificity says nothing about pneumonia of other causes.",
    "Calibration was fitted and checked on the same sources; probabilities from other hospitals may be "
    "mis-calibrated even where the ranking holds.",
    "Mixed licences, some non-commercial (ieee8023 rows, CC BY-NC-SA): check the data set's `provenance.csv` "
    "before any commercial use of these weights.",
]


def build_card(
    run: str | os.PathLike, external: list[str | os.PathLike] | None = None, out: str | os.PathLike | None = None,
) -> list[Block]:
    """The card's blocks for the run: from ``model.json``, ``eval-*/report.json`` and ``audit/audit.json``.

    ``out`` (the card's path) only appears in the reproduce commands.
    """
    meta, json_path = read_model_meta(run)
    run_dir = json_path.parent
    cfg = meta.get("train_config", {})
    pre = meta["preprocess"]
    reports = {f"{split} split": r for split in ("val", "test") if (r := _load(run_dir / f"eval-{split}" / "report.json"))}
    ext_dirs = [Path(e) for e in external] if external else sorted(run_dir.glob("eval-external-*"))
    for d in ext_dirs:
        if (r := _load(d / "report.json")):
            reports[f"external: {d.name.removeprefix('eval-external-')}"] = r
    test = reports.get("test split")
    audit = _load(run_dir / "audit" / "audit.json")
    mask = f"blank the outer {pre['mask_border']:.0%} frame → " if pre.get("mask_border") else ""
    lungs = (f"crop to the lungs (bundled lung segmenter's box, {pre.get('lung_margin', 0):.0%} margin; outside the dilated "
             f"lungs darkened by {pre.get('outside', 0):.0%}) → " if pre.get("lung_crop") else "")
    blocks: list[Block] = [
        ("h1", f"Model card — covidxray {meta['arch']} @ {pre['size']} px"),
        ("note", f"**{DISCLAIMER}** COVID-19 (`covid`) is the positive class in every number below."),
        ("p", "Sections follow the CLAIM 2024 and TRIPOD+AI (2024) reporting items that apply to a research model; "
              "the item each section answers is named in its heading."),
        ("h2", "1. Intended use (CLAIM: intended use; TRIPOD+AI: objectives)"),
        ("ul", _INTENDED_USE),
        ("h2", "2. Data and provenance (CLAIM: data sources, eligibility; TRIPOD+AI: data, participants)"),
        *_data_blocks(meta),
        ("h2", "3. Split method (CLAIM: data partitions; TRIPOD+AI: internal validation)"),
        ("p", "Patient-grouped and near-duplicate-grouped (pHash ≤ 4) 70/15/15 split, stratified by label × source "
              "(`covidxray data split`). Model selection, temperature and threshold used the validation split only; the "
              "test split was used for the numbers below and for nothing else. Where a source gives no patient IDs, "
              "patient separation relies on the near-duplicate grouping."),
        ("h2", "4. Model (CLAIM: model design, training; TRIPOD+AI: model specification)"),
        ("ul", [
            f"Architecture `{meta['arch']}`, 1-channel input, 2 classes `{meta['class_names']}`; initial weights "
            f"`{cfg.get('weights')}`; recipe `{cfg.get('recipe')}` ({cfg.get('epochs')} epochs, {cfg.get('optimizer')} "
            f"lr {cfg.get('lr')}, label smoothing {cfg.get('label_smoothing')}, class-balanced sampling "
            f"{cfg.get('balanced')}, augmentation `{cfg.get('augment')}`, seed {cfg.get('seed')}); epoch kept "
            f"{meta.get('epoch')} (best validation ROC-AUC {meta.get('val_auc', float('nan')):.4f}); training "
            f"{meta.get('train_seconds', 0) / 60:.1f} min on CPU." + ("" if not (r := meta.get("head_refit")) else
            f" Then its last layer was refitted (`covidxray refit-head`): {r['method']}, C = {r['c']:g}, "
            f"{r['train_images']} films; validation ROC-AUC {r['val_auc']:.4f}."),
            f"Preprocessing: decode (DICOM VOI LUT, MONOCHROME1 inverted) → {lungs}square resize to {pre['size']} px → {mask}"
            f"{('lung-only ' if pre.get('equalize_lungs') else '') + 'histogram equalisation → ' if pre['equalize'] else ''}normalise (mean {pre['mean']}, std {pre['std']}).",
            f"Output: P(COVID-19) = softmax(logits / T)[covid] with T = {meta.get('temperature', 1.0):.4f}; "
            f"**operating threshold {meta['threshold']:.4f}** — {meta.get('threshold_rule', '')}.",
            f"Weights `{meta.get('weights_file')}`, SHA-256 `{meta['weights_sha256']}`.",
        ]),
        ("h3", "Lung segmenter and input gate"), *_segmenter_blocks(_load(run_dir / "segmenter.json")),
        ("h2", "5. Results with 95% CIs (CLAIM: performance metrics; TRIPOD+AI: model performance)"),
        *(_results_blocks(reports, meta) if reports else [("p", "No evaluation reports: run `covidxray evaluate`.")]),
    ]
    if (run_dir / "eval-test" / "roc.png").is_file():
        blocks.append(("img", (run_dir / "eval-test" / "roc.png", "ROC curve, test split")))
    blocks += [("h3", "Leave one origin out (TRIPOD+AI: external validation)"), *_loso_blocks(_load(run_dir / "loso.json")),
               ("h3", "Every origin of the shared data"), *_origins_blocks(_load(run_dir / "origins.json"))]
    if not any(k.startswith("external") for k in reports) and not (run_dir / "origins.json").is_file():
        blocks.append(("note", "No external validation: every number above comes from the training data's sources. "
                               "Evaluate on another hospital's films (`covidxray evaluate RUN --external DATA`)."))
    blocks += [
        ("h2", "6. Calibration (TRIPOD+AI: calibration)"), *_calibration_blocks(meta, test, run_dir),
        ("h2", "7. Operating points (CLAIM: thresholds)"), *_operating_blocks(test),
        ("h2", "8. Shortcut audit (CLAIM: robustness, explainability; TRIPOD+AI: fairness, bias)"),
        *_audit_blocks(audit, run_dir / "audit"),
        ("h2", "9. Limitations (CLAIM/TRIPOD+AI: limitations)"),
        ("ul", _LIMITATIONS),
        ("h2", "10. Reproduce"),
        ("code", "\n".join([
            "bash bench/train_default.sh                        # train, export, evaluate, audit, card",
            f"covidxray calibrate {run_dir}                   # temperature + threshold on validation",
            f"covidxray evaluate {run_dir} --split val && covidxray evaluate {run_dir} --split test",
            f"covidxray audit {run_dir}                       # shortcut audit on the test split",
            f"covidxray card {run_dir}" + (f" --out {out}" if out else "") + "   # this card (.md and .html)",
        ])),
    ]
    return blocks


def _inline_html(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def render_markdown(blocks: list[Block], base: Path) -> str:
    """Markdown; pictures are linked relative to ``base`` (the card's folder)."""
    lines: list[str] = []
    for kind, payload in blocks:
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + payload, ""]
        elif kind == "p":
            lines += [payload, ""]
        elif kind == "note":
            lines += [f"> {payload}", ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in payload] + [""]
        elif kind == "code":
            lines += ["```sh", payload, "```", ""]
        elif kind == "table":
            header, rows = payload
            lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
            lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
        elif kind == "img":
            path, alt = payload
            lines += [f"![{alt}]({Path(os.path.relpath(path, base)).as_posix()})", ""]
    return "\n".join(lines)


def render_html(blocks: list[Block]) -> str:
    """A standalone HTML page; every picture is embedded as a base64 PNG data URI."""
    title = next((p for k, p in blocks if k == "h1"), "Model card")
    body: list[str] = []
    for kind, payload in blocks:
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{_inline_html(payload)}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline_html(payload)}</p>")
        elif kind == "note":
            body.append(f'<p class="note">{_inline_html(payload)}</p>')
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in payload) + "</ul>")
        elif kind == "code":
            body.append(f"<pre><code>{html.escape(payload)}</code></pre>")
        elif kind == "table":
            header, rows = payload
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in header)
            cells = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif kind == "img":
            path, alt = payload
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
                        f"<figcaption>{html.escape(alt)}</figcaption></figure>")
    style = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
             "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;font-size:.9rem}"
             "th{background:#f3f3f3}td:not(:first-child){text-align:right}img{max-width:100%}"
             ".note{border-left:4px solid #b00;background:#fff4f4;padding:.5rem 1rem}"
             "pre{background:#f6f6f6;padding:.75rem;overflow-x:auto}figure{margin:1rem 0}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_card(
    run: str | os.PathLike, out: str | os.PathLike | None = None, external: list[str | os.PathLike] | None = None,
) -> tuple[Path, Path]:
    """Write ``MODEL_CARD.md`` and ``MODEL_CARD.html`` for the run (default: into the run folder).

    Args:
        run: run folder or ``model.json``.
        out: the Markdown file; the HTML file is written beside it with the suffix ``.html``.
        external: external evaluation folders to include (default: every ``RUN/eval-external-*``).

    Returns:
        ``(markdown_path, html_path)``.
    """
    _, json_path = read_model_meta(run)
    md = Path(out) if out else json_path.parent / "MODEL_CARD.md"
    blocks = build_card(run, external, out)
    atomic_write_text(md, render_markdown(blocks, md.resolve().parent))
    page = md.with_suffix(".html")
    atomic_write_text(page, render_html(blocks))
    log.info("wrote %s and %s", md, page)
    return md, page
