"""Inference speed on CPU, PyTorch eager vs ONNX Runtime: batch-32 throughput, batch-1 latency, peak memory.

    .venv/bin/python bench/infer_speed.py [--model RUN (default: the bundled model)] [--seconds 10]

The model is exported to ONNX in a temporary folder first. Rows without decode use prepared
tensors; `--with-decode` (default) adds rows that decode and preprocess real JPEGs from the
shared data set for every image.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import peak_rss_mb, save
from covidxray.export import export_onnx
from covidxray.predictor import Predictor, default_model_path


def timed(fn, seconds: float) -> list[float]:
    fn()  # warm-up
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def measure(pred: Predictor, seconds: float, with_decode: bool) -> dict:
    size = pred.preprocess.size
    rng = np.random.default_rng(0)
    batch32 = torch.from_numpy(rng.integers(0, 256, (32, size, size), dtype=np.uint8))
    t32 = timed(lambda: pred.predict_prepared(batch32, batch_size=32), seconds)
    t1 = timed(lambda: pred.predict_prepared(batch32[:1], batch_size=1), seconds)
    rows = {
        "batch 32 (prepared tensors)": {"img_per_s": 32 / statistics.median(t32)},
        "batch 1 (prepared tensor)": {"p50_ms": 1000 * np.percentile(t1, 50), "p99_ms": 1000 * np.percentile(t1, 99)},
    }
    if with_decode:
        data = Path(os.environ.get("COVIDXRAY_DATA", Path(__file__).resolve().parents[2] / "shared/datasets/covid-cxr"))
        files = sorted((data / "images").rglob("*.jpg"))[:64]
        td = timed(lambda: list(pred.predict_paths(files, batch_size=32)), seconds)
        t1d = timed(lambda: pred.predict_path(files[0]), seconds)
        rows["batch 32 incl. JPEG decode + preprocessing"] = {"img_per_s": len(files) / statistics.median(td)}
        rows["batch 1 incl. JPEG decode + preprocessing"] = {"p50_ms": 1000 * np.percentile(t1d, 50), "p99_ms": 1000 * np.percentile(t1d, 99)}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--with-decode", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(args.model or default_model_path(), Path(tmp) / "model.onnx")
        backends = {"PyTorch eager": Predictor(args.model), "ONNX Runtime": Predictor(Path(tmp) / "model.onnx", backend="onnx")}
        rows = {name: measure(pred, args.seconds, args.with_decode) for name, pred in backends.items()}
    pred = backends["PyTorch eager"]
    table = ["| Backend | Case | Images/s | p50 ms | p99 ms |", "|---|---|---:|---:|---:|"]
    for backend, cases in rows.items():
        for case, r in cases.items():
            table.append(f"| {backend} | {case} | {r.get('img_per_s', float('nan')):.1f} | {r.get('p50_ms', float('nan')):.2f} | "
                         f"{r.get('p99_ms', float('nan')):.2f} |".replace("nan", "–"))
    speedup = rows["ONNX Runtime"]["batch 32 (prepared tensors)"]["img_per_s"] / rows["PyTorch eager"]["batch 32 (prepared tensors)"]["img_per_s"]
    table.append(f"\nModel {pred.name}; ONNX Runtime / PyTorch batch-32 throughput: {speedup:.2f}x; "
                 f"peak RSS of the benchmark process {peak_rss_mb():.0f} MB.")
    save("infer_speed", {"title": f"Inference speed — {pred.name}", "model": pred.name, "rows": rows,
                         "peak_rss_mb": peak_rss_mb(), "table": table, "command": "python bench/infer_speed.py"})
    print("\n".join(table))


if __name__ == "__main__":
    main()
