"""int8 variants of a model against its parity limits, with the speed of each beside the float graph's.

`covidxray export --int8` must keep ROC-AUC within 0.002 and >= 99 % of decisions at the stored
threshold against PyTorch, or it refuses. This scores each variant on the run's test split and on
the validation films of every shared origin (bench/origins.py: covid-cxr's sources, JSRT,
Shenzhen, Montgomery; ROC-AUC only where an origin gives both classes), and times the float and
the int8 graph at batch 32 in the same run (ONNX Runtime, one thread, interleaved, median of 10):

    .venv/bin/python bench/int8_variants.py [--run src/covidxray/bundled] [--calibration 300]

Writes bench/results/int8-variants.json and its table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.metrics import roc_auc_score

from common import ROOT, save
from covidxray.cache import readable_images
from covidxray.checkpoint import default_model_path, load_model, resolve_data
from covidxray.data import load_samples
from covidxray.export import (INT8_FLOAT_CONVOLUTIONS, INT8_MAX_AUC_DROP, INT8_MIN_AGREEMENT, bias_corrected, calibration_inputs, classifier_onnx,
                              quantise)
from covidxray.predictor import Predictor
from origins import pooled_rows, write_manifest

PCT = {"calibrate_method": "Percentile", "extra_options": {"CalibPercentile": 99.999}}


def _films(pred: Predictor, samples: list) -> dict[str, np.ndarray]:
    """Network inputs, labels, sources and PyTorch's P(covid) of ``samples``."""
    kept, images, _ = readable_images(samples, pred.preprocess, desc="decoding")
    return {"x": pred.preprocess.to_tensor(images).numpy(), "y": np.array([s.label for s in kept]),
            "source": np.array([s.source for s in kept]), "p": pred.predict_prepared(images)}


def _session(blob: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])


def _compare(pred: Predictor, session: ort.InferenceSession, films: dict[str, np.ndarray]) -> dict:
    x, y, p = films["x"], films["y"], films["p"]
    logits = np.concatenate([session.run(["logits"], {"image": x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    q = torch.softmax(torch.from_numpy(logits) / pred.temperature, dim=1)[:, 1].numpy()
    same = (p >= pred.threshold) == (q >= pred.threshold)
    drop = float(roc_auc_score(y, p) - roc_auc_score(y, q)) if len(set(y)) == 2 else None
    return {"images": len(y), "agreement": float(same.mean()), "flipped": int((~same).sum()), "roc_auc_drop": drop,
            "median_abs_dp": float(np.median(np.abs(q - p)))}


def _speed(blobs: dict[str, bytes], x: np.ndarray, reps: int = 10) -> dict[str, float]:
    """Images per second at batch ``len(x)``, one thread, the graphs run in turn (same load for each)."""
    sessions = {k: _session(b) for k, b in blobs.items()}
    for s in sessions.values():
        s.run(None, {"image": x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, {"image": x})
            times[k].append(time.perf_counter() - t)
    return {k: len(x) / float(np.median(v)) for k, v in times.items()}


def _variants(blob: bytes, corrected: bytes, shipped: bytes) -> dict[str, tuple[bytes, dict]]:
    names = [n.name for n in onnx.load_from_string(blob).graph.node if n.op_type in ("Conv", "Gemm")]
    sym = {"activation_type": "QInt8", "extra_options": {"ActivationSymmetric": True}}
    return {
        "symmetric int8 activations, MinMax (the rule before)": (blob, sym),
        "asymmetric uint8 activations, MinMax": (blob, {}),
        "uint8, Percentile 99.999": (blob, PCT),
        "bias-corrected, uint8, MinMax": (corrected, {}),
        "bias-corrected, uint8, Percentile 99.999": (corrected, PCT),
        "bias-corrected, uint8, MinMax, last conv and head in float": (corrected, {"nodes_to_exclude": names[-2:]}),
        "bias-corrected, uint8, MinMax, stem and first block in float": (corrected, {"nodes_to_exclude": names[:3]}),
        "the same, the float stem and block left uncorrected (shipped rule)":
            (shipped, {"nodes_to_exclude": names[:INT8_FLOAT_CONVOLUTIONS]}),
    }


def _row(name: str, r: dict) -> str:
    worst = min(r["origins"].items(), key=lambda kv: kv[1]["agreement"])
    return (f"| {name} | {r['test']['agreement']:.2%} | {r['test']['roc_auc_drop']:+.4f} | {r['val_pooled']['agreement']:.2%} | "
            f"{r['val_pooled']['roc_auc_drop']:+.4f} | {worst[0]} {worst[1]['agreement']:.2%} ({worst[1]['flipped']}/{worst[1]['images']}) | "
            f"{r['speed']['float']:.0f} → {r['speed']['int8']:.0f} ({r['speed']['ratio']:.2f}×) | {'yes' if r['passes'] else 'no'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(default_model_path()))
    ap.add_argument("--calibration", type=int, default=300, help="training films used for calibration")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    torch.set_num_threads(1)
    model, meta = load_model(args.run)
    blob = classifier_onnx(model, meta, 17)
    pred = Predictor(args.run, backend="torch", gate=False)
    samples = load_samples(*resolve_data(args.run, meta))
    x = calibration_inputs(pred, samples, args.calibration)
    corrected = classifier_onnx(bias_corrected(load_model(args.run)[0], x), meta, 17)
    shipped = classifier_onnx(bias_corrected(load_model(args.run)[0], x, INT8_FLOAT_CONVOLUTIONS), meta, 17)
    test = _films(pred, [s for s in samples if s.split == "test"])
    val_rows = [r for r in pooled_rows() if r[4] == "val"]
    val = _films(pred, load_samples(write_manifest(val_rows, ROOT / "runs" / "origins" / "int8-val.csv")))
    results, rows = {}, []
    for name, (graph, options) in _variants(blob, corrected, shipped).items():
        q = quantise(graph, x, **options)
        session = _session(q)
        r = {"test": _compare(pred, session, test), "val_pooled": _compare(pred, session, val),
             "origins": {o: _compare(pred, session, {k: v[val["source"] == o] for k, v in val.items()})
                         for o in sorted(set(val["source"]))}}
        speed = _speed({"float": blob, "int8": q}, test["x"][:32])
        r["speed"] = {**speed, "ratio": speed["int8"] / speed["float"], "load_1min": os.getloadavg()[0]}
        checked = [r["test"], *r["origins"].values()]
        r["passes"] = all(c["agreement"] >= INT8_MIN_AGREEMENT and (c["roc_auc_drop"] or 0.0) <= INT8_MAX_AUC_DROP for c in checked)
        results[name] = r
        rows.append(_row(name, r))
        print(rows[-1], flush=True)
    table = ["| variant | test: decisions unchanged | test ROC-AUC drop | every origin's val: unchanged | ROC-AUC drop | "
             "worst origin (flipped/films) | img/s batch 32, float → int8 | within limits |",
             "|---|---:|---:|---:|---:|---|---:|---|", *rows,
             "", f"Limits: ROC-AUC drop ≤ {INT8_MAX_AUC_DROP}, ≥ {INT8_MIN_AGREEMENT:.0%} of decisions unchanged at the "
             f"stored threshold, on the test split and on each origin's validation films; {len(x)} calibration films; "
             f"model {pred.name}. Speed: ONNX Runtime, one thread, both graphs timed in turn in the same run "
             f"(1-minute load average beside each in the JSON)."]
    save("int8-variants", {"title": "int8 quantisation variants of the shipped model", "table": table,
                           "results": results, "command": "python bench/int8_variants.py"})


if __name__ == "__main__":
    main()
