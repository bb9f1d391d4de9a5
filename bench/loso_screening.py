"""The recipes screened with JSRT held out, side by side, and how their JSRT specificity depends on the threshold rule.

For every ``bench/results/loso-NAME.json`` with a JSRT hold-out, the run ``runs/loso/NAME/jsrt`` (made by
``bench/loso.py``) is scored again on JSRT's 92 normal films at two thresholds, both chosen on validation:
the stored one (Youden's J) and the highest one that reaches 0.90 validation sensitivity. A recipe whose
specificity holds at both is less likely to owe it to a lucky threshold.

    .venv/bin/python bench/loso_screening.py

Writes bench/results/loso-screening.json and its table in docs/benchmarks.md.
"""

from __future__ import annotations

import json


from common import ROOT, save
from loso import heldout_samples
from covidxray.cache import readable_images
from covidxray.inference import predict_probs
from covidxray.predictor import Predictor


def main() -> None:
    rows, results = [], {}
    samples = heldout_samples("jsrt")
    for f in sorted((ROOT / "bench" / "results").glob("loso-*.json")):
        data = json.loads(f.read_text())
        name = f.stem.removeprefix("loso-")
        run = ROOT / "runs" / "loso" / name / "jsrt"
        if "jsrt" not in data.get("results", {}) or not (run / "model.json").is_file():
            continue
        p = Predictor(run, backend="torch", gate=False)
        _, images, _ = readable_images(samples, p.preprocess, desc=f"jsrt {name}")
        prob = predict_probs(p.model, images, p.preprocess, temperature=p.temperature)
        t90 = p.meta["sensitivity_thresholds"]["0.90"]
        r = data["results"]["jsrt"]
        results[name] = {"val_auc": p.meta["val_auc"], "internal_auc": r["internal_test"]["roc_auc"]["value"],
                         "internal_sensitivity": r["internal_test"]["sensitivity"]["value"],
                         "spec_youden": float((prob < p.threshold).mean()), "threshold_youden": p.threshold,
                         "spec_sens90": float((prob < t90).mean()), "threshold_sens90": t90, "command": data["command"]}
    for name, r in sorted(results.items(), key=lambda kv: -min(kv[1]["spec_youden"], kv[1]["spec_sens90"])):
        rows.append(f"| {name} | {r['val_auc']:.4f} | {r['internal_auc']:.3f} | {r['internal_sensitivity']:.3f} | "
                    f"{r['spec_youden']:.3f} ({r['threshold_youden']:.2f}) | {r['spec_sens90']:.3f} ({r['threshold_sens90']:.2f}) |")
    table = ["| recipe (bench/results/loso-NAME.json) | validation AUC | internal test AUC | internal sensitivity | "
             "JSRT specificity at Youden threshold | JSRT specificity at 0.90 validation sensitivity |",
             "|---|---:|---:|---:|---:|---:|", *rows, "",
             "JSRT held out (92 normal films from Japan; no JSRT film in training). Thresholds in brackets, both chosen "
             "on validation. Each recipe's command is under its own table below (the runs used `--segmenter` with a "
             "folder byte-identical to the bundled segmenter and a local `--cache-dir`; the commands omit both)."]
    save("loso-screening", {"title": "Leave one source out: recipes screened with JSRT held out", "table": table,
                            "results": results, "command": "python bench/loso_screening.py"})
    print("\n".join(table))


if __name__ == "__main__":
    main()
