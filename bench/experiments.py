"""Record model-selection runs (validation metrics only) in bench/results/experiments.json and docs/benchmarks.md.

    .venv/bin/python bench/experiments.py RUN_DIR [RUN_DIR ...] [--note "what changed"]

Each run keeps one row keyed by its folder name; rerunning replaces the row. Only validation
numbers are recorded here: the test split is not used to choose models.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, save


def summarise(run: Path, note: str) -> dict:
    meta = json.loads((run / "model.json").read_text())
    history = json.loads((run / "history.json").read_text())
    cfg = meta["train_config"]
    return {
        "run": run.name, "arch": cfg["arch"], "size": cfg["size"], "recipe": cfg["recipe"], "weights": cfg["weights"],
        "freeze": cfg["freeze"], "equalize": cfg["equalize"], "augment": cfg["augment"], "ema": cfg.get("ema", 0),
        "epochs_run": len(history), "best_epoch": meta["epoch"], "val_auc": meta["val_auc"],
        "train_minutes": round(meta.get("train_seconds", 0) / 60, 1),
        "img_per_s": round(sum(h["img_per_s"] for h in history) / len(history), 1), "note": note,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    path = RESULTS / "experiments.json"
    rows = {r["run"]: r for r in json.loads(path.read_text()).get("rows", [])} if path.is_file() else {}
    for run in args.runs:
        rows[run.name] = summarise(run, args.note)
    ordered = sorted(rows.values(), key=lambda r: -r["val_auc"])
    table = ["| Run | Arch | Size | Recipe | Frozen | Equalise | Augment | EMA | Epochs (best) | Val ROC-AUC | Train min | Img/s | Note |",
             "|---|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    table += [f"| {r['run']} | {r['arch']} | {r['size']} | {r['recipe']} | {r['freeze']} | {r['equalize']} | {r['augment']} | "
              f"{r['ema']} | {r['epochs_run']} ({r['best_epoch']}) | {r['val_auc']:.4f} | {r['train_minutes']} | {r['img_per_s']} | "
              f"{r['note']} |" for r in ordered]
    table.append("\nValidation split of `splits/covid-cxr.csv` (1,112 images). Wall times were measured while other work "
                 "shared the 2 cores unless the note says otherwise.")
    save("experiments", {"title": "Model selection runs (validation only)", "rows": ordered, "table": table,
                         "command": "python bench/experiments.py RUN_DIR ..."})
    print("\n".join(table))


if __name__ == "__main__":
    main()
