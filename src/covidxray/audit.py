"""Shortcut audit: does the model see COVID-19, or the hospital the film came from?

In the shared data almost every normal film comes from one source while COVID-19 films come from
many (see the data set's README), so a high AUC alone proves little. `audit_run` looks for the
shortcut four ways and writes ``audit.json``, ``audit.md`` and pictures:

1. **Per source** — metrics per source, and *within* a source that holds both classes: there the
   source cannot give the answer away, so its AUC is the fairest internal number.
2. **Source probe** — a cross-validated logistic regression on the network's pre-logit features
   predicting the image's source. Overall it is confounded with the label; what matters is the
   probe *within one class* (source given label): well above chance means the features encode the
   hospital, which the classifier can then use.
3. **Leakage** — patients and near-duplicate pictures (pHash) shared by the training data and
   the evaluated data.
4. **Grad-CAM location** — the share of each map's mass in an outer frame of the image
   (``BORDER`` of each side) and in its corners, where text, markers and film edges sit, against
   the frame's share of the area. Each image is explained for its own (true) class.

All of it is sized for two CPU cores: ``limit`` bounds the Grad-CAM images, ``probe_limit`` the
images whose features are computed. COVID-19 is the positive class throughout.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from . import CLASS_NAMES
from .cache import readable_images
from .calibration import covid_probability
from .checkpoint import resolve_data, run_dir
from .data import Sample, check_samples, load_samples
from .errors import DataError
from .cam_location import BORDER, DILATE, area_shares, border_mass, dilate, gradcam_pngs, lung_mass, mean_of
from .explain import grad_cam
from .imaging import load_image
from .inference import logits_and_features
from .metrics import bootstrap_metrics, format_ci
from .models import get_spec
from .predictor import Predictor
from .report import json_safe
from .utils import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["BORDER", "area_shares", "border_mass", "source_probe", "leakage", "audit_run", "summary"]

log = logging.getLogger(__name__)


def source_probe(
    feats: ArrayLike, sources: Sequence[str], labels: Sequence[int] | None = None, folds: int = 5, seed: int = 0,
    max_iter: int = 2000,
) -> dict[str, Any]:
    """How well the image's source can be read from features: cross-validated logistic regression.

    Sources with fewer than ``folds`` images in a scope are left out of that scope (listed).

    Args:
        feats: features ``(N, D)`` (e.g. from `covidxray.inference.logits_and_features`).
        sources: source name per image.
        labels: 1 = COVID-19, 0 = normal; adds the within-class scopes ``covid`` and ``normal``.
        folds: stratified folds.
        seed: fold shuffling.

    Returns:
        ``{scope: result}`` for ``all`` (and ``covid``/``normal``). A result holds ``n``, ``sources``
        (counts), ``balanced_accuracy`` (pooled out-of-fold), ``fold_balanced_accuracy`` (per fold),
        ``chance_balanced_accuracy`` (1 / number of sources), ``accuracy`` and ``majority_accuracy``
        (always answering the largest source), ``excluded`` — or ``skipped`` with the reason.
    """
    x = np.asarray(feats, dtype=np.float64)
    src = np.asarray([str(s) for s in sources])
    if x.ndim != 2 or len(x) != len(src):
        raise ValueError(f"features must be (N, D) with one source per row, got {x.shape} and {len(src)} sources")
    scopes = {"all": np.ones(len(src), dtype=bool)}
    if labels is not None:
        y = np.asarray(labels).ravel()
        scopes.update({CLASS_NAMES[c]: y == c for c in (1, 0)})
    out: dict[str, Any] = {}
    for scope, mask in scopes.items():
        counts = Counter(src[mask])
        keep = {s for s, n in counts.items() if n >= folds}
        excluded = {s: n for s, n in counts.items() if s not in keep}
        res: dict[str, Any] = {"n": int(sum(counts[s] for s in keep)), "sources": {s: counts[s] for s in sorted(keep)},
                               "excluded": excluded}
        if len(keep) < 2:
            out[scope] = {**res, "skipped": f"fewer than two sources with at least {folds} images"}
            continue
        idx = np.flatnonzero(mask & np.isin(src, sorted(keep)))
        xs, ys = x[idx], src[idx]
        pred = np.empty(len(idx), dtype=ys.dtype)
        per_fold = []
        for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(xs, ys):
            # Balanced classes: the largest source must not win by default; standardised features,
            # moderate L2 because there are more feature dimensions than images per fold.
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=max_iter))
            pred[test] = probe.fit(xs[train], ys[train]).predict(xs[test])
            per_fold.append(float(balanced_accuracy_score(ys[test], pred[test])))
        out[scope] = {
            **res, "balanced_accuracy": float(balanced_accuracy_score(ys, pred)), "fold_balanced_accuracy": per_fold,
            "chance_balanced_accuracy": 1.0 / len(keep), "accuracy": float(accuracy_score(ys, pred)),
            "majority_accuracy": max(counts[s] for s in keep) / len(idx),
        }
    return out


def leakage(train: Sequence[Sample], evaluated: Sequence[Sample], max_distance: int = 4) -> dict[str, Any]:
    """Patients and near-duplicate pictures shared by the training images and the evaluated images.

    Uses the same checks as ``covidxray data check`` (`check_samples`): patient IDs within a source,
    and pHash Hamming distance <= ``max_distance`` (from the manifest, else computed from the file).

    Returns:
        ``{"train_images", "evaluated_images", "max_distance", "patients": [...], "near_duplicates":
        [{"train", "evaluated", "distance"}, ...]}``.
    """
    both = [replace(s, split="train") for s in train] + [replace(s, split="test") for s in evaluated]
    found = check_samples(both, max_distance=max_distance, read_images=False)
    # Pairs come out as (i, j) with i < j, and training images come first in `both`.
    dups = [{"train": a, "evaluated": b, "distance": d} for a, b, d in found.duplicate_leaks]
    return {"train_images": len(train), "evaluated_images": len(evaluated), "max_distance": max_distance,
            "patients": [p for p, _ in found.patient_leaks], "near_duplicates": dups}


def _section(title: str, text: str, header: list[str], rows: list[list[Any]]) -> list[str]:
    """Markdown lines: a heading, a paragraph and a table whose first column is left-aligned, the rest right."""
    return ["", f"## {title}", "", text, "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 2) + "---|",
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def _per_source(y: np.ndarray, p: np.ndarray, src: np.ndarray, threshold: float) -> dict[str, Any]:
    rows = {}
    for name in ["(all)", *sorted(set(src))]:
        m = np.ones(len(src), dtype=bool) if name == "(all)" else src == name
        b = bootstrap_metrics(y[m], p[m], threshold, n_boot=200)
        rows[name] = {"n": int(m.sum()), "n_covid": int(y[m].sum()), "n_normal": int((y[m] == 0).sum()),
                      "both_classes": bool(0 < y[m].sum() < m.sum()),
                      **{k: b[k] for k in ("sensitivity", "specificity", "roc_auc")}}
    return rows


def _stratified(indices: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``n`` of ``indices``, half per class where possible, sorted."""
    if len(indices) <= n:
        return indices
    by_class = [rng.permutation(indices[labels[indices] == c]) for c in (1, 0)]
    take = min(len(by_class[0]), max(n - len(by_class[1]), n // 2))
    return np.sort(np.r_[by_class[0][:take], by_class[1][:n - take]])


def _input_lungs(predictor: Predictor, samples: Sequence[Sample]) -> np.ndarray | None:
    """Dilated lung masks ``(N, S, S)`` as the network input frames each film; None without a segmenter."""
    if predictor.segmenter is None:
        return None
    maps = [predictor.preprocess.input_lungs(predictor.segmenter(load_image(s.path))) for s in samples]
    return dilate(np.stack(maps) >= 0.5) if maps else np.zeros((0, predictor.preprocess.size, predictor.preprocess.size), bool)


def audit_run(
    run: str | os.PathLike, data: str | None = None, splits: str | None = None, split: str = "test",
    out: str | os.PathLike | None = None, limit: int = 400, probe_limit: int = 2000, cache_dir: str | None = None,
    seed: int = 0, batch_size: int = 32,
) -> dict[str, Any]:
    """Audit the model in ``run`` for shortcut learning on one split; write audit.json, audit.md and PNGs.

    Args:
        run: run folder or ``model.json``.
        data, splits: data to audit; default: the run's own data and split file.
        split: split to audit (``all``: every image, e.g. external data).
        out: output folder; default ``RUN/audit``.
        limit: images explained with Grad-CAM (stratified by class).
        probe_limit: images whose features feed the source probe and the per-source metrics.
        cache_dir: decoded-image cache.
        seed: sampling and fold seed.

    Returns:
        The dict written to audit.json.
    """
    predictor = Predictor(run, backend="torch")
    if predictor.model is None:
        raise DataError("the audit needs the PyTorch model; load the run with backend='torch'")
    model, pre, arch = predictor.model, predictor.preprocess, predictor.meta["arch"]
    out = Path(out) if out else run_dir(run) / "audit"
    own_data = data is None
    data, splits = resolve_data(run, predictor.meta, data, splits)
    samples = load_samples(data, splits)
    evaluated = samples if split == "all" else [s for s in samples if s.split == split]
    if not evaluated:
        raise DataError(f"{data}: no images in split {split!r}")
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in evaluated])
    chosen = _stratified(np.arange(len(evaluated)), labels, probe_limit, rng)
    part = [evaluated[i] for i in chosen]
    part, images, failed = readable_images(part, pre, cache_dir, desc=f"decoding {split}")
    y = np.array([s.label for s in part])
    src = np.array([s.source or "(unknown)" for s in part])
    log.info("audit of %s on %s/%s: %d images (%d COVID-19)", run, data, split, len(part), int(y.sum()))

    logits_np, feats_np = logits_and_features(model, arch, images, pre, batch_size, predictor.device)
    p = covid_probability(logits_np, predictor.temperature)

    report: dict[str, Any] = {
        "positive_class": "covid (COVID-19)", "model": predictor.name, "checkpoint": str(run), "data": str(data),
        "splits": splits, "split": split, "n_images": len(part), "n_unreadable": len(failed),
        "threshold": predictor.threshold, "temperature": predictor.temperature,
        "per_source": _per_source(y, p, src, predictor.threshold),
        "source_probe": source_probe(feats_np, src, y, seed=seed),
    }

    report["leakage"] = _leakage_section(run, predictor.meta, evaluated, split, own_data)

    # Grad-CAM on a stratified subset, each image explained for its own class.
    cam_idx = _stratified(np.arange(len(part)), y, limit, rng)
    cam = _true_class_cams(predictor, images[torch.from_numpy(cam_idx)], y[cam_idx], batch_size)
    mass = border_mass(cam)
    report["gradcam"] = _gradcam_section(predictor, [part[i] for i in cam_idx], cam, mass, y[cam_idx], src[cam_idx])
    report = json_safe(report)

    examples, mean_maps = gradcam_pngs(images[torch.from_numpy(cam_idx)], cam.numpy(), y[cam_idx], p[cam_idx],
                                        mass["border"], BORDER)
    atomic_write_bytes(out / "gradcam_examples.png", examples)
    atomic_write_bytes(out / "gradcam_mean.png", mean_maps)
    atomic_write_text(out / "audit.md", _markdown(report))
    atomic_write_json(out / "audit.json", report)  # last: its presence marks a complete audit
    log.info("wrote shortcut audit to %s", out)
    return report


def _leakage_section(run: str | os.PathLike, meta: dict[str, Any], evaluated: list[Sample], split: str,
                     own_data: bool) -> dict[str, Any]:
    """The run's training images against every evaluated image (not just the sampled ones), or why that was skipped."""
    if own_data and split in ("train", "all"):
        return {"skipped": f"the audited split {split!r} contains the training images"}
    try:
        tdata, tsplits = resolve_data(run, meta)
        train = [s for s in load_samples(tdata, tsplits) if s.split == "train"]
        return leakage(train, evaluated)
    except DataError as e:
        return {"skipped": f"the training data is not available ({e})"}


def _true_class_cams(predictor: Predictor, images: torch.Tensor, y: np.ndarray, batch_size: int) -> torch.Tensor:
    """Grad-CAM maps ``(N, S, S)`` of prepared uint8 ``images``, each explained for its own class ``y``."""
    pre, layer = predictor.preprocess, get_spec(predictor.meta["arch"]).cam_layer
    cams = []
    for start in range(0, len(y), batch_size):
        x = pre.to_tensor(images[start:start + batch_size]).to(predictor.device).contiguous(memory_format=torch.channels_last)
        # Two calls, one per class, keep grad_cam's single-class contract; each batch is one class's rows.
        batch = torch.zeros(len(x), pre.size, pre.size)
        for c in (0, 1):
            rows = np.flatnonzero(y[start:start + batch_size] == c)
            if len(rows):
                batch[torch.from_numpy(rows)] = grad_cam(predictor.model, x[torch.from_numpy(rows)], layer, class_index=c).cpu()
        cams.append(batch)
    return torch.cat(cams) if cams else torch.zeros(0, pre.size, pre.size)


def _gradcam_section(predictor: Predictor, samples: list[Sample], cam: torch.Tensor, mass: dict[str, np.ndarray],
                     y: np.ndarray, src: np.ndarray) -> dict[str, Any]:
    """Where the maps put their mass (lungs, border, corners), per class and per source, for the report."""
    lungs = _input_lungs(predictor, samples)
    inside = lung_mass(cam.numpy(), lungs) if lungs is not None else np.full(len(samples), np.nan)
    by_class = {}
    for c in (1, 0):
        sel = y == c
        b, k, where, lm = mass["border"][sel], mass["corners"][sel], src[sel], inside[sel]
        by_class[CLASS_NAMES[c]] = {"n": int(sel.sum()), "n_empty": int(np.isnan(b).sum()),
                                    "lung_mass": mean_of(lm), "border_mass": mean_of(b), "corner_mass": mean_of(k),
                                    "lung_mass_by_source": {s: mean_of(lm[where == s]) for s in sorted(set(where))},
                                    "by_source": {s: mean_of(b[where == s]) for s in sorted(set(where))}}
    return {"frame": BORDER, "area_share": area_shares(predictor.preprocess.size), "n": len(samples), "by_class": by_class,
            "explained_class": "each image's true class", "layer": get_spec(predictor.meta["arch"]).cam_layer,
            "lung_area_share": None if lungs is None else float(lungs.mean()), "lung_dilation": DILATE}


def _f(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _shares_by_source(shares: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_f(v, '.1%')}" for k, v in shares.items())


def _leakage_sentence(leak: dict[str, Any]) -> str:
    return (f"{leak['train_images']} training vs {leak['evaluated_images']} evaluated images: "
            f"{len(leak['patients'])} shared patients, {len(leak['near_duplicates'])} near-duplicate pairs "
            f"(pHash distance <= {leak['max_distance']}).")


def summary(report: dict[str, Any]) -> list[str]:
    """One-line findings of an audit, for the model card."""
    lines = []
    for name, r in report["per_source"].items():
        if name != "(all)" and r["both_classes"]:
            lines.append(f"Within {name} (both classes, {r['n']} images) ROC-AUC is {format_ci(r['roc_auc'])}.")
    for scope in ("covid", "normal", "all"):
        r = report["source_probe"].get(scope, {})
        if "balanced_accuracy" in r:
            what = "all images" if scope == "all" else f"{scope} images only (source given label)"
            lines.append(f"Source probe on {what}: balanced accuracy {r['balanced_accuracy']:.3f} vs chance "
                         f"{r['chance_balanced_accuracy']:.3f} ({len(r['sources'])} sources, {r['n']} images).")
    leak = report["leakage"]
    if "skipped" in leak:
        lines.append(f"Leakage check skipped: {leak['skipped']}.")
    else:
        lines.append(f"Leakage: {_leakage_sentence(leak)}")
    g = report["gradcam"]
    for c, r in g["by_class"].items():
        if r.get("lung_mass") is not None:
            lines.append(f"Grad-CAM ({c}, {r['n']} images): {r['lung_mass']:.1%} of the map inside the lungs (dilated by "
                         f"{g['lung_dilation']:.0%} of the side; they cover {g['lung_area_share']:.1%} of the input).")
    for c, r in g["by_class"].items():
        if r["border_mass"] is not None:
            lines.append(f"Grad-CAM ({c}, {r['n']} images): {r['border_mass']:.1%} of the map in the outer "
                         f"{g['frame']:.1%} frame (area share {g['area_share']['border']:.1%}), {r['corner_mass']:.1%} in the "
                         f"corners (area {g['area_share']['corners']:.1%}).")
    return lines


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Shortcut audit — {r['model']} on {r['split']}", "",
        f"Positive class: COVID-19. Data `{r['data']}`, split file `{r['splits']}`, split `{r['split']}`: {r['n_images']} "
        f"images ({r['n_unreadable']} unreadable). Threshold {r['threshold']:.3f}, temperature {r['temperature']:.3f}.", "",
        "## Findings", "", *[f"- {line}" for line in summary(r)], "",
        "## Per source", "",
        "Within a source that holds both classes the source cannot give the answer away: that AUC is the fairest "
        "internal number. 95% CIs: 200 bootstrap resamples.", "",
        "| Source | Images | COVID-19 | normal | Sensitivity | Specificity | ROC-AUC |", "|---|---:|---:|---:|---|---|---|",
        *[f"| {n} | {s['n']} | {s['n_covid']} | {s['n_normal']} | {format_ci(s['sensitivity'])} | {format_ci(s['specificity'])} | "
          f"{format_ci(s['roc_auc'])} |" for n, s in r["per_source"].items()], "",
        "## Source probe", "",
        "Cross-validated (5 stratified folds) logistic regression on the pre-logit features, predicting the source. "
        "Within one class (source given label) a score near chance means the features do not encode the hospital; "
        "on all images the source is partly predictable from the label alone.", "",
        "| Images | Sources (n) | Balanced accuracy (folds) | Chance | Accuracy | Majority source |", "|---|---|---|---:|---:|---:|",
    ]
    for scope, p in r["source_probe"].items():
        srcs = ", ".join(f"{k} {v}" for k, v in p["sources"].items())
        if "skipped" in p:
            lines.append(f"| {scope} | {srcs or '–'} | skipped: {p['skipped']} | | | |")
            continue
        folds = ", ".join(f"{v:.2f}" for v in p["fold_balanced_accuracy"])
        lines.append(f"| {scope} | {srcs} | **{p['balanced_accuracy']:.3f}** ({folds}) | {p['chance_balanced_accuracy']:.3f} | "
                     f"{p['accuracy']:.3f} | {p['majority_accuracy']:.3f} |")
    leak = r["leakage"]
    lines += ["", "## Leakage between training and evaluated images", ""]
    if "skipped" in leak:
        lines.append(f"Skipped: {leak['skipped']}.")
    else:
        lines.append(_leakage_sentence(leak))
        lines += [f"- `{d['train']}` ~ `{d['evaluated']}` (distance {d['distance']})" for d in leak["near_duplicates"][:20]]
        lines += [f"- patient {p}" for p in leak["patients"][:20]]
    g = r["gradcam"]
    if g.get("lung_area_share") is not None:
        lines += _section(
            "Grad-CAM inside the lungs",
            f"Share of each map's mass inside the lungs as the network input frames them (the lung segmenter's mask, "
            f"dilated by {g['lung_dilation']:.0%} of the side), averaged per class over {g['n']} images. The lungs cover "
            f"{g['lung_area_share']:.1%} of the input: a map that ignored them would score about that.",
            ["Class", "Images", "Mass inside the lungs", "By source"],
            [[c, cls["n"], f"**{_f(cls['lung_mass'], '.1%')}**", _shares_by_source(cls["lung_mass_by_source"])]
             for c, cls in g["by_class"].items()])
    lines += _section(
        "Grad-CAM location",
        f"Share of each map's mass (layer `{g['layer']}`, {g['explained_class']}) in the outer {g['frame']:.1%} frame and "
        f"the four corner squares, averaged per class over {g['n']} images. A map spread evenly scores the area share: "
        f"frame {g['area_share']['border']:.1%}, corners {g['area_share']['corners']:.1%}.",
        ["Class", "Images (no evidence)", "Frame mass", "Corner mass", "Frame mass by source"],
        [[c, f"{s['n']} ({s['n_empty']})", _f(s["border_mass"], ".1%"), _f(s["corner_mass"], ".1%"), _shares_by_source(s["by_source"])]
         for c, s in g["by_class"].items()])
    lines += ["", "![Mean Grad-CAM per class](gradcam_mean.png)", "", "![Grad-CAM examples](gradcam_examples.png)", ""]
    return "\n".join(lines)
