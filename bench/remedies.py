"""Remedies against shortcut learning: small comparable runs, each audited on the validation split.

    .venv/bin/python bench/remedies.py                       # 3 runs at 96 px, 3 epochs (~50 min on 2 shared cores)
    .venv/bin/python bench/remedies.py --smoke --out runs/remedies-smoke   # 120 images, 1 epoch: a smoke test

Every run is the default recipe at 96 px for 3 epochs with the same seed, on the same random
1,000 images of the training split of splits/covid-cxr.csv (CPU time on the shared 2 cores is
scarce: the runs are for comparing remedies, not for shipping); only the remedy differs:

* ``baseline`` — nothing changed.
* ``mask-border`` — an outer frame (``--mask`` of each side) is blanked before equalisation, in
  training and serving alike (`Preprocess.mask_border`): burned-in text, markers and film edges sit there.
* ``two-class-sources`` — training without single-class sources: only sources whose minority class
  is at least 10% of their images are trained on (radiography-db), so no source can stand in for a label
  during training. Validation keeps every source, which makes the other sources unseen ones.

Each run is then audited on the whole validation split (1,112 images) (`covidxray.audit.audit_run`): validation AUC, AUC
within radiography-db, the source probe within the COVID-19 class (source given label) and the
Grad-CAM mass in the outer 12.5% frame. Only validation data is used: the test split is not used
to choose between remedies. Results: bench/results/remedies.json and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from collections import Counter
from pathlib import Path

from common import RESULTS, ROOT, machine, render_docs
from covidxray.audit import audit_run
from covidxray.data import load_samples
from covidxray.config import config_for
from covidxray.engine import train
from covidxray.utils import atomic_write_json, atomic_write_text

MIN_MINORITY = 0.10  # a source whose rarer class is below this share counts as single-class


def two_class_manifest(manifest: Path, splits: Path, out: Path) -> Path:
    """A manifest (with a split column) whose training rows come only from sources that hold both classes."""
    samples = load_samples(manifest, splits)
    counts = Counter((s.source, s.label) for s in samples)
    sources = {s.source for s in samples}
    keep = {src for src in sources if min(counts[(src, 0)], counts[(src, 1)]) >= MIN_MINORITY * (counts[(src, 0)] + counts[(src, 1)])}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "source", "patient_id", "split", "phash"])
    writer.writerows([str(s.path), s.label_name, s.source, s.patient_id, s.split, s.phash]
                     for s in samples if s.split != "train" or s.source in keep)
    atomic_write_text(out, buf.getvalue())
    return out


def finished(run: Path) -> bool:
    return (run / "model.json").is_file() and "train_seconds" in json.loads((run / "model.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "remedies")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=1000, help="at most this many images per split (default 1000)")
    ap.add_argument("--smoke", action="store_true", help="120 images per split, 1 epoch: checks the script, not a result")
    ap.add_argument("--mask", type=float, default=0.1, help="border fraction blanked by the mask-border remedy")
    ap.add_argument("--gradcam-limit", type=int, default=300)
    args = ap.parse_args()
    if args.smoke:
        args.limit, args.epochs, args.gradcam_limit = 120, 1, 40
    data = Path(os.environ.get("COVIDXRAY_DATA", ROOT.parent / "shared" / "datasets" / "covid-cxr")) / "manifest.csv"
    splits = ROOT / "splits" / "covid-cxr.csv"
    args.out.mkdir(parents=True, exist_ok=True)
    variants = {
        "baseline": dict(data=str(data), splits=str(splits)),
        "mask-border": dict(data=str(data), splits=str(splits), mask_border=args.mask),
        "two-class-sources": dict(data=str(two_class_manifest(data, splits, args.out / "two-class-sources.csv"))),
    }
    results = {}
    for name, overrides in variants.items():
        run = args.out / name
        if not finished(run):
            if (run / "last.safetensors").is_file():
                train(config_for("default", out=str(run)), resume=True)
            else:
                train(config_for("default", out=str(run), size=args.size, epochs=args.epochs, limit=args.limit,
                                 patience=0, seed=0, **overrides))
        audit = audit_run(run, split="val", out=run / "audit-val", limit=args.gradcam_limit)
        meta = json.loads((run / "model.json").read_text())
        probe, cam = audit["source_probe"], audit["gradcam"]["by_class"]
        results[name] = {
            "val_auc": audit["per_source"]["(all)"]["roc_auc"]["value"], "best_epoch": meta["epoch"], "train_minutes": meta["train_seconds"] / 60,
            "val_auc_radiography_db": audit["per_source"].get("radiography-db", {}).get("roc_auc", {}).get("value"),
            "sensitivity_by_source": {k: v["sensitivity"]["value"] for k, v in audit["per_source"].items()},
            "probe_covid": probe["covid"].get("balanced_accuracy"), "probe_covid_chance": probe["covid"].get("chance_balanced_accuracy"),
            "probe_covid_folds": probe["covid"].get("fold_balanced_accuracy"), "probe_all": probe["all"].get("balanced_accuracy"),
            "border_covid": cam["covid"]["border_mass"], "border_normal": cam["normal"]["border_mass"],
            "corners_covid": cam["covid"]["corner_mass"], "corners_normal": cam["normal"]["corner_mass"],
            "ece_val": meta["calibration"]["ece_after"], "temperature": meta["temperature"],
            "config": {k: meta["train_config"][k] for k in ("size", "epochs", "seed", "mask_border", "limit")},
        }
        print(name, json.dumps(results[name], indent=1), flush=True)

    f = lambda x, spec=".3f": "n/a" if x is None else format(x, spec)  # noqa: E731
    area = audit["gradcam"]["area_share"]["border"]
    table = ["| Run | Val ROC-AUC | Val AUC within radiography-db | Sensitivity covid-cxnet / ieee8023 | "
             "Source probe, COVID-19 only (chance) | Source probe, all | Frame mass COVID-19 / normal | Val ECE |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        sens = r["sensitivity_by_source"]
        table.append(f"| {name} | {f(r['val_auc'])} | {f(r['val_auc_radiography_db'])} | "
                     f"{f(sens.get('covid-cxnet'))} / {f(sens.get('ieee8023'))} | {f(r['probe_covid'])} ({f(r['probe_covid_chance'])}) | "
                     f"{f(r['probe_all'])} | {f(r['border_covid'], '.1%')} / {f(r['border_normal'], '.1%')} | {f(r['ece_val'])} |")
    smoke = " SMOKE TEST — not a result." if args.smoke else ""
    table.append(f"\nDefault recipe at {args.size} px, {args.epochs} epochs, seed 0, at most {args.limit} training images "
                 f"(the same ones where the remedy allows), same split; validation split of "
                 f"splits/covid-cxr.csv only (the test split is not used to choose remedies). Source probe: 5-fold "
                 f"logistic regression on pre-logit features predicting the source, balanced accuracy. Frame mass: share "
                 f"of the Grad-CAM map (true class) in the outer 12.5% frame; a uniform map scores {area:.1%}. "
                 f"mask-border blanks {args.mask:.0%} of each side. COVID-19 is the positive class.{smoke}")
    name = "remedies" + ("_smoke" if args.smoke else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / f"{name}.json", {
        "machine": machine(), "title": "Shortcut remedies (validation only)", "results": results, "table": table,
        "command": "python bench/remedies.py"})
    render_docs()
    print("\n".join(table))


if __name__ == "__main__":
    main()
