"""Privacy and hardening of the command line and the REST API.

* Patient data in DICOM tags (name, ID, birth date, ...) never reaches a response, an error
  message, a log line (every logger, at DEBUG) or the CLI's output — for good files and for
  every way a DICOM can be refused.
* The upload limit is enforced before the body is read; every response carries a request ID
  that the access log repeats; no CORS headers unless configured; the API key is compared in
  constant time and checked before any upload is read.
"""

from __future__ import annotations

import inspect
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

import dicoms
from covidxray import server
from covidxray.cli import main
from covidxray.predictor import Predictor
from covidxray.server import create_app

XRAY_KEY = "images/covid-cxnet/covid/00001.jpg"
PHI = {  # fake patient data: none of these strings may come back anywhere
    "PatientName": "Doe^Jane", "PatientID": "SECRET-123", "PatientBirthDate": "19470412",
    "InstitutionName": "St Elsewhere Hospital", "AccessionNumber": "ACC-77812", "ReferringPhysicianName": "House^Gregory",
}
LEAKS = ["Doe", "Jane", "SECRET-123", "19470412", "Elsewhere", "ACC-77812", "Gregory"]


def _assert_clean(text: str, where: str) -> None:
    found = [s for s in LEAKS if s in text]
    assert not found, f"patient data {found} in {where}"


def _assert_clean_response(body: dict, where: str) -> None:
    """Like `_assert_clean` on a JSON answer; its base64 PNGs are checked for metadata chunks instead
    (random base64 or compressed pixels may spell "Doe" by chance, a text chunk is no chance)."""
    import base64
    import struct

    for key in ("heatmap_png", "preview_png"):
        if key in body:
            png = base64.b64decode(body.pop(key))
            chunks, pos = [], 8
            while pos < len(png):
                length, kind = struct.unpack(">I4s", png[pos:pos + 8])
                chunks.append(kind.decode())
                pos += 12 + length
            assert set(chunks) <= {"IHDR", "PLTE", "IDAT", "IEND"}, f"metadata chunks {chunks} in {where}"
    _assert_clean(json.dumps(body), where)


@pytest.fixture(scope="module")
def gray(data_root: Path) -> np.ndarray:
    with Image.open(data_root / XRAY_KEY) as img:
        return np.asarray(img.convert("L").resize((256, 256)))


def _dicom(gray: np.ndarray, **tags) -> bytes:
    return dicoms.to_bytes(dicoms.dx(gray.astype(np.uint16) * 16, "MONOCHROME2", 12, **PHI, **tags))


def _corrupt_jpeg_dicom(gray: np.ndarray) -> bytes:
    """A DICOM that claims JPEG compression but holds junk quoting the patient's name and ID."""
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(_dicom(gray)))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + b"Doe^Jane SECRET-123" * 4])  # junk that quotes the patient
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def phi_dicoms(gray: np.ndarray) -> dict[str, bytes]:
    """A good DICOM and one for every way a DICOM is refused, all carrying the fake patient tags."""
    good = _dicom(gray, ViewPosition="PA")
    return {
        "good.dcm": good,
        "mono1.dcm": _dicom(gray, PhotometricInterpretation="MONOCHROME1"),
        "lateral.dcm": _dicom(gray, ViewPosition="LL"),
        "nan.dcm": _dicom(gray, RescaleSlope="NaN", RescaleIntercept=0),
        "nopixels.dcm": good[: good.index(b"\xe0\x7f\x10\x00")],
        "cut-in-name.dcm": good[: good.index(b"Doe^Jane") + 4],
        "cut-in-pixels.dcm": good[:-3000],
        "badjpeg.dcm": _corrupt_jpeg_dicom(gray),
    }


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor()


@pytest.fixture(scope="module")
def client(predictor: Predictor):
    with TestClient(create_app(predictor=predictor), raise_server_exceptions=False) as c:
        yield c


# ---------------------------------------------------------------------------------------------- patient data


def test_dicom_tags_never_reach_the_api_or_its_logs(phi_dicoms: dict[str, bytes], client, caplog: pytest.LogCaptureFixture):
    caplog.set_level("DEBUG")  # every logger, every level
    statuses = {}
    for name, data in phi_dicoms.items():
        for query in ("", "?explain=true&preview=true"):
            r = client.post(f"/v1/predict{query}", files={"file": (name, data, "application/dicom")})
            statuses[name] = r.status_code
            assert r.status_code < 500, r.text
            _assert_clean_response(r.json(), f"the response for {name}{query}")
            _assert_clean(json.dumps(dict(r.headers)), f"the headers for {name}")
    r = client.post("/v1/predict/batch", files=[("files", (n, d, "application/dicom")) for n, d in phi_dicoms.items()])
    assert r.status_code == 200
    _assert_clean_response(r.json(), "the batch response")
    _assert_clean(caplog.text, "the logs")
    assert statuses["good.dcm"] == statuses["mono1.dcm"] == statuses["lateral.dcm"] == 200  # lateral: 200, no answer
    assert all(400 <= s < 500 for n, s in statuses.items() if n not in ("good.dcm", "mono1.dcm", "lateral.dcm"))


def test_dicom_tags_never_reach_the_cli(phi_dicoms: dict[str, bytes], tmp_path: Path, predictor: Predictor,
                                        monkeypatch: pytest.MonkeyPatch, capsys, caplog: pytest.LogCaptureFixture):
    monkeypatch.setattr("covidxray.predictor.Predictor", lambda *a, **k: predictor)
    caplog.set_level("DEBUG")
    paths = []
    for name, data in phi_dicoms.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    for fmt in ("json", "table"):
        assert main(["-v", "predict", *paths, "--format", fmt]) == 2  # the refused ones make it exit 2
        out, err = capsys.readouterr()
        _assert_clean(out + err, f"the CLI's output ({fmt})")
        assert "Traceback" not in err
    _assert_clean(caplog.text, "the CLI's logs")


# ---------------------------------------------------------------------------------------------- upload limits


def _request_log(caplog: pytest.LogCaptureFixture, request_id: str) -> str:
    lines = [r.getMessage() for r in caplog.records if f"request_id={request_id}" in r.getMessage()]
    assert len(lines) == 1, lines
    return lines[0]


def test_declared_size_is_refused_before_the_body_is_read(client, caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO", logger="covidxray")
    r = client.post("/v1/predict", content=b"--b\r\n", headers={
        "content-type": "multipart/form-data; boundary=b", "content-length": str(10**9), "x-request-id": "big-1"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert "bytes_in=0 " in _request_log(caplog, "big-1")  # not one byte of the body was read


@pytest.fixture(scope="module")
def small_client(predictor: Predictor):
    """An app whose upload limit is 64 KiB, to test the limit with small files."""
    with TestClient(create_app(predictor=predictor, max_upload_bytes=64 * 1024), raise_server_exceptions=False) as c:
        yield c


def test_upload_limit_is_exact(small_client, data_root: Path):
    jpeg = (data_root / XRAY_KEY).read_bytes()
    at_limit = jpeg + bytes(64 * 1024 - len(jpeg))  # JPEG decoders ignore what follows the end marker
    assert small_client.post("/v1/predict", files={"file": ("x.jpg", at_limit)}).status_code == 200
    r = small_client.post("/v1/predict", files={"file": ("x.jpg", at_limit + b"\0")})
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    assert r.json()["error"]["message"].startswith("x.jpg: ")


def test_a_body_without_length_is_cut_at_the_limit(small_client):
    def body():  # chunked: no Content-Length to check up front
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n\r\n"
        for _ in range(64):
            yield bytes(16 * 1024)

    r = small_client.post("/v1/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413, r.text


@pytest.mark.parametrize("headers,body,status", [
    ({"content-type": "application/json"}, b'{"file": "x"}', 400),
    ({"content-type": "multipart/form-data; boundary=b"}, b"--b\r\nnot a part at all", 400),
    ({"content-type": "multipart/form-data"}, b"", 400),
    ({"content-type": "multipart/form-data; boundary=b"}, b"--b--\r\n", 400),
], ids=["json", "broken-multipart", "no-boundary", "no-file"])
def test_malformed_requests_are_400_json(client, headers: dict, body: bytes, status: int):
    r = client.post("/v1/predict", content=body, headers=headers)
    assert r.status_code == status and r.json()["error"]["code"]


# ---------------------------------------------------------------------------------------------- request IDs, CORS, names


def test_request_id_in_header_body_and_log(client, caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO", logger="covidxray")
    r = client.post("/v1/predict", files={"file": ("notes.png", b"plain text")})
    request_id = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert r.json()["error"]["request_id"] == request_id
    assert "status=415" in _request_log(caplog, request_id)
    assert client.get("/healthz", headers={"X-Request-ID": "trace-42"}).headers["x-request-id"] == "trace-42"
    hostile = client.get("/healthz", headers={"X-Request-ID": "x" * 65 + " <script>"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", hostile)  # an untame ID is replaced, never echoed


def test_no_cors_headers_by_default(client, data_root: Path):
    origin = {"Origin": "https://evil.example"}
    answers = [
        client.get("/healthz", headers=origin),
        client.post("/v1/predict", files={"file": ("x.jpg", (data_root / XRAY_KEY).read_bytes())}, headers=origin),
        client.options("/v1/predict", headers={**origin, "Access-Control-Request-Method": "POST"}),
    ]
    for r in answers:
        assert not [h for h in r.headers if h.lower().startswith("access-control-")], dict(r.headers)
    assert answers[1].status_code == 200


@pytest.mark.parametrize("name", ["../../etc/passwd", "C:\\Windows\\x.jpg", "a\x00b\x1b[31m.jpg", "<script>.jpg", "n" * 2000])
def test_hostile_file_names_are_tamed(client, data_root: Path, name: str):
    r = client.post("/v1/predict", files={"file": (name, (data_root / XRAY_KEY).read_bytes())})
    assert r.status_code == 200
    echoed = r.json()["filename"]
    assert "/" not in echoed and "\\" not in echoed and echoed.isprintable() and 0 < len(echoed) <= 120
    assert r.headers["content-type"] == "application/json"


def test_a_file_name_beyond_the_header_limit_is_a_clear_400(client, data_root: Path):
    r = client.post("/v1/predict", files={"file": ("n" * 5000, (data_root / XRAY_KEY).read_bytes())})
    assert r.status_code == 400 and "header size" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- API key


@pytest.fixture(scope="module")
def keyed_client(predictor: Predictor):
    with TestClient(create_app(predictor=predictor, api_key="s3cret-key"), raise_server_exceptions=False) as c:
        yield c


def test_api_key(keyed_client, data_root: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level("DEBUG")
    upload = {"file": ("x.jpg", (data_root / XRAY_KEY).read_bytes())}
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": "s3cret"}, {"X-API-Key": "s3cret-key-and-more"},
                    {"Authorization": "Basic s3cret-key"}):
        r = keyed_client.post("/v1/predict", files=upload, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", headers
        assert r.headers["www-authenticate"] == "Bearer"
    for headers in ({"X-API-Key": "s3cret-key"}, {"Authorization": "Bearer s3cret-key"}):
        assert keyed_client.post("/v1/predict", files=upload, headers=headers).status_code == 200
    assert keyed_client.get("/healthz").status_code == 200  # probes need no key
    assert "s3cret-key" not in caplog.text


def test_api_key_is_checked_before_the_upload_is_read(keyed_client, caplog: pytest.LogCaptureFixture):
    caplog.set_level("INFO", logger="covidxray")
    r = keyed_client.post("/v1/predict", content=b"--b\r\n", headers={
        "content-type": "multipart/form-data; boundary=b", "content-length": str(10**9), "x-request-id": "nokey-1"})
    assert r.status_code == 401
    assert "bytes_in=0 " in _request_log(caplog, "nokey-1")


def test_api_key_is_compared_in_constant_time():
    """Timing cannot be tested reliably here; the code is: hmac.compare_digest, no == on the key."""
    source = inspect.getsource(server.app)  # the whole module: the key check is a step create_app wires in
    assert "hmac.compare_digest(" in source
    assert not re.search(r"(supplied|token|key)\s*[!=]=\s*api_key|api_key\s*[!=]=", source)
