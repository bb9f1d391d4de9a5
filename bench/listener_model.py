"""The listener's model step alone: how fast the model process classifies 512x512 CR films, batch by batch or streamed.

    .venv/bin/python bench/listener_model.py [--instances 384] [--repeat 2] [--side 512]

``covidxray listen`` hands its model process one batch (up to 32 spooled films) at a time and sends the next once it
is classified. This times, in this process on the bundled model, the same films three ways: `classify_batch` per 32
(what the model process does per batch: the header read, `predict_paths` in two lanes of 16, the rows), `predict_paths`
per 32 (two lanes of 16), and one `predict_paths` call over all of them (batches of 32, decode of the next batch
overlapping the networks of the last). Reported: films/s, CPU ms per film and the cores used (2 cores: 2.0 is all).
The gap between the per-batch rows and the streamed one is what the listener loses by one batch in flight at a time.
``--side 320``: the same films at 320 px (result ``listener-model-320``): what the films' size costs, since the model
decodes them at full resolution (reduced-scale decoding is off by default).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from pydicom import uid

from common import save
from covidxray.dicomnode.worker import classify_batch
from covidxray.predictor import Predictor
from listener import make_files


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(step, paths: list[Path]) -> tuple[float, float, float]:
    """films/s, CPU ms per film and cores of ``step`` over ``paths``."""
    wall, cpu = time.perf_counter(), cpu_s()
    step(paths)
    wall, cpu = time.perf_counter() - wall, cpu_s() - cpu
    return len(paths) / wall, cpu / len(paths) * 1000, cpu / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=384)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--side", type=int, default=512, help="the films' side in pixels")
    args = parser.parse_args()
    predictor = Predictor(None)
    starts = range(0, args.instances, 32)  # the listener's batches: 32 films
    ways = {
        "classify_batch per 32 (the model process's step)": lambda paths: [classify_batch(
            predictor, [(str(i), f, "-") for i, f in enumerate(paths[s:s + 32])]) for s in starts],
        "predict_paths per 32 (two lanes of 16)": lambda paths: [list(predictor.predict_paths(paths[s:s + 32], batch_size=16))
                                                             for s in starts],
        "predict_paths over all, batches of 32 (streamed)": lambda paths: list(predictor.predict_paths(paths, batch_size=32)),
    }
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_files(Path(tmp) / "films", args.instances, uid.ExplicitVRLittleEndian, args.side)
        list(predictor.predict_paths(paths[:32]))  # warm-up: sessions, thread pools
        runs = {name: [] for name in ways}
        for _ in range(args.repeat):
            for name, step in ways.items():
                runs[name].append(timed(step, paths))
                print(name, [round(v, 2) for v in runs[name][-1]], flush=True)
    rows = [{"way": name, "films_per_s": [round(r[0], 1) for r in rs], "cpu_ms_per_film": round(statistics.mean(r[1] for r in rs), 1),
             "cores": round(statistics.mean(r[2] for r in rs), 2)} for name, rs in runs.items()]
    table = ["| way | films/s (each run) | CPU ms per film | cores used |", "|---|---:|---:|---:|"]
    table += [f"| {r['way']} | {', '.join(map(str, r['films_per_s']))} | {r['cpu_ms_per_film']} | {r['cores']} |" for r in rows]
    note = (f"Bundled model ({predictor.name}), {args.instances} {args.side}x{args.side} 12-bit CR films spooled as the listener spools them, "
            f"thread plan {predictor.threads}; load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")
    save("listener-model" + ("" if args.side == 512 else f"-{args.side}"),
         {"title": f"The listener's model step alone: per batch against streamed ({args.side} px films)", "rows": rows,
          "table": table + ["", note],
          "command": f"python bench/listener_model.py --instances {args.instances} --repeat {args.repeat} --side {args.side}"})


if __name__ == "__main__":
    main()
