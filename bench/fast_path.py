"""Issue 20's targets in one run: the fast path end to end, as ratios that hold on any machine.

    .venv/bin/python bench/fast_path.py [--seconds 20] [--note "idle machine"]

Runs, one after the other on the bundled model (run it on an otherwise idle machine):

* ``bench/infer_speed.py --int8``: the classifier alone at batch 32 (float graph and the shipped
  default graph) and ``predict`` on a folder of 128 JPEGs;
* ``bench/load.py``: the REST API (``make run``'s server) with 8 clients, each on a keep-alive socket of its own (the
  target), and again with httpx's client, which costs the shared cores 10-15 times the CPU (reported);
* ``bench/listener.py``: ``covidxray listen`` with 4 DICOM senders (dcmtk's ``storescu``), uncompressed CR and JPEG Lossless;

then reads their result files and writes the target table to bench/results/fast-path.json (and
docs/benchmarks.md): each ratio beside the absolute numbers it comes from.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import ROOT, save

RESULTS = ROOT / "bench" / "results"


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT / "bench", check=True)


def default_rows(rows: dict) -> tuple[str, dict]:
    """The backend `Predictor` picks by default (its row name ends in "(the default)") and its cases."""
    name = next(k for k in rows if k.endswith("(the default)"))
    return name, rows[name]


def targets(speed: dict, load: dict, listener: dict, load_httpx: dict) -> list[tuple[str, float, float, str, bool]]:
    """(target, measured, limit, from what, met) for each of issue 20's ratio targets."""
    rows = speed["rows"]
    float_rows = rows.get("ONNX Runtime, float") or rows["ONNX Runtime, float (the default)"]
    classifier_float = float_rows["classifier, batch 32 (prepared tensors)"]["img_per_s"]
    name, shipped = default_rows(rows)
    cases = list(shipped.values())
    classifier_shipped, folder = cases[0]["img_per_s"], cases[2]["img_per_s"]
    api = load["result"]
    runs = {r["run"]: r for r in listener["rows"]}
    dicom, lossless = runs["uncompressed"]["instances_per_s"], runs["JPEG Lossless SV1"]["instances_per_s"]
    return [
        ("shipped classifier graph / float graph, batch 32", classifier_shipped / classifier_float, 1.7,
         f"{classifier_shipped:.0f} vs {classifier_float:.0f} img/s ({name})", classifier_shipped / classifier_float >= 1.7),
        ("predict FOLDER / float classifier, batch 32", folder / classifier_float, 0.75,
         f"{folder:.0f} vs {classifier_float:.0f} img/s", folder / classifier_float >= 0.75),
        ("REST API, 8 clients / folder", api["requests_per_s"] / folder, 0.80,
         f"{api['requests_per_s']:.0f} req/s vs {folder:.0f} img/s", api["requests_per_s"] / folder >= 0.80),
        ("REST API, 8 clients with httpx / folder (reported)", load_httpx["result"]["requests_per_s"] / folder, 0.80,
         f"{load_httpx['result']['requests_per_s']:.0f} req/s, the client's CPU "
         f"{load_httpx['result']['client_cpu_ms_per_request']:.1f} ms a request (socket clients: "
         f"{api['client_cpu_ms_per_request']:.1f})", load_httpx["result"]["requests_per_s"] / folder >= 0.80),
        ("REST API p99 / p50 (at most)", api["p99_ms"] / api["p50_ms"], 3.0,
         f"p99 {api['p99_ms']:.0f} ms, p50 {api['p50_ms']:.0f} ms", api["p99_ms"] / api["p50_ms"] <= 3.0),
        (f"DICOM listener, 4 senders ({runs['uncompressed'].get('sender', 'pynetdicom')}), uncompressed CR / folder", dicom / folder,
         0.60, f"{dicom:.1f} instances/s vs {folder:.0f} img/s", dicom / folder >= 0.60),
        ("DICOM listener, JPEG Lossless / folder (reported)", lossless / folder, 0.60,
         f"{lossless:.1f} instances/s", lossless / folder >= 0.60),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="duration of each timed case")
    ap.add_argument("--note", default="", help="a line about the machine (idle or not)")
    ap.add_argument("--reuse", action="store_true", help="only recompute the table from the last result files")
    args = ap.parse_args()
    load_before = os.getloadavg()
    if not args.reuse:
        run("infer_speed.py", "--int8", "--seconds", str(args.seconds))
        run("load.py", "--clients", "8", "--seconds", str(args.seconds), "--repeat", "3", "--name", "load-fast-path")
        run("load.py", "--clients", "8", "--seconds", str(args.seconds), "--repeat", "3", "--client", "httpx",
            "--name", "load-fast-path-httpx")
        run("listener.py", "--instances", "400", "--senders", "4", "--note", args.note)
    speed, load, listener, load_httpx = (json.loads((RESULTS / f"{n}.json").read_text())
                                         for n in ("infer_speed", "load-fast-path", "listener", "load-fast-path-httpx"))
    rows = targets(speed, load, listener, load_httpx)
    table = ["| target | measured | limit | from | met |", "|---|---:|---:|---|---|"]
    table += [f"| {t} | {m:.3f} | {lim:.2f} | {frm} | {'yes' if ok else 'no'} |" for t, m, lim, frm, ok in rows]
    table.append(f"\n{os.cpu_count()} CPUs; load average (1 min) {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after. "
                 f"{args.note}")
    save("fast-path", {"title": "The fast path end to end (issue 20's targets; the REST API: the median of 3 runs)",
                       "targets": [dict(zip(("target", "measured", "limit", "from", "met"), r)) for r in rows],
                       "table": table, "command": "python bench/fast_path.py"})
    print("\n".join(table))


if __name__ == "__main__":
    main()
