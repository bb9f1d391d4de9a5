"""Inference speed on CPU: PyTorch eager, ONNX Runtime float and int8; the classifier alone and end to end.

    .venv/bin/python bench/infer_speed.py [--model RUN (default: the bundled model)] [--seconds 10]

The model is copied to a temporary folder with the ONNX graphs it ships (the float one is exported if
missing; int8 too with ``--int8``, which fails if it drifts from PyTorch).

* the classifier on 32 real films prepared as ``predict`` prepares them, batch 32 (throughput: one call in each lane of the backend's thread plan
  at once, so every core works, as in `predict`) and batch 1 (latency): the model alone;
* ``predict`` on a folder of real JPEGs (decode, input gate, lung crop, classifier: everything
  `covidxray predict FOLDER` does), throughput;
* one image end to end (bytes in, answer out), latency.

Run it on an otherwise idle machine: timings on shared cores say little.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from common import ROOT, peak_rss_mb, save
from covidxray.checkpoint import copy_model, default_model_path
from covidxray.export import export_onnx
from covidxray.predictor import Predictor


def timed(fn, seconds: float) -> list[float]:
    fn()  # warm-up
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def measure(pred: Predictor, seconds: float, files: list[Path]) -> dict:
    # Real films, prepared as predict prepares them: an int8 graph re-checks those near the threshold in float, and
    # random pixels would never be near it.
    decoded = [pred.read(f) for f in files[:32]]
    prepared = [x for x in pred.check_many([d[0] for d in decoded], [d[1] for d in decoded]) if isinstance(x, np.ndarray)]
    batch32 = torch.from_numpy(np.stack((prepared * 2)[:32]))
    lanes = pred.threads.lanes  # the cores' throughput: as many batch-32 calls at once as the thread plan runs
    with ThreadPoolExecutor(lanes) as pool:
        t32 = timed(lambda: list(pool.map(lambda _: pred.predict_prepared(batch32, batch_size=32), range(lanes))), seconds)
    t1 = timed(lambda: pred.predict_prepared(batch32[:1], batch_size=1), seconds)
    td = timed(lambda: list(pred.predict_paths(files, batch_size=32)), seconds)
    one = files[0].read_bytes()
    t1d = timed(lambda: pred.predict_bytes(one), seconds)
    return {
        "classifier, batch 32 (prepared tensors)": {"img_per_s": 32 * lanes / statistics.median(t32), "lanes": lanes},
        "classifier, batch 1 (prepared tensor)": {"p50_ms": 1000 * np.percentile(t1, 50), "p99_ms": 1000 * np.percentile(t1, 99)},
        f"predict on a folder of {len(files)} JPEGs (decode, gate, crop, classifier)": {"img_per_s": len(files) / statistics.median(td)},
        "one JPEG end to end (bytes in, answer out)": {"p50_ms": 1000 * np.percentile(t1d, 50), "p99_ms": 1000 * np.percentile(t1d, 99)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--images", type=int, default=128, help="JPEGs in the folder case")
    ap.add_argument("--int8", action="store_true", help="also export and time int8 when the model does not ship it")
    args = ap.parse_args()
    model = Path(args.model or default_model_path())
    data = Path(os.environ.get("COVIDXRAY_DATA", ROOT.parent / "shared" / "datasets" / "covid-cxr"))
    files = sorted((data / "images").rglob("*.jpg"))[::20][:args.images]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = copy_model(model, Path(tmp) / "model")  # with whatever ONNX graphs ship beside it
        if not (folder / "model.onnx").is_file():
            export_onnx(folder, folder / "model.onnx")
        if args.int8 and not (folder / "model.int8.onnx").is_file():
            export_onnx(folder, folder / "model.int8.onnx", int8=True)  # fails if it drifts from PyTorch
        backends = {"PyTorch eager": Predictor(folder, backend="torch"),
                    "ONNX Runtime, float": Predictor(folder / "model.onnx", backend="onnx")}
        if (folder / "model.int8.onnx").is_file():
            backends["ONNX Runtime, int8"] = Predictor(folder / "model.int8.onnx", backend="onnx")
        default = "ONNX Runtime, int8" if "ONNX Runtime, int8" in backends else "ONNX Runtime, float"
        backends[f"{default} (the default)"] = backends.pop(default)
        rows = {name: measure(pred, args.seconds, files) for name, pred in backends.items()}
    pred = backends["PyTorch eager"]
    table = ["| Backend | Case | Images/s | p50 ms | p99 ms |", "|---|---|---:|---:|---:|"]
    for backend, cases in rows.items():
        for case, r in cases.items():
            table.append(f"| {backend} | {case} | {r.get('img_per_s', float('nan')):.1f} | {r.get('p50_ms', float('nan')):.2f} | "
                         f"{r.get('p99_ms', float('nan')):.2f} |".replace("nan", "–"))
    first = next(iter(rows["PyTorch eager"]))
    speedup = rows[f"{default} (the default)"][first]["img_per_s"] / rows["PyTorch eager"][first]["img_per_s"]
    default_rows = list(rows[f"{default} (the default)"].values())
    end_to_end = default_rows[2]["img_per_s"] / default_rows[0]["img_per_s"]  # the folder against the classifier alone
    table.append(f"\nModel {pred.name} (lung crop: {pred.preprocess.lung_crop}); default backend / PyTorch batch-32 throughput: "
                 f"{speedup:.2f}x; default backend's folder / its classifier alone (batch 32): {100 * end_to_end:.0f} %; "
                 f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; peak RSS of the benchmark "
                 f"process {peak_rss_mb():.0f} MB. Load average before/after: "
                 f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f} (1 min): other work competes for the cores.")
    save("infer_speed", {"title": f"Inference speed — {pred.name}", "model": pred.name, "rows": rows,
                         "peak_rss_mb": peak_rss_mb(), "table": table, "command": "python bench/infer_speed.py"})
    print("\n".join(table))


if __name__ == "__main__":
    main()
