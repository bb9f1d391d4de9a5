"""Load test of the REST API: N concurrent clients for T seconds against a local `covidxray serve`.

    .venv/bin/python bench/load.py --clients 8 --seconds 30 [--backend onnx] [--bad-fraction 0.2] [--explain] [--client httpx]

The server runs in a subprocess on a free loopback port (uvicorn, the bundled model; for the ONNX
backend the model is exported to a temporary folder first). Each client posts real X-rays from
the shared data set (test split) one after another, each on a keep-alive connection of its own that costs the
cores the server shares with it as little as a Python client can (``--client httpx``: httpx's, about 15 times the
CPU). With ``--bad-fraction`` some uploads are a
truncated PNG, text or an empty file: their 4xx answers are counted as expected errors, anything
else (5xx, a wrong status, a dropped connection) as unexpected. Reported: requests/s, latency
percentiles of the good requests, errors, the server's resident memory at the start and the end,
and the load average (other work on the machine competes for the same cores).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from common import ROOT, child_pids, cpu_seconds, save
from covidxray.export import export_onnx
from covidxray.checkpoint import copy_model, default_model_path

MAX_CLIENTS, MAX_SECONDS = 256, 600
SAMPLE_FILES = 64


def xrays(data: Path, n: int) -> list[tuple[str, bytes]]:
    """``n`` real X-rays of the test split, COVID-19 and normal alternating, as (name, bytes)."""
    split = {r["path"]: r["split"] for r in csv.DictReader(open(ROOT / "splits" / "covid-cxr.csv", newline=""))}
    rows = [r for r in csv.DictReader(open(data / "manifest.csv", newline="")) if split.get(r["path"], "test") == "test"]
    by_label = {label: [r for r in rows if r["label"] == label][: n // 2] for label in ("covid", "normal")}
    picked = [r for pair in zip(by_label["covid"], by_label["normal"], strict=False) for r in pair]
    return [(Path(r["path"]).name, (data / r["path"]).read_bytes()) for r in picked]


def bad_files(good: bytes) -> list[tuple[str, bytes, int]]:
    """(name, bytes, expected status): a truncated PNG, text, an empty file."""
    buf = io.BytesIO()
    Image.open(io.BytesIO(good)).convert("L").save(buf, format="PNG")
    png = buf.getvalue()
    text = b"this is not an X-ray\n" * 20
    return [("truncated.png", png[: len(png) // 2], 422), ("notes.txt", text, 415), ("empty.png", b"", 422)]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its child processes (``serve --workers N``'s workers)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024 + sum(map(rss_mb, child_pids(pid)))
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, backend: str, threads: int | None, log_file: Path,
                 max_batch: int | None = None, workers: int | None = None) -> tuple[subprocess.Popen, str, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "COVIDXRAY_API_KEY"}
    command = [sys.executable, "-m", "covidxray", "serve", "--port", str(port), "--model", str(model), "--backend", backend]
    with open(log_file, "wb") as log:
        extra = (["--threads", str(threads)] if threads else []) + (["--max-batch", str(max_batch)] if max_batch else []) + (
            ["--workers", str(workers)] if workers else [])
        proc = subprocess.Popen(command + extra, stdout=log,
                                stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log_file.read_text()}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                text = log_file.read_text()  # with several workers: once every one has loaded the model
                many = re.search(r"from (\d+) processes", text)
                workers = int(many[1]) if many else 1
                if r.status == 200 and text.count("Application startup complete") >= workers:
                    return proc, url, workers
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"server not ready after 300 s:\n{log_file.read_text()}")


class SocketClient:
    """One keep-alive HTTP/1.1 connection that writes ready-made requests and reads only the status line, the headers
    and ``Content-Length`` bytes of body: about 0.1 ms of CPU a request, against 1.4-1.9 ms with httpx, on the cores
    the server needs (a real client runs on another machine). Any other answer (no length, a closed connection) is
    an error, and the next request opens a new connection."""

    def __init__(self, url: str):
        self.host, self.port = url.split("//", 1)[1].rsplit(":", 1)
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, target: str, body: bytes, content_type: str) -> int:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, int(self.port))
        reader, writer = self.streams
        try:
            writer.write(f"POST {target} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
            await reader.readexactly(int(fields["content-length"]))
            if fields.get("connection", "").lower() == "close":
                self.close()
            return int(head[0].split()[1])
        except BaseException:  # a timeout's cancellation too: an answer left unread would be taken for the next one's
            self.close()
            raise

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


def form(name: str, data: bytes) -> tuple[bytes, str]:
    """``data`` as the multipart form field ``file`` that the API reads: (body, Content-Type)."""
    boundary = "covidxray-load-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


async def run_load(url: str, pid: int, files: list[tuple[str, bytes]], bad: list[tuple[str, bytes, int]], clients: int,
                   seconds: float, bad_fraction: float, explain: bool, raw: bool = False, client_kind: str = "socket") -> dict:
    latencies: list[float] = []
    counts = {"ok": 0, "expected_errors": 0, "unexpected_errors": 0}
    unexpected: dict[str, int] = {}
    rss = [rss_mb(pid)]
    cpu_start, client_cpu_start = cpu_seconds(pid), time.process_time()
    params = {"explain": "true"} if explain else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        end = time.perf_counter() + seconds

        async def client(seed: int) -> None:
            rng = random.Random(seed)
            own = SocketClient(url)
            while time.perf_counter() < end:
                if rng.random() < bad_fraction:
                    name, data, expected = rng.choice(bad)
                else:
                    (name, data), expected = rng.choice(files), 200
                start = time.perf_counter()
                try:
                    if client_kind == "socket":
                        query = urllib.parse.urlencode({**params, **({"filename": name} if raw else {})})
                        body, kind = (data, "application/octet-stream") if raw else form(name, data)
                        status = await asyncio.wait_for(own.post(f"/v1/predict?{query}", body, kind), 60)
                    else:
                        r = await (http.post("/v1/predict", params={**params, "filename": name}, content=data,
                                             headers={"Content-Type": "application/octet-stream"}) if raw else
                                   http.post("/v1/predict", params=params, files={"file": (name, data)}))
                        status = r.status_code
                except Exception as exc:  # noqa: BLE001 - a dropped connection, a timeout, an answer it cannot read
                    status = type(exc).__name__
                if status == expected == 200:
                    counts["ok"] += 1
                    latencies.append(time.perf_counter() - start)
                elif status == expected:
                    counts["expected_errors"] += 1
                else:
                    counts["unexpected_errors"] += 1
                    unexpected[f"{name}: {status}"] = unexpected.get(f"{name}: {status}", 0) + 1
            own.close()

        async def sample_rss() -> None:
            while time.perf_counter() < end:
                await asyncio.sleep(1)
                rss.append(rss_mb(pid))

        started = time.perf_counter()
        await asyncio.gather(sample_rss(), *(client(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    rss.append(rss_mb(pid))
    server_cpu, client_cpu = cpu_seconds(pid) - cpu_start, time.process_time() - client_cpu_start
    ms = 1000 * np.asarray(latencies) if latencies else np.full(1, np.nan)
    total = sum(counts.values())
    return {
        **counts, "requests": total, "elapsed_s": elapsed, "requests_per_s": total / elapsed,
        "ok_per_s": counts["ok"] / elapsed, "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()), "unexpected": unexpected,
        "rss_start_mb": rss[0], "rss_end_mb": rss[-1], "rss_max_mb": max(rss), "rss_mb_each_second": [round(x) for x in rss],
        "rss_growth_pct": 100 * (rss[-1] - rss[0]) / rss[0],
        # A soak asks whether memory still grows once the server has settled: the second half of the run.
        "rss_growth_second_half_pct": 100 * (rss[-1] - rss[len(rss) // 2]) / rss[len(rss) // 2],
        # CPU the server spent per request: unlike latency, hardly changed by other work on the machine.
        "server_cpu_ms_per_request": 1000 * server_cpu / max(total, 1), "server_cpu_share": server_cpu / elapsed,
        # The load's own cost on the same cores: what the server could not have.
        "client_cpu_ms_per_request": 1000 * client_cpu / max(total, 1),
    }


def one_run(args: argparse.Namespace, model: Path, files: list, bad: list, tmp: Path) -> tuple[str, int, dict]:
    """A fresh server, the warm-up, the timed load: the model's name, the server's processes and the result."""
    proc, url, workers = start_server(model, args.backend, args.threads, tmp / "serve.log", args.max_batch, args.workers)
    try:
        model_name = httpx.get(url + "/v1/model").json()["name"]
        load = (url, proc.pid, files, bad, args.clients)
        if args.warmup > 0:
            asyncio.run(run_load(*load, args.warmup, args.bad_fraction, args.explain, args.raw, args.client))
        return model_name, workers, asyncio.run(run_load(*load, args.seconds, args.bad_fraction, args.explain, args.raw,
                                                         args.client))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8, help=f"concurrent clients (at most {MAX_CLIENTS})")
    ap.add_argument("--seconds", type=float, default=30.0, help=f"duration (at most {MAX_SECONDS})")
    ap.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                    help="auto (default, as `make run`: the bundled int8 graph), onnx (exported here if missing) or torch")
    ap.add_argument("--bad-fraction", type=float, default=0.0, help="share of uploads that are broken files")
    ap.add_argument("--explain", action="store_true", help="ask for the Grad-CAM overlay on every request")
    ap.add_argument("--threads", type=int, help="model intra-op threads of the server (default: the library's)")
    ap.add_argument("--max-batch", type=int, help="the server's most images per network call (default: serve's)")
    ap.add_argument("--workers", type=int, help="the server's processes (default: serve's)")
    ap.add_argument("--repeat", type=int, default=1, help="runs, each on a fresh server; the median one is reported")
    ap.add_argument("--warmup", type=float, default=5.0,
                    help="seconds of the same load before measuring, so memory is measured after the batch sizes settled")
    ap.add_argument("--raw", action="store_true", help="send each film as the raw request body, not as a multipart form")
    ap.add_argument("--client", choices=["socket", "httpx"], default="socket",
                    help="socket (default: keep-alive connections that cost the shared cores ~0.1 ms a request) or httpx")
    ap.add_argument("--note", default="", help="a sentence added under the table (e.g. what else ran)")
    ap.add_argument("--name", help="result file bench/results/NAME.json (default load-<clients>c-<seconds>s)")
    args = ap.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.seconds <= MAX_SECONDS or not 0 <= args.bad_fraction <= 1:
        ap.error(f"--clients must be 1..{MAX_CLIENTS}, --seconds 0..{MAX_SECONDS}, --bad-fraction 0..1")
    data = Path(os.environ.get("COVIDXRAY_DATA", ROOT.parent / "shared" / "datasets" / "covid-cxr"))
    files = xrays(data, SAMPLE_FILES)
    bad = bad_files(files[0][1])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model = copy_model(default_model_path(), Path(tmp) / "model")  # a copy: the export does not touch the shipped model
        if args.backend == "onnx" and not (model / "model.onnx").is_file():
            export_onnx(model, model / "model.onnx")
        runs = [one_run(args, model, files, bad, Path(tmp)) for _ in range(args.repeat)]
    # Several runs, each on a fresh server: with --workers N the kernel hashes the clients' keep-alive connections over
    # the workers' sockets once, at the start, and an uneven split holds for the whole run.
    model_name, workers, result = sorted(runs, key=lambda r: r[2]["requests_per_s"])[len(runs) // 2]
    result = {**result, "server_processes": workers, "runs_requests_per_s": [round(r[2]["requests_per_s"], 1) for r in runs]}
    load_after = os.getloadavg()
    command = " ".join(["python bench/load.py", *sys.argv[1:]])
    r = result
    table = [
        "| Clients | Seconds | Backend | Bad uploads | Requests/s | p50 ms | p90 ms | p99 ms | OK | Expected 4xx "
        "| Unexpected errors | Server RSS start → end (MB) | RSS growth, second half | Server CPU ms/request |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
        f"| {args.clients} | {args.seconds:g} | {args.backend}, {workers} process{'es' if workers > 1 else ''}"
        f"{f', {args.threads} thread(s)' if args.threads else ''}"
        f"{' + Grad-CAM' if args.explain else ''}{', raw body' if args.raw else ''} | "
        f"{args.bad_fraction:.0%} | "
        f"{r['requests_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} | {r['ok']} | "
        f"{r['expected_errors']} | {r['unexpected_errors']} | {r['rss_start_mb']:.0f} → {r['rss_end_mb']:.0f} "
        f"({r['rss_growth_pct']:+.1f} %) | {r['rss_growth_second_half_pct']:+.1f} % | {r['server_cpu_ms_per_request']:.1f} |",
        "",
        f"Model {model_name}; latencies of the successful requests, measured by the client (asyncio + "
        f"{'a keep-alive socket each' if args.client == 'socket' else 'httpx'}, {r['client_cpu_ms_per_request']:.2f} ms of "
        f"CPU a request) on the same machine. Load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (1 min) on {os.cpu_count()} CPUs: "
        "other work on the machine competes for the cores."
        + (f" The median of {args.repeat} runs, each on a fresh server: {', '.join(map(str, result['runs_requests_per_s']))}"
           " requests/s." if args.repeat > 1 else ""),
        *([args.note] if args.note else []),
    ]
    name = args.name or f"load-{args.clients:03d}c-{args.seconds:g}s"
    save(name, {"title": f"REST API load — {args.clients} clients × {args.seconds:g} s", "args": vars(args), "model": model_name,
                "result": result, "loadavg_before": load_before, "loadavg_after": load_after, "table": table, "command": command})
    print("\n".join(table))


if __name__ == "__main__":
    main()
