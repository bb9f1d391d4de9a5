#!/usr/bin/env bash
# Retrain the bundled model from scratch on the committed split (temperature and threshold are fitted on
# validation at the end of training), evaluate it on validation and test, audit it for shortcuts,
# copy it to models/default and regenerate its model card (Markdown + HTML). Wall time goes to bench/results/train_default.json.
#   bash bench/train_default.sh            (about 15 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${COVIDXRAY_DATA:-../shared/datasets/covid-cxr}
RUN=${RUN:-runs/default}
CX=.venv/bin/covidxray
export MALLOC_MMAP_MAX_=${MALLOC_MMAP_MAX_:-0}
rm -rf "$RUN"
start=$(date +%s.%N)
$CX train --data "$DATA/manifest.csv" --splits splits/covid-cxr.csv --out "$RUN" --recipe default --seed 0
end=$(date +%s.%N)
$CX evaluate "$RUN" --split val
$CX evaluate "$RUN" --split test
$CX audit "$RUN"
rm -rf models/default && mkdir -p models/default
cp "$RUN"/{model.json,model.safetensors,history.csv,curves.png,splits.csv} models/default/ 2>/dev/null || \
  cp "$RUN"/{model.json,model.safetensors,history.csv,curves.png} models/default/
for s in val test; do
  mkdir -p "models/default/eval-$s"
  cp "$RUN/eval-$s"/{report.json,report.md,roc.png,pr.png,confusion_matrix.png,reliability.png} "models/default/eval-$s/"
done
cp -r "$RUN/audit" models/default/
$CX card models/default --out models/MODEL_CARD.md
.venv/bin/python - "$start" "$end" <<'PY'
import json, os, platform, sys
start, end = map(float, sys.argv[1:3])
r = json.load(open("models/default/eval-test/report.json"))
out = {"wall_seconds": round(end - start, 1), "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
       "test": {k: v for k, v in r["metrics"].items()}, "command": "bash bench/train_default.sh"}
os.makedirs("bench/results", exist_ok=True)
json.dump(out, open("bench/results/train_default.json", "w"), indent=2)
print(f"trained in {out['wall_seconds'] / 60:.1f} min; test ROC-AUC {r['metrics']['roc_auc']['value']:.4f}")
PY
