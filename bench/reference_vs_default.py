"""Train the reference recipe and the default recipe on the same split; one side-by-side table.

    .venv/bin/python bench/reference_vs_default.py            # full runs (reference: ~1.5 h on 2 cores)
    .venv/bin/python bench/reference_vs_default.py --limit 200 --epochs 1 --out runs/smoke   # smoke test

Runs go to OUT/reference and OUT/default. An interrupted run is resumed from its last epoch when
the script is started again; a finished run is reused. The reference recipe has no ImageNet weights
on an offline machine, so it trains from scratch unless --reference-weights points at a file.
Evaluation uses the test split of splits/covid-cxr.csv; COVID-19 is the positive class.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

from common import ROOT, save
from covidxray.config import config_for
from covidxray.engine import train
from covidxray.evaluate import evaluate_run

ROWS = ("accuracy", "sensitivity", "specificity", "ppv", "f1", "roc_auc")


def run_recipe(recipe: str, out: Path, args: argparse.Namespace, **overrides) -> Path:
    """Train ``recipe`` into ``out``, resume it if it was interrupted, or reuse it if it finished."""
    if (out / "model.json").is_file() and "train_seconds" in json.loads((out / "model.json").read_text()):
        return out  # finished: train() records the wall time only at the very end
    if (out / "last.safetensors").is_file():
        return train(config_for(recipe, out=str(out)), resume=True)
    data = Path(os.environ.get("COVIDXRAY_DATA", ROOT.parent / "shared" / "datasets" / "covid-cxr")) / "manifest.csv"
    cfg = config_for(recipe, data=str(data), splits=str(ROOT / "splits" / "covid-cxr.csv"), out=str(out),
                     limit=args.limit, epochs=args.epochs, **overrides)
    return train(cfg)


def _history(run: Path) -> list[dict]:
    """Per-epoch history; the bundled model ships only history.csv."""
    if (run / "history.json").is_file():
        return json.loads((run / "history.json").read_text())
    with open(run / "history.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "side-by-side")
    ap.add_argument("--reference-weights", default="none", help="'none' (offline default), 'imagenet' or a file")
    ap.add_argument("--limit", type=int, help="images per split (smoke tests only)")
    ap.add_argument("--epochs", type=int, help="override both recipes' epochs (smoke tests only)")
    args = ap.parse_args()
    runs = {
        "reference (ResNet18 224 px, Adam, StepLR, 15 ep.)": run_recipe("reference", args.out / "reference", args, weights=args.reference_weights),
        "default (EfficientNet-Lite0 192 px)": run_recipe("default", args.out / "default", args),
    }
    results = {}
    for name, run in runs.items():
        report = evaluate_run(run, split="test", out=run / "eval-test")
        meta = json.loads((run / "model.json").read_text())
        history = _history(run)
        results[name] = {
            "metrics": report["metrics"], "n": report["n"], "train_minutes": meta.get("train_seconds", 0) / 60,
            "img_per_s": sum(h["img_per_s"] for h in history) / len(history), "epochs": len(history),
            "weights": meta["train_config"]["weights"], "size_mb": (run / "model.safetensors").stat().st_size / 2**20,
        }
    names = list(results)
    table = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in ROWS:
        table.append(f"| {key} | " + " | ".join(
            f"{r['metrics'][key]['value']:.4f} ({r['metrics'][key]['ci_low']:.4f}–{r['metrics'][key]['ci_high']:.4f})"
            for r in results.values()) + " |")
    for label, fmt in (("training wall time (min)", "{train_minutes:.1f}"), ("train images/s", "{img_per_s:.1f}"),
                       ("epochs run", "{epochs}"), ("pretrained weights", "{weights}"), ("model size (MB)", "{size_mb:.1f}")):
        table.append(f"| {label} | " + " | ".join(fmt.format(**r) for r in results.values()) + " |")
    n = next(iter(results.values()))["n"]
    table.append(f"\nTest split of splits/covid-cxr.csv ({n} images), 95% bootstrap CIs; COVID-19 is the positive class."
                 + (f" SMOKE TEST (limit {args.limit}, epochs {args.epochs}) — not a result." if args.limit or args.epochs else ""))
    save("reference_vs_default" + ("_smoke" if args.limit or args.epochs else ""),
         {"title": "Reference recipe vs default recipe", "results": results, "table": table,
          "command": "python bench/reference_vs_default.py"})
    print("\n".join(table))


if __name__ == "__main__":
    main()
