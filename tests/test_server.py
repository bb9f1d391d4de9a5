"""REST API (covidxray.server) on real X-rays from the shared data set and on broken uploads."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset

from covidxray.imaging import load_image
from covidxray.predictor import Predictor, default_model_path
from covidxray.server import create_app

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage SOP class
PATIENT = "Doe^Jane"
PATIENT_ID = "SECRET-PID-42"

# One thread: two would spin against each other and against whatever else shares the two cores.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def xray_paths(manifest: Path) -> dict[str, Path]:
    """The first COVID-19 and the first normal X-ray listed in the shared manifest."""
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    first = {label: next(manifest.parent / r["path"] for r in rows if r["label"] == label) for label in ("covid", "normal")}
    return first


@pytest.fixture(scope="module")
def reference() -> Predictor:
    """An independent predictor for the bundled model: what the API must agree with."""
    return Predictor()


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """The app as `covidxray serve` runs it by default: it loads the bundled model at start-up."""
    with TestClient(create_app(api_key="")) as c:
        yield c


def _client(reference: Predictor, **kwargs) -> TestClient:
    """A client for an app serving an already loaded predictor (cheap to make per test)."""
    return TestClient(create_app(default_model_path(), predictor=reference, **kwargs))


def _dicom(pixels: np.ndarray) -> bytes:
    """A valid 16-bit DX DICOM file of ``pixels`` (uint16) that carries patient tags."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.Modality = "DX"
    ds.PatientName = PATIENT
    ds.PatientID = PATIENT_ID
    ds.set_pixel_data(pixels, "MONOCHROME2", 16)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _png(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("L").save(buf, format="PNG")
    return buf.getvalue()


def _decode_png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)), formats=["PNG"])
    image.load()
    return image


# ---------------------------------------------------------------------------------------------- answers


@pytest.mark.parametrize("label", ["covid", "normal"])
def test_predict_agrees_with_the_predictor(client: TestClient, reference: Predictor, xray_paths, label: str):
    path = xray_paths[label]
    expected = reference.predict_path(path)
    r = client.post("/v1/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == expected.label
    assert body["probability"] == pytest.approx(expected.probability, abs=1e-5)
    assert body["threshold"] == pytest.approx(expected.threshold)
    assert body["filename"] == path.name
    assert body["positive_class"] == "covid"
    assert "not a diagnosis" in body["disclaimer"]
    meta = json.loads((default_model_path() / "model.json").read_text())
    assert body["model"]["sha256"] == meta["weights_sha256"]
    assert body["model"]["name"] == reference.name
    assert body["timing_ms"] > 0
    assert "heatmap_png" not in body


def test_a_raw_body_upload_gets_the_multipart_answer(client: TestClient, reference: Predictor, xray_paths):
    """One film as the whole request body (``curl --data-binary``): no multipart framing, the same answer."""
    path = xray_paths["covid"]
    r = client.post("/v1/predict", params={"filename": "ward 3/chest.jpg"}, content=path.read_bytes(),
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    assert r.json()["probability"] == pytest.approx(reference.predict_path(path).probability, abs=1e-5)
    assert r.json()["filename"] == "chest.jpg"  # the base name only
    dicom = _dicom(np.asarray(Image.open(xray_paths["normal"]).convert("L"), dtype=np.uint16) * 257)
    r = client.post("/v1/predict", content=dicom, headers={"Content-Type": "application/dicom"})
    assert r.status_code == 200 and r.json()["filename"] == "upload"
    assert r.json()["probability"] == pytest.approx(reference.predict_bytes(dicom, "chest.dcm").probability, abs=1e-5)
    # the declared type is not trusted: the bytes are sniffed, and text is refused naming the file
    r = client.post("/v1/predict", params={"filename": "notes.png"}, content=b"just some text", headers={"Content-Type": "image/png"})
    assert r.status_code == 415 and "notes.png" in r.json()["error"]["message"]
    r = client.post("/v1/predict", content=b"", headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 422
    # a raw body is one file: the batch endpoint still wants a form
    r = client.post("/v1/predict/batch", content=path.read_bytes(), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    assert "application/dicom" in client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]["requestBody"]["content"]


def test_explain_returns_a_png_overlay_and_the_same_answer(client: TestClient, reference: Predictor, xray_paths):
    path = xray_paths["covid"]
    r = client.post("/v1/predict", params={"explain": "true", "preview": "true"}, files={"file": (path.name, path.read_bytes())})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["probability"] == pytest.approx(reference.predict_path(path).probability, abs=1e-5)
    heatmap, preview = _decode_png(body["heatmap_png"]), _decode_png(body["preview_png"])
    height, width = load_image(path).shape
    assert heatmap.size == preview.size
    assert max(heatmap.size) <= 1024 and heatmap.size[0] * height == pytest.approx(heatmap.size[1] * width, rel=0.02)
    assert heatmap.mode == "RGB" and np.asarray(heatmap).std() > 0  # a coloured map, not a blank picture


def test_batch_answers_each_file_in_order(client: TestClient, reference: Predictor, xray_paths):
    good = xray_paths["normal"]
    files = [("files", (good.name, good.read_bytes())), ("files", ("notes.txt", b"just some text"))]
    r = client.post("/v1/predict/batch", files=files)
    assert r.status_code == 200, r.text
    first, second = r.json()["results"]
    assert first["filename"] == good.name
    assert first["probability"] == pytest.approx(reference.predict_path(good).probability, abs=1e-5)
    assert second["filename"] == "notes.txt" and second["status"] == 415
    assert "notes.txt" in second["error"]["message"]


def test_generated_dicom_is_classified_and_patient_data_stays_out(client: TestClient, reference: Predictor, xray_paths,
                                                                  caplog: pytest.LogCaptureFixture):
    pixels = (np.asarray(Image.open(xray_paths["normal"]).convert("L"), dtype=np.uint16) * 257)
    data = _dicom(pixels)
    assert PATIENT.encode() in data  # the tag really is in the upload
    caplog.set_level(logging.DEBUG)
    r = client.post("/v1/predict", params={"explain": "true", "preview": "true"},
                    files={"file": ("chest.dcm", data, "application/dicom")})
    assert r.status_code == 200, r.text
    assert r.json()["probability"] == pytest.approx(reference.predict_bytes(data, "chest.dcm").probability, abs=1e-5)
    assert "request_id=" in caplog.text, "the request was not logged at all"
    # The PNGs are base64, where any short string can turn up by chance: they are decoded, not searched.
    text = json.dumps({k: v for k, v in r.json().items() if not k.endswith("_png")})
    for secret in ("Doe", "Jane", PATIENT_ID):
        assert secret not in text
        assert secret not in caplog.text
    assert PATIENT not in r.text and PATIENT_ID not in r.text


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(reference: Predictor, manifest: Path):
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    paths = [manifest.parent / r["path"] for label in ("covid", "normal") for r in [x for x in rows if x["label"] == label][:4]]
    app = create_app(default_model_path(), predictor=reference)
    service = app.state.service
    batch_sizes: list[int] = []
    run_batch = service._classify_batch

    def recording(prepared: np.ndarray) -> np.ndarray:
        if not batch_sizes:  # hold the first model call, so the requests that arrive meanwhile queue up: with a
            time.sleep(2.0)  # fast model they could otherwise each find the batcher idle (timing, not batching)
        batch_sizes.append(len(prepared))
        return run_batch(prepared)

    service._classify_batch = recording  # before start-up, where the batcher takes it
    with TestClient(app) as c, ThreadPoolExecutor(len(paths)) as pool:
        answers = list(pool.map(lambda p: c.post("/v1/predict", files={"file": (p.name, p.read_bytes())}).json(), paths))
    for path, answer in zip(paths, answers, strict=True):
        expected = reference.predict_path(path)
        assert answer["probability"] == pytest.approx(expected.probability, abs=1e-5), path
        assert answer["label"] == expected.label
    assert sum(batch_sizes) == len(paths) and 1 < max(batch_sizes) <= service.max_batch < len(paths), batch_sizes


# ---------------------------------------------------------------------------------------------- bad input


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("chest.png", b"not really")
    return buf.getvalue()


@pytest.mark.parametrize("name,data", [
    ("notes.txt", b"hello, this is text"),
    ("page.html", b"<!doctype html><html><body>hi</body></html>"),
    ("archive.zip", _zip()),
])
def test_not_an_image_is_415(client: TestClient, name: str, data: bytes):
    r = client.post("/v1/predict", files={"file": (name, data, "image/png")})  # the declared type is not trusted
    assert r.status_code == 415
    error = r.json()["error"]
    assert error["code"] == "unsupported_media_type" and name in error["message"]


def test_truncated_png_is_422(client: TestClient, xray_paths):
    data = _png(xray_paths["normal"])
    r = client.post("/v1/predict", files={"file": ("cut.png", data[: len(data) // 2])})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "unreadable_image" and "cut.png" in r.json()["error"]["message"]


def test_empty_file_is_422(client: TestClient):
    r = client.post("/v1/predict", files={"file": ("empty.png", b"")})
    assert r.status_code == 422 and "empty.png" in r.json()["error"]["message"]


def test_missing_field_is_400(client: TestClient, xray_paths):
    r = client.post("/v1/predict", files={"image": ("a.jpg", xray_paths["covid"].read_bytes())})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_file"
    r = client.post("/v1/predict", json={"file": "a.jpg"})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    assert "application/dicom" in r.json()["error"]["message"]  # and how to send the film as the body
    r = client.post("/v1/predict", params={"explain": "maybe"}, files={"file": ("a.jpg", b"x")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


def test_over_the_size_limit_is_413_while_streaming(reference: Predictor, xray_paths):
    data = xray_paths["covid"].read_bytes()
    # One byte over: the request as a whole passes the Content-Length check, the file's bytes do not.
    with _client(reference, max_upload_bytes=len(data) - 1) as c:
        r = c.post("/v1/predict", files={"file": ("big.jpg", data)})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "file_too_large" and "big.jpg" in r.json()["error"]["message"]

        # Without a Content-Length (chunked upload) the bytes are counted as they arrive.
        boundary = "xray-boundary"
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"chunked.jpg\"\r\n\r\n".encode()
                + data + f"\r\n--{boundary}--\r\n".encode())
        chunks = iter([body[i:i + 512] for i in range(0, len(body), 512)])
        r = c.post("/v1/predict", content=chunks, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413 and "chunked.jpg" in r.json()["error"]["message"]

        # a raw body: refused by its declared length, and counted as it arrives when chunked
        r = c.post("/v1/predict", content=data, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = c.post("/v1/predict", params={"filename": "big.jpg"}, content=iter([data[i:i + 512] for i in range(0, len(data), 512)]),
                   headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large" and "big.jpg" in r.json()["error"]["message"]
        assert c.post("/v1/predict", content=data[:-1], headers={"Content-Type": "image/jpeg"}).status_code == 200


def test_declared_content_length_over_the_limit_is_413_before_reading(reference: Predictor):
    with _client(reference, max_upload_bytes=1000) as c:
        r = c.post("/v1/predict", files={"file": ("huge.png", b"\0" * 200_000)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_upload_limit_from_the_environment(reference: Predictor, xray_paths, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("COVIDXRAY_MAX_UPLOAD_MB", "0.001")  # about 1 kB
    with _client(reference) as c:
        assert c.post("/v1/predict", files={"file": ("a.jpg", xray_paths["covid"].read_bytes())}).status_code == 413


def test_unexpected_failure_is_a_json_500_without_traceback(reference: Predictor, xray_paths):
    app = create_app(default_model_path(), predictor=reference)

    def broken(prepared):
        raise RuntimeError("internal detail that must not leak")

    app.state.service._classify_batch = broken  # before start-up, where the batcher takes it
    with TestClient(app) as c:
        r = c.post("/v1/predict", files={"file": ("a.jpg", xray_paths["covid"].read_bytes())})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
    assert "Traceback" not in r.text and "internal detail" not in r.text


def test_timeout_is_504(reference: Predictor, xray_paths):
    with _client(reference, timeout_s=1e-4) as c:
        r = c.post("/v1/predict", files={"file": ("slow.jpg", xray_paths["covid"].read_bytes())})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


# ---------------------------------------------------------------------------------------------- service endpoints


def test_health_readiness_and_model_card(reference: Predictor):
    app = create_app(api_key="")
    unstarted = TestClient(app)  # no `with`: the lifespan has not run, so no model is loaded
    assert unstarted.get("/healthz").status_code == 200
    assert unstarted.get("/readyz").status_code == 503
    assert unstarted.post("/v1/predict", files={"file": ("a.png", b"x")}).status_code == 503
    with TestClient(app) as c:
        assert c.get("/readyz").status_code == 200
        card = c.get("/v1/model").json()
    meta = json.loads((default_model_path() / "model.json").read_text())
    assert card["arch"] == meta["arch"] and card["input_size"] == meta["preprocess"]["size"]
    assert card["threshold"] == pytest.approx(meta["threshold"]) and card["temperature"] == meta["temperature"]
    assert card["class_names"] == ["normal", "covid"] and card["positive_class"] == "covid"
    assert card["sha256"] == meta["weights_sha256"]
    assert card["metrics"]["val_auc"] == pytest.approx(meta["val_auc"])
    assert 0.5 < card["metrics"]["test"]["roc_auc"] <= 1


def test_api_key(reference: Predictor, xray_paths, monkeypatch: pytest.MonkeyPatch):
    data = xray_paths["covid"].read_bytes()
    with _client(reference, api_key="s3cret-key") as c:
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
            r = c.post("/v1/predict", files={"file": ("a.jpg", data)}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert c.get("/v1/model").status_code == 401
        assert c.post("/v1/predict", files={"file": ("a.jpg", data)}, headers={"X-API-Key": "s3cret-key"}).status_code == 200
        assert c.get("/v1/model", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # stay open
    monkeypatch.setenv("COVIDXRAY_API_KEY", "from-env")
    with _client(reference) as c:
        assert c.get("/v1/model").status_code == 401
        assert c.get("/v1/model", headers={"X-API-Key": "from-env"}).status_code == 200


def test_request_id(client: TestClient):
    r = client.get("/healthz")
    assert len(r.headers["X-Request-ID"]) == 32  # uuid4 hex
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    odd = client.get("/healthz", headers={"X-Request-ID": "x" * 500}).headers["X-Request-ID"]
    assert odd != "x" * 500 and len(odd) == 32
    r = client.post("/v1/predict", files={"file": ("a.txt", b"text")}, headers={"X-Request-ID": "req-7"})
    assert r.json()["error"]["request_id"] == "req-7"


def test_cors_closed_by_default(client: TestClient, reference: Predictor):
    headers = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in client.get("/v1/model", headers=headers).headers
    assert "access-control-allow-origin" not in client.options("/v1/predict", headers=headers).headers
    with _client(reference, cors_origins=["https://elsewhere.example"]) as c:
        r = c.options("/v1/predict", headers=headers)
        assert r.headers["access-control-allow-origin"] == "https://elsewhere.example"


def test_web_page_uses_no_cdn_and_docs_exist(client: TestClient):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'none'" in r.headers["content-security-policy"]
    html = r.text
    for element in ('id="file"', 'id="result-label"', 'id="probability"', 'id="threshold"', 'id="heatmap"',
                    'id="heatmap-toggle"', 'id="model-name"', 'id="error"', "not a diagnosis"):
        assert element in html
    assert "http://" not in html and "https://" not in html  # everything comes from this server
    for asset in ("/static/app.js", "/static/app.css"):
        assert client.get(asset).status_code == 200
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_results_need_a_database_and_say_so(client: TestClient):
    for path in ("/v1/results", "/v1/results/heatmap?sop_instance_uid=1.2.3"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_results_database"
        assert "covidxray serve --db" in r.json()["error"]["message"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_results_and_heatmaps_from_the_listener_database(reference: Predictor, tmp_path: Path, caplog, backend: str,
                                                         request: pytest.FixtureRequest):
    from covidxray.results import ResultRow, open_results

    db = str(tmp_path / "r.db") if backend == "sqlite" else request.getfixturevalue("postgres").new_database()

    caplog.set_level(logging.INFO)
    rows = [ResultRow(f"1.2.3.{i}", "1.2.4", "1.2.5", "CR", f"2024-03-01T10:0{i}:00.000+00:00",
                      f"2024-03-01T10:0{i}:01.000+00:00", label, probability=p, threshold=0.2, model="m")
            for i, (label, p) in enumerate([("covid", 0.9), ("normal", 0.05), ("not_answered", None)])]
    rows[0] = replace(rows[0], site="north", site_decision="head")
    store = open_results(db)
    store.record(rows, {"1.2.3.0": b"\x89PNG\r\n\x1a\nheat map"})
    with _client(reference, results_db=db, api_key="k") as c:
        assert c.get("/v1/results").status_code == 401  # behind the key like every /v1 route
        key = {"X-API-Key": "k"}
        body = c.get("/v1/results", headers=key).json()
        assert [(r["sop_instance_uid"], r["label"], r["heatmap"]) for r in body["results"]] == [
            ("1.2.3.2", "not_answered", False), ("1.2.3.1", "normal", False), ("1.2.3.0", "covid", True)]
        assert [(r["site"], r["site_decision"]) for r in body["results"]] == [(None, None), (None, None), ("north", "head")]
        assert "not a diagnosis" in body["disclaimer"]
        newest = c.get("/v1/results?since=2024-03-01T10:01Z&limit=1", headers=key).json()["results"]
        assert [r["sop_instance_uid"] for r in newest] == ["1.2.3.2"]
        assert c.get("/v1/results?since=someday", headers=key).status_code == 400
        store.record([ResultRow("1.2.3.9", "1.2.4", "1.2.5", "CR", "2024-03-02T00:00:00.000+00:00", "x", "normal")])
        assert len(c.get("/v1/results", headers=key).json()["results"]) == 4  # the listener writes while we serve
        png = c.get("/v1/results/heatmap?sop_instance_uid=1.2.3.0", headers=key)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content.endswith(b"heat map")
        assert c.get("/v1/results/heatmap?sop_instance_uid=1.2.3.1", headers=key).json()["error"]["code"] == "no_heatmap"
    server_log = [r.getMessage() for r in caplog.records if r.name.startswith("covidxray")]
    assert server_log and not [line for line in server_log if "1.2.3.0" in line]  # UIDs travel in the query string,
    # which the access log leaves out
