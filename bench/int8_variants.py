"""Why the shipped model has no int8 graph: quantisation variants against its parity limits.

`covidxray export --int8` (static QDQ, per-channel int8 weights, symmetric int8 activations, 300
calibration films) must keep the test split's ROC-AUC within 0.002 and >= 99 % of decisions at the
stored threshold, or it refuses. This tries the usual remedies on a run and reports both numbers for
each, against the PyTorch model:

    .venv/bin/python bench/int8_variants.py [--run src/covidxray/bundled] [--calibration 300]

Writes bench/results/int8-variants.json and its table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging

import onnx

from common import save
from covidxray.checkpoint import default_model_path, load_model, resolve_data
from covidxray.data import load_samples
from covidxray.export import (INT8_MAX_AUC_DROP, INT8_MIN_AGREEMENT, calibration_inputs, classifier_onnx, int8_parity,
                              quantise)
from covidxray.predictor import Predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(default_model_path()))
    ap.add_argument("--calibration", type=int, default=300, help="training films used for calibration")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    model, meta = load_model(args.run)
    blob = classifier_onnx(model, meta, 17)
    pred = Predictor(args.run, backend="torch", gate=False)
    samples = load_samples(*resolve_data(args.run, meta))
    x = calibration_inputs(pred, samples, args.calibration)
    nodes = onnx.load_from_string(blob).graph.node
    convs = [n.name for n in nodes if n.op_type == "Conv"]
    head = [n.name for n in nodes if n.op_type in ("Gemm", "MatMul")][-1:]
    sym = {"activation_type": "QInt8", "extra_options": {"ActivationSymmetric": True}}
    variants = {
        "shipped rule: symmetric int8 activations, MinMax": sym,
        "asymmetric uint8 activations": {"activation_type": "QUInt8"},
        "symmetric, moving-average MinMax": {**sym, "extra_options": {"ActivationSymmetric": True, "CalibMovingAverage": True}},
        "symmetric, first 3 convs and head in float": {**sym, "nodes_to_exclude": convs[:3] + head},
    }
    results, rows = {}, []
    for name, options in variants.items():
        r = int8_parity(pred, quantise(blob, x, **options), samples)
        r["passes"] = r["roc_auc_drop"] <= INT8_MAX_AUC_DROP and r["agreement"] >= INT8_MIN_AGREEMENT
        results[name] = r
        rows.append(f"| {name} | {r['roc_auc_torch']:.4f} → {r['roc_auc_int8']:.4f} | {r['agreement']:.2%} | "
                    f"{'yes' if r['passes'] else 'no'} |")
        print(rows[-1], flush=True)
    table = ["| variant | test ROC-AUC, PyTorch → int8 | decisions unchanged | within limits |", "|---|---:|---:|---|", *rows,
             "", f"Limits: ROC-AUC drop ≤ {INT8_MAX_AUC_DROP}, ≥ {INT8_MIN_AGREEMENT:.0%} of decisions unchanged at the "
             f"stored threshold; {len(x)} calibration films; model {pred.name}."]
    save("int8-variants", {"title": "int8 quantisation variants of the shipped model", "table": table,
                           "results": results, "command": "python bench/int8_variants.py"})


if __name__ == "__main__":
    main()
