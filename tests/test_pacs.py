"""Against a real PACS: Orthanc routes films to ``covidxray listen`` and ends up holding covidxray's reports.

Orthanc (Debian's ``orthanc``) runs with its own temporary configuration and storage on free
loopback ports, with a Lua script that forwards every film it receives over DICOM to the
``covidxray`` modality, as a hospital's auto-routing rule would. Films reach it from dcmtk's
``storescu`` (Debian's ``dcmtk``: a second, independent DICOM implementation) and through its REST
API; the listener answers with an SR and a heat-map Secondary Capture per film, which are checked
in Orthanc through its REST API. The DICOMweb path is tested end to end too: Orthanc pushes a film
by STOW-RS to ``covidxray serve``, whose SR comes back by STOW-RS and is found with QIDO-RS.
``make test`` installs both packages (``make systemdeps``).
"""

from __future__ import annotations

import io
import json
import shutil
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom import dcmread, uid

import dicoms
from processes import free_port
from covidxray.dicomnode import Listener, ListenerConfig
from covidxray.dicomnode.sr import Destination, send_datasets
from covidxray.results import open_results

pytestmark = pytest.mark.slow

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb
WAIT_S = 180  # for the reports to arrive: classification and two DICOM hops while other tests share the cores
ROUTE_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  -- auto-routing: films that arrive over DICOM go to covidxray; its own reports (SR, OT) stay here
  if origin['RequestOrigin'] == 'DicomProtocol' and tags['Modality'] ~= 'SR' and tags['Modality'] ~= 'OT' then
    SendToModality(instanceId, 'covidxray')
  end
end
"""


class Orthanc:
    """A running Orthanc and a few calls of its REST API."""

    def __init__(self, http_port: int, dicom_port: int):
        self.url, self.dicom_port = f"http://127.0.0.1:{http_port}", dicom_port

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
        return payload if path.endswith("/file") else json.loads(payload or b"null")

    def reports(self, study_uid: str) -> dict[str, list]:
        """Modality -> data sets of that study's SR and OT series (covidxray's answers)."""
        found = self.call("POST", "/tools/lookup", raw=study_uid.encode())
        out: dict[str, list] = {}
        for study in (f["ID"] for f in found if f["Type"] == "Study"):
            for series in self.call("GET", f"/studies/{study}/series"):
                modality = series["MainDicomTags"].get("Modality")
                if modality in ("SR", "OT"):
                    out.setdefault(modality, []).extend(
                        dcmread(io.BytesIO(self.call("GET", f"/instances/{i}/file"))) for i in series["Instances"])
        return out


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    if not Path(ORTHANC).is_file() or not Path(DICOMWEB_PLUGIN).is_file() or not shutil.which("storescu"):
        pytest.fail("Debian's orthanc, orthanc-dicomweb and dcmtk are needed: `make systemdeps` (which `make test` "
                    "runs) or `apt-get install orthanc orthanc-dicomweb dcmtk`")
    home = tmp_path_factory.mktemp("orthanc")
    (home / "route.lua").write_text(ROUTE_LUA)
    node = Orthanc(free_port(), free_port())
    config = {"Name": "covidxray-test", "StorageDirectory": str(home / "db"), "IndexDirectory": str(home / "db"),
              "HttpPort": int(node.url.rsplit(":", 1)[1]), "DicomPort": node.dicom_port, "DicomAet": "ORTHANC",
              "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [DICOMWEB_PLUGIN],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "SaveJobs": False,
              "LuaScripts": [str(home / "route.lua")], "DicomScuTimeout": 60, "HttpTimeout": 60}
    (home / "orthanc.json").write_text(json.dumps(config))
    with open(home / "orthanc.log", "wb") as log:
        proc = subprocess.Popen([ORTHANC, str(home / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=home)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                node.call("GET", "/system")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Orthanc did not start:\n{(home / 'orthanc.log').read_text()}")
                time.sleep(0.2)
        yield node
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def covidxray(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """``covidxray listen`` answering to Orthanc, registered in Orthanc as the modality ``covidxray``; (port, db)."""
    home = tmp_path_factory.mktemp("listener")
    proc, port = dicoms.start_listen(home / "results.db", home / "listen.log", "--threads", "1",
                                     "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--secondary-capture")
    try:
        orthanc.call("PUT", "/modalities/covidxray", {"AET": "COVIDXRAY", "Host": "127.0.0.1", "Port": port})
        assert orthanc.call("POST", "/modalities/covidxray/echo", {}) == {}  # C-ECHO from the PACS
        yield port, home / "results.db"
    finally:
        proc.terminate()
        proc.wait(60)
    assert "Doe" not in (home / "listen.log").read_text()


def _wait_for_reports(orthanc: Orthanc, films: list, secondary_capture: bool = True) -> dict[str, dict[str, list]]:
    deadline = time.monotonic() + WAIT_S
    while True:
        found = {ds.StudyInstanceUID: orthanc.reports(ds.StudyInstanceUID) for ds in films}
        if all(len(r.get("SR", [])) == 1 and (len(r.get("OT", [])) == 1 or not secondary_capture) for r in found.values()):
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"Orthanc holds no complete set of reports after {WAIT_S} s: {found}")
        time.sleep(0.5)


def _answer(sr) -> dict[str, Any]:
    """The answer code and numbers of a covidxray SR."""
    out = {}
    for item in sr.ContentSequence:
        name = item.ConceptNameCodeSequence[0].CodeValue
        if item.ValueType == "CODE":
            out[name] = item.ConceptCodeSequence[0].CodeValue
        elif item.ValueType == "NUM":
            out[name] = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.ValueType == "TEXT":
            out[name] = item.TextValue
        elif item.ValueType == "IMAGE":
            out["source"] = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return out


def _check_reports(found: dict, films: list, db: Path) -> None:
    store = open_results(db)
    deadline = time.monotonic() + 30  # the listener records "sent" once Orthanc's answers are back
    while any(store.get(ds.SOPInstanceUID).report_status is None for ds in films) and time.monotonic() < deadline:
        time.sleep(0.1)
    for ds in films:
        sr, = found[ds.StudyInstanceUID]["SR"]
        row = store.get(ds.SOPInstanceUID)
        answer = _answer(sr)
        assert (answer["answer"], answer["source"]) == (row.label, ds.SOPInstanceUID)
        assert answer["probability"] == pytest.approx(row.probability, abs=1e-6)
        assert answer["threshold"] == pytest.approx(row.threshold, abs=1e-6)
        assert row.model in answer["111001"] and row.weights_sha256 in answer["111003"]
        assert "not a diagnosis" in answer["121106"]
        assert (sr.PatientID, sr.StudyInstanceUID) == (dicoms.PATIENT_ID, ds.StudyInstanceUID)  # filed with the film
        assert row.report_status == "sent"
        capture, = found[ds.StudyInstanceUID]["OT"]
        assert capture.SOPClassUID == uid.UID("1.2.840.10008.5.1.4.1.1.7") and capture.PhotometricInterpretation == "RGB"
    store.close()


def test_reports_go_to_orthanc_by_dicomweb_stow_rs(orthanc, manifest: Path, tmp_path: Path):
    """``--send-to-dicomweb``: the SR and heat map capture of each film reach Orthanc's DICOMweb plugin by STOW-RS."""
    config = ListenerConfig(db=str(tmp_path / "r.db"), port=0, threads=1, secondary_capture=True,
                            send_to_dicomweb=f"{orthanc.url}/dicom-web")
    films = dicoms.films(manifest, 2)
    listener = Listener(config).start()
    try:
        assert send_datasets(films, Destination("COVIDXRAY", "127.0.0.1", listener.port), "MODALITY") == [0, 0]
        assert listener.wait_idle(WAIT_S)
    finally:
        listener.stop()
    _check_reports(_wait_for_reports(orthanc, films), films, tmp_path / "r.db")
    assert listener.stats["reports_sent"] == 2


def test_orthanc_routes_films_sent_with_storescu_and_gets_the_reports(orthanc, covidxray, manifest: Path, tmp_path: Path):
    films = dicoms.films(manifest, 3, size=512)
    films[1] = dicoms.compressed(films[1], uid.JPEGLosslessSV1, tmp_path)  # what CR archives hold most
    paths = [dicoms.write(tmp_path / f"film{i}.dcm", ds) for i, ds in enumerate(films)]
    # -xs: propose JPEG Lossless SV1 besides the uncompressed syntaxes
    sent = subprocess.run(["storescu", "-xs", "-aet", "MODALITY", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port),
                           *map(str, paths)], capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    _check_reports(_wait_for_reports(orthanc, films), films, covidxray[1])


def test_a_film_uploaded_to_orthanc_is_sent_on_with_the_rest_api(orthanc, covidxray, manifest: Path):
    film, = dicoms.films(manifest, 1)
    instance = orthanc.call("POST", "/instances", raw=dicoms.to_bytes(film))["ID"]  # REST upload: not auto-routed
    job = orthanc.call("POST", "/modalities/covidxray/store", {"Resources": [instance], "Synchronous": True})
    assert job["InstancesCount"] == 1 and job["FailedInstancesCount"] == 0
    _check_reports(_wait_for_reports(orthanc, [film]), [film], covidxray[1])


def test_storescu_straight_to_the_listener(orthanc, covidxray, manifest: Path, tmp_path: Path):
    port, db = covidxray
    echo = subprocess.run(["echoscu", "-aec", "COVIDXRAY", "127.0.0.1", str(port)], capture_output=True, timeout=60)
    assert echo.returncode == 0, echo.stderr
    films = dicoms.films(manifest, 2)
    films[0] = dicoms.compressed(films[0], uid.JPEGLSLossless, tmp_path)
    paths = [dicoms.write(tmp_path / f"direct{i}.dcm", ds) for i, ds in enumerate(films)]
    sent = subprocess.run(["storescu", "-xt", "-aec", "COVIDXRAY", "127.0.0.1", str(port), *map(str, paths)],  # -xt: JPEG-LS
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    _check_reports(_wait_for_reports(orthanc, films), films, db)  # the reports still go to the PACS
    wrong = subprocess.run(["storescu", "-aec", "SOMEONE", "127.0.0.1", str(port), str(paths[1])],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0  # a sender must call this node by its AE title


@pytest.fixture
def stow_server(orthanc: Orthanc, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``covidxray serve`` taking STOW-RS and sending its reports to Orthanc by STOW-RS; (base URL, results db)."""
    port, db, log_file = free_port(), tmp_path / "stow.db", tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "COVIDXRAY_API_KEY"}
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "covidxray", "serve", "--port", str(port), "--threads", "1",
                                 "--db", str(db), "--dicomweb-spool", str(tmp_path / "spool"),
                                 "--send-to-dicomweb", f"{orthanc.url}/dicom-web"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"covidxray serve did not start:\n{log_file.read_text()}")
                time.sleep(0.25)
        yield url, db
    finally:
        proc.terminate()
        proc.wait(60)
    assert "Doe" not in log_file.read_text()


def test_orthanc_stow_rs_to_covidxray_and_the_report_back_by_stow_rs_found_by_qido_rs(orthanc, stow_server, manifest: Path):
    """Orthanc -> STOW-RS -> ``covidxray serve`` -> SR -> STOW-RS -> Orthanc, and QIDO-RS in Orthanc finds the SR."""
    url, db = stow_server
    orthanc.call("PUT", "/dicom-web/servers/covidxray", {"Url": f"{url}/dicomweb/"})  # Orthanc posts to {Url}studies
    film, = dicoms.films(manifest, 1)
    instance = orthanc.call("POST", "/instances", raw=dicoms.to_bytes(film))["ID"]
    orthanc.call("POST", "/dicom-web/servers/covidxray/stow", {"Resources": [instance], "Synchronous": True})
    qido = f"/dicom-web/instances?{urllib.parse.urlencode({'StudyInstanceUID': film.StudyInstanceUID, 'Modality': 'SR'})}"
    deadline = time.monotonic() + WAIT_S
    while not (found := orthanc.call("GET", qido)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(found) == 1, f"QIDO-RS found no SR of the study after {WAIT_S} s"
    sr_uid = found[0]["00080018"]["Value"][0]
    sr, = orthanc.reports(film.StudyInstanceUID)["SR"]
    store = open_results(db)
    row = store.get(film.SOPInstanceUID)
    deadline = time.monotonic() + 30  # "sent" is recorded once Orthanc's STOW-RS answer is back
    while row.report_status is None and time.monotonic() < deadline:
        time.sleep(0.1)
        row = store.get(film.SOPInstanceUID)
    store.close()
    answer = _answer(sr)
    assert sr.SOPInstanceUID == sr_uid and (answer["answer"], answer["source"]) == (row.label, film.SOPInstanceUID)
    assert row.label in ("covid", "normal") and row.report_status == "sent"
