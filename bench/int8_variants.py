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
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from sklearn.metrics import roc_auc_score

from common import save
from covidxray.checkpoint import default_model_path, load_model, resolve_data
from covidxray.data import load_samples
from covidxray.export import INT8_MAX_AUC_DROP, INT8_MIN_AGREEMENT, _onnx_bytes, _WithFeatures
from covidxray.inference import readable_images
from covidxray.models import get_spec
from covidxray.predictor import Predictor


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray) -> None:
        self.batches = iter([{"image": x[i:i + 16]} for i in range(0, len(x), 16)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(default_model_path()))
    ap.add_argument("--calibration", type=int, default=300, help="training films used for calibration")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    model, meta = load_model(args.run)
    size = meta["preprocess"]["size"]
    blob = _onnx_bytes(_WithFeatures(model, get_spec(meta["arch"]).head), (torch.zeros(1, 1, size, size),),
                       ["image"], ["logits", "features"], 17)
    pred = Predictor(args.run, backend="torch", gate=False)
    samples = load_samples(*resolve_data(args.run, meta))
    train = [s for s in samples if s.split == "train"]
    picks = [train[i] for i in np.random.default_rng(0).permutation(len(train))[:args.calibration]]
    xc = pred.preprocess.to_tensor(readable_images(picks, pred.preprocess, desc="calibration")[1]).numpy()
    test, images, _ = readable_images([s for s in samples if s.split == "test"], pred.preprocess, desc="test")
    xt, y = pred.preprocess.to_tensor(images).numpy(), np.array([s.label for s in test])
    p_torch = pred.predict_prepared(images)
    convs = [n.name for n in onnx.load_from_string(blob).graph.node if n.op_type == "Conv"]
    head = [n.name for n in onnx.load_from_string(blob).graph.node if n.op_type in ("Gemm", "MatMul")][-1:]
    sym = {"activation_type": QuantType.QInt8, "extra_options": {"ActivationSymmetric": True}}
    variants = {
        "shipped rule: symmetric int8 activations, MinMax": (sym, CalibrationMethod.MinMax),
        "asymmetric uint8 activations": ({"activation_type": QuantType.QUInt8}, CalibrationMethod.MinMax),
        "symmetric, moving-average MinMax": ({**sym, "extra_options": {"ActivationSymmetric": True, "CalibMovingAverage": True}},
                                             CalibrationMethod.MinMax),
        "symmetric, first 3 convs and head in float": ({**sym, "nodes_to_exclude": convs[:3] + head}, CalibrationMethod.MinMax),
    }
    results, rows = {}, []
    for name, (options, method) in variants.items():
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(blob)
            quantize_static(str(src), str(dst), _Reader(xc), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, calibrate_method=method, **options)
            session = ort.InferenceSession(dst.read_bytes(), providers=["CPUExecutionProvider"])
        logits = np.concatenate([session.run(["logits"], {"image": xt[i:i + 64]})[0] for i in range(0, len(xt), 64)])
        p8 = torch.softmax(torch.from_numpy(logits) / pred.temperature, 1)[:, 1].numpy()
        r = {"roc_auc_torch": float(roc_auc_score(y, p_torch)), "roc_auc_int8": float(roc_auc_score(y, p8)),
             "agreement": float(((p_torch >= pred.threshold) == (p8 >= pred.threshold)).mean())}
        r["passes"] = r["roc_auc_torch"] - r["roc_auc_int8"] <= INT8_MAX_AUC_DROP and r["agreement"] >= INT8_MIN_AGREEMENT
        results[name] = r
        rows.append(f"| {name} | {r['roc_auc_torch']:.4f} → {r['roc_auc_int8']:.4f} | {r['agreement']:.2%} | "
                    f"{'yes' if r['passes'] else 'no'} |")
        print(rows[-1], flush=True)
    table = ["| variant | test ROC-AUC, PyTorch → int8 | decisions unchanged | within limits |", "|---|---:|---:|---|", *rows,
             "", f"Limits: ROC-AUC drop ≤ {INT8_MAX_AUC_DROP}, ≥ {INT8_MIN_AGREEMENT:.0%} of decisions unchanged at the "
             f"stored threshold; {len(xc)} calibration films; model {pred.name}."]
    save("int8-variants", {"title": "int8 quantisation variants of the shipped model", "table": table,
                           "results": results, "command": "python bench/int8_variants.py"})


if __name__ == "__main__":
    main()
