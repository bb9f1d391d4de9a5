"""Operations metrics (`covidxray.telemetry`): ``/metrics`` on ``serve`` counts what the API answered, and nothing personal.

The listener's ``/metrics`` is tested in tests/test_listener.py, beside the listener it scrapes.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import dicoms
from processes import cpu_seconds, free_port, spawned_pids
from covidxray.cli import main
from covidxray.predictor import Predictor, default_model_path
from covidxray.server import create_app
from covidxray.telemetry import Telemetry


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted label items): value}`` from Prometheus text."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_counts_are_by_word_and_start_at_zero_per_process():
    first, second = Telemetry(), Telemetry()
    first.answer("not_answered", "lateral_view")
    first.answer("error", "no_pixel_data")
    got = samples(first.render().decode())
    assert got[("covidxray_answers_total", (("label", "not_answered"),))] == 1
    assert got[("covidxray_input_gate_refusals_total", (("reason", "lateral_view"),))] == 1
    assert got[("covidxray_errors_total", (("code", "no_pixel_data"),))] == 1
    assert "covidxray_answers_total{" not in second.render().decode()  # a registry of its own


def test_serve_metrics_agree_with_what_the_api_answered(manifest: Path, tmp_path: Path):
    with open(manifest, newline="") as f:
        paths = [manifest.parent / r["path"] for r in csv.DictReader(f)][:3]
    lateral = dicoms.to_bytes(dicoms.cr(dicoms.xray_pixels(paths[0], 256), ViewPosition="LL"))
    labels: Counter[str] = Counter()
    with TestClient(create_app(default_model_path(), predictor=Predictor())) as client:
        for path in paths:
            labels[client.post("/v1/predict", files={"file": (path.name, path.read_bytes())}).json()["label"]] += 1
        refused = client.post("/v1/predict", files={"file": ("side.dcm", lateral)}).json()
        batch = client.post("/v1/predict/batch", files=[("files", (paths[0].name, paths[0].read_bytes())),
                                                       ("files", ("notes.txt", b"just some text"))]).json()["results"]
        labels[batch[0]["label"]] += 1
        assert client.get("/no/such/page").status_code == 404
        text = client.get("/metrics").text
    got = samples(text)
    assert (refused["label"], refused["reason"]) == ("not_answered", "lateral_view")
    for label, n in labels.items():
        assert got[("covidxray_answers_total", (("label", label),))] == n
    assert got[("covidxray_input_gate_refusals_total", (("reason", "lateral_view"),))] == 1
    assert got[("covidxray_errors_total", (("code", "unsupported_media_type"),))] == 1  # the text file in the batch
    assert got[("covidxray_errors_total", (("code", "not_found"),))] == 1
    assert got[("covidxray_http_requests_total", (("method", "POST"), ("route", "/v1/predict"), ("status", "200")))] == 4
    assert got[("covidxray_http_requests_total", (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    assert got[("covidxray_http_request_seconds_count", (("route", "/v1/predict"),))] == 4
    for secret in (paths[0].name, "side.dcm", "notes.txt", dicoms.PATIENT_NAME, dicoms.PATIENT_ID, "/no/such"):
        assert secret not in text, secret


@pytest.mark.slow
def test_serve_with_two_workers_shares_requests_and_sums_the_metrics(manifest: Path, tmp_path: Path):
    """``serve --workers 2``: two uvicorn processes, each with its model; every scrape, whichever answers, counts all."""
    with open(manifest, newline="") as f:
        films = [(manifest.parent / r["path"]).read_bytes() for r in csv.DictReader(f)][:4]
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "covidxray", "serve", "--port", str(port), "--workers", "2"],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if http.get("/readyz").status_code == 200 and len(spawned_pids(proc.pid)) == 2:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
            assert len(spawned_pids(proc.pid)) == 2, log.read_text()
            cpu_before = {pid: cpu_seconds(pid) for pid in spawned_pids(proc.pid)}

            def post(i: int) -> str:
                with httpx.Client(base_url=url, timeout=60) as own:  # a connection each: the kernel spreads them
                    r = own.post("/v1/predict", files={"file": (f"{i}.jpg", films[i % len(films)])})
                    assert r.status_code == 200, r.text
                    return r.json()["label"]

            with ThreadPoolExecutor(8) as pool:
                labels = Counter(pool.map(post, range(48)))
            cpu_used = {pid: cpu_seconds(pid) - t for pid, t in cpu_before.items()}
            scrapes = [samples(httpx.get(f"{url}/metrics").text) for _ in range(12)]
    finally:
        proc.terminate()
        proc.wait(30)
    # Both processes classified films: ~10 ms of CPU a film, and the kernel may split the 48 connections 1:2, so a few
    # films are ~0.05 s; an idle worker spends next to nothing over these seconds.
    assert min(cpu_used.values()) > 0.05, cpu_used
    for got in scrapes:
        for label, n in labels.items():
            assert got[("covidxray_answers_total", (("label", label),))] == n
        assert got[("covidxray_http_requests_total", (("method", "POST"), ("route", "/v1/predict"), ("status", "200")))] == 48
    assert "POST /v1/predict status=200" in log.read_text()  # each worker logs its requests as one server does
    assert proc.returncode is not None and not any(Path(f"/proc/{pid}").exists() for pid in cpu_before)


def test_serve_refuses_several_workers_on_one_dicomweb_spool(tmp_path: Path, capsys):
    assert main(["serve", "--workers", "2", "--db", str(tmp_path / "r.db"), "--dicomweb-spool", str(tmp_path / "s")]) == 2
    assert "--workers 2: give at least 1, and 1 with --dicomweb-spool" in capsys.readouterr().err


def test_serve_with_workers_names_a_bad_model_in_one_line(tmp_path: Path, capsys):
    assert main(["serve", "--workers", "2", "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'none'}: no model here" in err and "Traceback" not in err
