"""Operations metrics (`covidxray.telemetry`): ``/metrics`` on ``serve`` counts what the API answered, and nothing personal.

The listener's ``/metrics`` is tested in tests/test_listener.py, beside the listener it scrapes.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import dicoms
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
