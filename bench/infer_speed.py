"""Inference speed of a model with PyTorch eager on CPU: batch-32 throughput, batch-1 latency, peak memory.

    .venv/bin/python bench/infer_speed.py [--model models/default] [--seconds 10]

Excludes decoding (inputs are prepared tensors); `--with-decode` adds a row that decodes and
preprocesses real JPEGs from the shared data set for every image.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from common import peak_rss_mb, save
from covidxray.predictor import Predictor


def timed(fn, seconds: float) -> list[float]:
    fn()  # warm-up
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--with-decode", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    pred = Predictor(args.model)
    size = pred.preprocess.size
    rng = np.random.default_rng(0)
    batch32 = torch.from_numpy(rng.integers(0, 256, (32, size, size), dtype=np.uint8))
    one = batch32[:1]
    t32 = timed(lambda: pred.predict_prepared(batch32, batch_size=32), args.seconds)
    t1 = timed(lambda: pred.predict_prepared(one, batch_size=1), args.seconds)
    rows = {
        "batch 32 (prepared tensors)": {"img_per_s": 32 / statistics.median(t32)},
        "batch 1 (prepared tensor)": {"p50_ms": 1000 * np.percentile(t1, 50), "p99_ms": 1000 * np.percentile(t1, 99)},
    }
    if args.with_decode:
        data = Path(os.environ.get("COVIDXRAY_DATA", Path(__file__).resolve().parents[2] / "shared/datasets/covid-cxr"))
        files = sorted((data / "images").rglob("*.jpg"))[:64]
        td = timed(lambda: list(pred.predict_paths(files, batch_size=32)), args.seconds)
        t1d = timed(lambda: pred.predict_path(files[0]), args.seconds)
        rows["batch 32 incl. JPEG decode + preprocessing"] = {"img_per_s": len(files) / statistics.median(td)}
        rows["batch 1 incl. JPEG decode + preprocessing"] = {"p50_ms": 1000 * np.percentile(t1d, 50), "p99_ms": 1000 * np.percentile(t1d, 99)}
    table = ["| Backend | Case | Images/s | p50 ms | p99 ms |", "|---|---|---:|---:|---:|"]
    for case, r in rows.items():
        table.append(f"| PyTorch eager | {case} | {r.get('img_per_s', float('nan')):.1f} | {r.get('p50_ms', float('nan')):.2f} | "
                     f"{r.get('p99_ms', float('nan')):.2f} |".replace("nan", "–"))
    table.append(f"\nModel {pred.name}; peak RSS of the benchmark process {peak_rss_mb():.0f} MB.")
    save("infer_speed", {"title": f"Inference speed — {pred.name}", "model": pred.name, "rows": rows,
                         "peak_rss_mb": peak_rss_mb(), "table": table, "command": "python bench/infer_speed.py"})
    print("\n".join(table))


if __name__ == "__main__":
    main()
