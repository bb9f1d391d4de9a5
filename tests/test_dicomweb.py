"""DICOMweb STOW-RS on ``serve`` (`covidxray.server.dicomweb_routes`): parts spooled, classified and recorded as the listener does.

The other direction, reports sent by STOW-RS (``listen --send-to-dicomweb``), is tested against
Orthanc's DICOMweb plugin in tests/test_pacs.py.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

import dicoms
from covidxray.cli import main
from covidxray.predictor import Predictor, default_model_path
from covidxray.results import open_results
from covidxray.server import create_app

WAIT_S = 120


def _multipart(parts: list[bytes], boundary: str = "covidxray-test-boundary") -> tuple[str, bytes]:
    body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), p) for p in parts)
    return f'multipart/related; type="application/dicom"; boundary={boundary}', body + b"--%s--\r\n" % boundary.encode()


def test_stow_rs_parts_are_recorded_like_c_stores(manifest: Path, tmp_path: Path, one_torch_thread):
    films = dicoms.films(manifest, 2)
    content_type, body = _multipart([dicoms.to_bytes(ds) for ds in films] + [b"not a DICOM file"])
    db = tmp_path / "r.db"
    with TestClient(create_app(default_model_path(), predictor=Predictor(), results_db=db, api_key="k",
                               dicomweb_spool=tmp_path / "spool")) as client:
        assert client.post("/dicomweb/studies", content=body, headers={"content-type": content_type}).status_code == 401
        r = client.post("/dicomweb/studies", content=body, headers={"content-type": content_type, "X-API-Key": "k"})
        assert r.status_code == 202 and r.headers["content-type"] == "application/dicom+json"  # some stored, one not
        stored = [item["00081155"]["Value"][0] for item in r.json()["00081199"]["Value"]]
        failed, = r.json()["00081198"]["Value"]
        assert stored == [ds.SOPInstanceUID for ds in films] and failed["00081197"]["Value"] == [0xC000]
        store = open_results(db)
        deadline = time.monotonic() + WAIT_S
        while len(store.recent()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert {r.sop_instance_uid: r.label in ("covid", "normal") for r in store.recent()} == dict.fromkeys(stored, True)
        wrong = client.post("/dicomweb/studies", content=b"x", headers={"content-type": "application/dicom", "X-API-Key": "k"})
        assert wrong.status_code == 415
        assert client.get("/metrics").status_code == 200
    assert list((tmp_path / "spool").glob("*.dcm")) == []  # recorded, so they left the spool


def test_stow_rs_refuses_uploads_with_503_while_the_disk_is_full(manifest: Path, tmp_path: Path):
    """"Full": the free-space threshold set above the disk's free space. Nothing is stored, spooled or recorded."""
    content_type, body = _multipart([dicoms.to_bytes(ds) for ds in dicoms.films(manifest, 1)])
    with TestClient(create_app(default_model_path(), predictor=Predictor(), results_db=tmp_path / "r.db",
                               dicomweb_spool=tmp_path / "spool")) as client:
        guard = client.app.state.dicom_node.guard
        guard.min_free_mb = guard.free_mb() + 10**9
        r = client.post("/dicomweb/studies", content=body, headers={"content-type": content_type})
        assert r.status_code == 503 and r.json()["error"]["code"] == "low_disk_space" and r.headers["retry-after"] == "60"
        metrics = client.get("/metrics").text
    assert 'covidxray_errors_total{code="low_disk_space"} 1.0' in metrics
    assert list((tmp_path / "spool").glob("*.dcm")) == [] and open_results(tmp_path / "r.db").recent() == []


def test_stow_rs_refuses_a_chunked_body_over_the_limit_as_it_streams(tmp_path: Path):
    """A chunked upload declares no Content-Length: the limit must hold while the bytes arrive."""
    content_type, body = _multipart([b"\0" * 200_000])
    chunks = (body[i:i + 8192] for i in range(0, len(body), 8192))  # a generator: sent chunked, no length header
    with TestClient(create_app(default_model_path(), predictor=Predictor(), results_db=tmp_path / "r.db",
                               max_upload_bytes=1024, dicomweb_spool=tmp_path / "spool")) as client:
        r = client.post("/dicomweb/studies", content=chunks, headers={"content-type": content_type})
    assert r.status_code == 413 and "at most" in r.json()["error"]["message"]
    assert list((tmp_path / "spool").glob("*.dcm")) == []


def test_stow_rs_is_off_without_a_spool(tmp_path: Path):
    content_type, body = _multipart([b"x"])
    with TestClient(create_app(default_model_path(), predictor=Predictor(), results_db=tmp_path / "r.db")) as client:
        r = client.post("/dicomweb/studies", content=body, headers={"content-type": content_type})
    assert r.status_code == 404 and "--dicomweb-spool" in r.json()["error"]["message"]


def test_reports_by_stow_rs_without_a_spool_and_database_are_refused_before_serving(tmp_path: Path, capsys):
    """``serve --send-to-dicomweb URL`` alone would start and never send a report: refused, saying what it needs."""
    for extra in ([], ["--db", str(tmp_path / "r.db")], ["--dicomweb-spool", str(tmp_path / "spool")]):
        # --model names nothing: were the options not checked first, that would be the error (and nothing would serve)
        assert main(["serve", "--model", str(tmp_path / "none"), "--send-to-dicomweb", "http://127.0.0.1:1/dicom-web",
                     *extra]) == 2
        assert "--send-to-dicomweb needs --db DB and --dicomweb-spool DIR" in capsys.readouterr().err
    assert not (tmp_path / "r.db").exists()
