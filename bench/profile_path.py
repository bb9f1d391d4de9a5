"""Where the end-to-end time goes: each stage of `covidxray predict` timed on its own, for a folder and for one image.

    .venv/bin/python bench/profile_path.py [--model RUN (default: the bundled model)] [--images 128] [--repeats 5]

The stages are the product's own functions, called one after another from here (no hook in the
product): read + decode (`read_image`), header rules (`InputGate.header`), segmenter + gate
(`Predictor.gate_many` on the films the header rules let through), crop/resize/equalise (`Preprocess.prepare`), classifier
(`Predictor._logits_and_features`), familiarity (`Familiarity`), answer (softmax, `Predictor.decide`).
The folder case runs each stage over all files with the batch size `predict_paths` uses (32); the one-image
case runs each on one JPEG (bytes in). Beside the sum of the stages, the product's own end-to-end call is
timed (`predict_paths` on the folder, `predict_bytes` on the one image): above the sum means overhead
(threads fighting for the cores), under it means overlap (decoding while the classifier runs).
Each figure is the median of ``--repeats`` passes, in CPU time (every thread of the process) and wall time;
the shares are of CPU time, which other work on a shared machine moves far less. The files are the ones
`bench/infer_speed.py` uses.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from common import ROOT, save
from covidxray.checkpoint import default_model_path
from covidxray.imaging import read_image
from covidxray.predictor import Predictor

STAGES = ("read + decode", "header rules", "segmenter + gate", "crop/resize/equalise", "classifier", "familiarity", "answer")


def run_stages(pred: Predictor, sources: list, batch: int) -> tuple[dict[str, float], dict[str, float]]:
    """Wall and CPU seconds (all the process's threads) per stage for one pass over ``sources`` (paths or bytes),
    in batches of ``batch``."""
    spent, cpu = dict.fromkeys(STAGES, 0.0), dict.fromkeys(STAGES, 0.0)

    def clock(stage: str, fn: Callable, *args):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn(*args)
        spent[stage] += time.perf_counter() - start
        cpu[stage] += time.process_time() - start_cpu
        return out

    for first in range(0, len(sources), batch):
        decoded = clock("read + decode", lambda: [read_image(s, name="<bytes>") for s in sources[first:first + batch]])
        images, infos = [d[0] for d in decoded], [d[1] for d in decoded]
        verdicts = clock("header rules", lambda: [pred.input_gate.header(info) for info in infos])
        todo = [i for i, v in enumerate(verdicts) if v is None]
        gate_many = getattr(pred, "gate_many", None) or pred._gate_many  # (its name before it was public, to profile old code)
        gated = clock("segmenter + gate", gate_many, [images[i] for i in todo], [infos[i] for i in todo])
        prepared = clock("crop/resize/equalise",
                         lambda: np.stack([pred.preprocess.prepare(images[i], lungs) for i, (_, lungs) in zip(todo, gated)]))
        logits, feats = clock("classifier", pred._logits_and_features, torch.from_numpy(prepared), batch)
        if pred.familiarity is not None:
            clock("familiarity", pred.familiarity, feats)
        clock("answer", lambda: [pred.decide(str(i), float(p)) for i, p in
                                 enumerate(torch.softmax(torch.from_numpy(logits) / pred.temperature, 1)[:, 1].numpy())])
    return spent, cpu


def profile(pred: Predictor, sources: list, batch: int, end_to_end: Callable[[], object], repeats: int) -> dict:
    """Median wall and CPU seconds per stage and of the product's own call over ``repeats`` passes, after a warm-up.

    The shares are of CPU time: on a shared machine it moves far less with other work than wall time does."""
    run_stages(pred, sources, batch)
    end_to_end()
    passes = [run_stages(pred, sources, batch) for _ in range(repeats)]
    stages = {s: statistics.median(p[0][s] for p in passes) for s in STAGES}
    cpu = {s: statistics.median(p[1][s] for p in passes) for s in STAGES}
    walls, cpus = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        end_to_end()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    total, total_cpu = sum(stages.values()), sum(cpu.values())
    n = len(sources)
    return {"images": n, "batch": batch, "ms_per_image": {s: 1000 * t / n for s, t in stages.items()},
            "cpu_ms_per_image": {s: 1000 * t / n for s, t in cpu.items()},
            "cpu_share": {s: t / total_cpu for s, t in cpu.items()},
            "sum_ms_per_image": 1000 * total / n, "sum_cpu_ms_per_image": 1000 * total_cpu / n,
            "end_to_end_ms_per_image": 1000 * statistics.median(walls) / n, "end_to_end_img_per_s": n / statistics.median(walls),
            "end_to_end_cpu_ms_per_image": 1000 * statistics.median(cpus) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--images", type=int, default=128, help="JPEGs in the folder case")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--name", default="profile-path", help="result file bench/results/NAME.json")
    ap.add_argument("--note", default="", help="a sentence added under the table (e.g. which code was profiled)")
    args = ap.parse_args()
    pred = Predictor(args.model or default_model_path())  # the default backend, as `covidxray predict`
    data = Path(os.environ.get("COVIDXRAY_DATA", ROOT.parent / "shared" / "datasets" / "covid-cxr"))
    files = sorted((data / "images").rglob("*.jpg"))[::20][:args.images]  # as bench/infer_speed.py picks them
    one = [files[0].read_bytes()]
    load_before = os.getloadavg()
    rows = {f"folder of {len(files)} JPEGs, batch 32": profile(pred, files, 32, lambda: list(pred.predict_paths(files)),
                                                               args.repeats),
            "one JPEG (bytes in)": profile(pred, one * 20, 1, lambda: [pred.predict_bytes(one[0]) for _ in range(20)],
                                           args.repeats)}
    load_after = os.getloadavg()
    table = ["| Case | " + " | ".join(STAGES) + " | sum of stages | product's own call |",
             "|---|" + "---:|" * (len(STAGES) + 2)]
    for case, r in rows.items():
        cells = [f"{r['cpu_ms_per_image'][s]:.2f} / {r['ms_per_image'][s]:.2f} ({100 * r['cpu_share'][s]:.0f} %)" for s in STAGES]
        table.append(f"| {case} | " + " | ".join(cells) + f" | {r['sum_cpu_ms_per_image']:.2f} / {r['sum_ms_per_image']:.2f} | "
                     f"{r['end_to_end_cpu_ms_per_image']:.2f} / {r['end_to_end_ms_per_image']:.2f} "
                     f"({r['end_to_end_img_per_s']:.0f} img/s) |")
    table.append(f"\nModel {pred.name}, backend {pred.backend}; per image: CPU ms (every thread of the process) / wall ms, and "
                 "the stage's share of the CPU time of all stages; each stage timed alone, called from one thread; the "
                 "product's own call is `predict_paths` (folder) or `predict_bytes` (one image). Load average before/after: "
                 f"{load_before[0]:.2f} / {load_after[0]:.2f} (1 min) on {os.cpu_count()} CPUs: wall times on a busy machine "
                 "are long, CPU times much less so.")
    table += [args.note] if args.note else []
    title = f"Where the time goes, stage by stage — {pred.name}" + (f" ({args.name})" if args.name != "profile-path" else "")
    save(args.name, {"title": title, "model": pred.name, "backend": pred.backend,
                     "rows": rows, "loadavg_before": load_before, "loadavg_after": load_after, "table": table,
                     "command": " ".join(["python bench/profile_path.py", *sys.argv[1:]])})
    print("\n".join(table))


if __name__ == "__main__":
    main()
