"""Leave-one-source-out (LOSO): how the recipe does on an origin it never saw in training.

For each held-out source the recipe is trained without it (threshold chosen on the validation
split, as always), then scored on every film of that source: specificity on a normal-only origin
(``jsrt``, 92 adult normals from Japan), sensitivity on a COVID-19-only origin (``covid-cxnet``,
``ieee8023``'s COVID-19 films), with 95% bootstrap CIs, next to the internal test metrics of the
same run (the test split minus the held-out source). This, with validation, is how the shipped
recipe is chosen; the internal test split never is.

    .venv/bin/python bench/loso.py --name default-lungs -- --lung-crop --size 160     # train flags after --
    .venv/bin/python bench/loso.py --name X --holdouts jsrt                          # one hold-out only

``--jsrt-normals`` adds JSRT's normal films (split by patient as the segmenter's JSRT split) to
the data, except when JSRT itself is held out. Runs go to runs/loso/NAME/HOLDOUT (resumable: a
finished run is reused); results to bench/results/loso-NAME.json and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from dataclasses import fields
from pathlib import Path

import numpy as np

from common import ROOT, save
from covidxray.cli.run_commands import train_flags
from covidxray.config import TrainConfig, config_for
from covidxray.data import load_samples
from covidxray.engine import train
from covidxray.evaluate import evaluate_run
from covidxray.cache import readable_images
from covidxray.inference import predict_probs
from covidxray.metrics import bootstrap_metrics, format_ci
from covidxray.predictor import Predictor
from covidxray.utils import atomic_write_text

SHARED = Path(os.environ.get("COVIDXRAY_DATA", ROOT.parent / "shared" / "datasets" / "covid-cxr")).parent
HOLDOUTS = {"jsrt": "specificity", "covid-cxnet": "sensitivity", "ieee8023": "sensitivity"}


def jsrt_rows() -> list[list[str]]:
    """JSRT normal films as manifest rows, split by patient (70/15/15, seed 0, like the segmenter's split)."""
    rows = [r for r in csv.DictReader(open(SHARED / "jsrt" / "manifest.csv")) if r["label"] == "normal"]
    order = np.random.default_rng(0).permutation(len(rows))
    cut = (round(0.7 * len(rows)), round(0.85 * len(rows)))
    split = {int(j): ("train" if k < cut[0] else "val" if k < cut[1] else "test") for k, j in enumerate(order)}
    return [[str(SHARED / "jsrt" / r["path"]), "normal", "jsrt", r["patient_id"], split[i], r["phash"]] for i, r in enumerate(rows)]


def manifest_without(holdout: str, jsrt_normals: bool, out: Path) -> Path:
    """covid-cxr (with its committed split) minus ``holdout``, plus JSRT normals if asked and not held out."""
    samples = load_samples(SHARED / "covid-cxr" / "manifest.csv", ROOT / "splits" / "covid-cxr.csv")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "source", "patient_id", "split", "phash"])
    w.writerows([str(s.path), s.label_name, s.source, s.patient_id, s.split, s.phash] for s in samples if s.source != holdout)
    if jsrt_normals and holdout != "jsrt":
        w.writerows(jsrt_rows())
    atomic_write_text(out, buf.getvalue())
    return out


def heldout_samples(holdout: str):
    if holdout == "jsrt":
        rows = [r for r in csv.DictReader(open(SHARED / "jsrt" / "manifest.csv")) if r["label"] == "normal"]
        buf = "path,label,source\n" + "".join(f"{SHARED / 'jsrt' / r['path']},normal,jsrt\n" for r in rows)
        tmp = ROOT / "runs" / "loso" / "jsrt-normals.csv"
        atomic_write_text(tmp, buf)
        return load_samples(tmp)
    return [s for s in load_samples(SHARED / "covid-cxr" / "manifest.csv") if s.source == holdout and s.label == 1]


def finished(run: Path) -> bool:
    return (run / "model.json").is_file() and "train_seconds" in json.loads((run / "model.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="name of this recipe variant (runs/loso/NAME, loso-NAME.json)")
    ap.add_argument("--holdouts", default=",".join(HOLDOUTS), help=f"comma-separated, from {', '.join(HOLDOUTS)}")
    ap.add_argument("--jsrt-normals", action="store_true", help="train with JSRT normals (never when JSRT is held out)")
    ap.add_argument("--recipe", default="default")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: covidxray train flags")
    args = ap.parse_args()
    flags = argparse.ArgumentParser(add_help=False)
    train_flags(flags)
    extra = flags.parse_args([a for a in args.train_args if a != "--"])
    overrides = {f.name: getattr(extra, f.name) for f in fields(TrainConfig) if f.name not in ("recipe", "data", "splits", "out")}
    results = {}
    for holdout in args.holdouts.split(","):
        run = ROOT / "runs" / "loso" / args.name / holdout
        if not finished(run):
            data = manifest_without(holdout, args.jsrt_normals, ROOT / "runs" / "loso" / args.name / f"data-without-{holdout}.csv")
            cfg = config_for(args.recipe, data=str(data), out=str(run), **overrides)
            train(cfg, resume=(run / "last.safetensors").is_file())
        predictor = Predictor(run)
        samples, images, _ = readable_images(heldout_samples(holdout), predictor.preprocess, desc=f"decoding {holdout}")
        p = predict_probs(predictor.model, images, predictor.preprocess, temperature=predictor.temperature)
        boot = bootstrap_metrics([s.label for s in samples], p, predictor.threshold, n_boot=2000)
        internal = evaluate_run(run, split="test", n_boot=500)
        metric = HOLDOUTS[holdout]
        results[holdout] = {"metric": metric, "n": len(samples), "value": boot[metric], "threshold": predictor.threshold,
                            "val_auc": predictor.meta.get("val_auc"),
                            "internal_test": {k: internal["metrics"][k] for k in ("roc_auc", "sensitivity", "specificity")},
                            "train_minutes": predictor.meta.get("train_seconds", 0) / 60}
        print(f"{holdout}: {metric} {format_ci(boot[metric])} on {len(samples)} films; internal test ROC-AUC "
              f"{format_ci(internal['metrics']['roc_auc'])}", flush=True)
    table = ["| held-out source (films) | metric on it, 95% CI | internal test ROC-AUC | internal sensitivity | "
             "internal specificity | validation AUC |", "|---|---|---|---|---|---:|"]
    for h, r in results.items():
        it = r["internal_test"]
        table.append(f"| {h} ({r['n']} {'normal' if r['metric'] == 'specificity' else 'COVID-19'}) | {r['metric']} "
                     f"**{format_ci(r['value'])}** | {format_ci(it['roc_auc'])} | {format_ci(it['sensitivity'])} | "
                     f"{format_ci(it['specificity'])} | {r['val_auc']:.4f} |")
    command = "python bench/loso.py --name " + args.name + (" --jsrt-normals" if args.jsrt_normals else "") + \
        (f" --recipe {args.recipe}" if args.recipe != "default" else "") + \
        (" -- " + " ".join(a for a in args.train_args if a != "--") if args.train_args else "")
    save(f"loso-{args.name}", {"title": f"Leave one source out: {args.name}", "table": table, "results": results,
                               "command": command, "overrides": {k: v for k, v in overrides.items() if v is not None}})
    print("\n".join(table))


if __name__ == "__main__":
    main()
