"""DICOM files for tests, built with pydicom: one place for every test that needs a real DICOM file (or a listener)."""

from __future__ import annotations

import copy
import csv
import io
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread, uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pynetdicom import AE

from covidxray.dicomnode.sr import c_store

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def dx(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 16, **tags) -> Dataset:
    """A minimal valid DX dataset holding ``pixels``; ``tags`` are set last (invalid values allowed, silently)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric, bits)
    with warnings.catch_warnings():  # e.g. NaN is not a valid DS value: some tests need exactly that
        warnings.simplefilter("ignore")
        for key, value in tags.items():
            setattr(ds, key, value)
    return ds


def encapsulated(frame: bytes, syntax: str, shape: tuple[int, int] = (64, 64)) -> Dataset:
    """An 8-bit DX dataset whose single frame is ``frame`` (compressed bytes, not checked), as ``syntax``."""
    ds = dx(np.zeros(shape, np.uint8), bits=8)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """The dataset as a DICOM file (preamble, ``DICM`` and file meta), in memory."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write(path: Path, ds: Dataset) -> Path:
    """Write the dataset as a DICOM file at ``path``; returns ``path``."""
    path.write_bytes(to_bytes(ds))
    return path


# --- Radiographs from the shared data set, as a PACS would send them -------------------------------------------

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-7731-XQ"  # what privacy tests look for in every output
# Compressions pydicom cannot write; dcmtk's dcmcjpeg can (the option that selects each process).
DCMCJPEG = {uid.JPEGLosslessSV1: "+e1", uid.JPEGLossless: "+el", uid.JPEGBaseline8Bit: "+eb",
            uid.JPEGExtended12Bit: "+ee"}
_LOSSY_OPTIONS = {uid.JPEGLSNearLossless: {"jls_error": 2}, uid.JPEG2000: {"j2k_psnr": [50]}}  # mild, like a clinical archive


def xray_pixels(path: Path, size: int = 512, bits: int = 12) -> np.ndarray:
    """A real X-ray (PNG/JPEG) as ``size x size`` unsigned integers of ``bits`` bits, like a CR detector's output."""
    with Image.open(path) as img:
        grey = np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
    return np.round(grey / 255 * (2**bits - 1)).astype(np.uint8 if bits <= 8 else np.uint16)


def cr(pixels: np.ndarray, bits: int = 12, sop_class: str = CR_IMAGE, **tags) -> Dataset:
    """A CR (or, with ``sop_class``, another) chest film of one patient with fresh study, series and instance UIDs.

    It carries a patient name and ID on purpose: nothing downstream may store or print them.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID, ds.Modality = sop_class, "CR"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (uid.generate_uid() for _ in range(3))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, PATIENT_ID, "19600101", "F"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20240301", "101500", "ACC4242", "1"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.set_pixel_data(pixels, "MONOCHROME2", bits)
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def compressed(ds: Dataset, syntax: str, workdir: Path) -> Dataset:
    """A copy of ``ds`` in transfer syntax ``syntax``, compressed by pydicom's encoders, else by dcmtk's dcmcjpeg."""
    if not uid.UID(syntax).is_compressed:
        out = copy.deepcopy(ds)
        out.file_meta.TransferSyntaxUID = syntax  # written in that encoding by to_bytes / write
        return out
    if syntax not in DCMCJPEG:
        out = copy.deepcopy(ds)
        out.compress(syntax, generate_instance_uid=False, **_LOSSY_OPTIONS.get(syntax, {}))  # the same instance
        return out
    if shutil.which("dcmcjpeg") is None:
        raise RuntimeError("dcmtk's dcmcjpeg is missing: install Debian's dcmtk (`make systemdeps` does)")
    src, dst = workdir / f"{ds.SOPInstanceUID}.raw.dcm", workdir / f"{ds.SOPInstanceUID}.{syntax}.dcm"
    write(src, ds)
    subprocess.run(["dcmcjpeg", DCMCJPEG[syntax], "+un", str(src), str(dst)], check=True, capture_output=True, timeout=60)
    return dcmread(dst)


def without_preamble(ds: Dataset, implicit: bool = True) -> bytes:
    """The data set alone, as old software and raw dumps store it: no preamble, no ``DICM``, no file meta."""
    ds = copy.deepcopy(ds)
    ds.file_meta = FileMetaDataset()
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    return buf.getvalue()


def xray_files(manifest: Path, n: int) -> list[Path]:
    """``n`` real X-rays of the shared data set, COVID-19 and normal in turn."""
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    by_label = {label: [manifest.parent / r["path"] for r in rows if r["label"] == label] for label in ("covid", "normal")}
    return [by_label["covid" if i % 2 == 0 else "normal"][i // 2 * 7] for i in range(n)]  # spread over the sources


def films(manifest: Path, n: int, size: int = 256) -> list[Dataset]:
    """``n`` CR films (see `cr`) made from `xray_files`, each of its own patient's study."""
    return [cr(xray_pixels(path, size)) for path in xray_files(manifest, n)]


def start_listen(db: Path, log: Path, *options: str, timeout_s: float = 180) -> tuple[subprocess.Popen, int]:
    """``covidxray listen --port 0 --db DB OPTIONS`` in a subprocess; returns it and its port once it listens.

    Raises:
        RuntimeError: it exited, or did not listen within ``timeout_s`` (the message holds its log).
    """
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "covidxray", "listen", "--port", "0", "--db", str(db), *options],
                                stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if found := re.search(r"listening as \S+ on [0-9.]+:(\d+)", text):
            return proc, int(found.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"covidxray listen exited with {proc.returncode}:\n{text}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"covidxray listen did not start within {timeout_s} s:\n{log.read_text()}")


def store_each(items: list, port: int, syntax: str, acknowledged: list, calling_ae: str = "MODALITY",
               failures: list | None = None) -> None:
    """Send CR ``items`` (data sets or DICOM files) in ``syntax`` one after another over one association to
    ``COVIDXRAY`` on 127.0.0.1:``port``, appending each item whose C-STORE was answered with success to
    ``acknowledged`` as soon as the answer is back; returns when done or when the association is gone.
    ``failures`` gets a line for each item that was not acknowledged, and why."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CR_IMAGE, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="COVIDXRAY")
    for n, item in enumerate(items):
        if not assoc.is_established:
            if failures is not None:
                failures.append(f"{len(items) - n} not sent: the association was {'aborted' if assoc.is_aborted else 'not established'}")
            return
        start = time.monotonic()
        status = c_store(assoc, item)  # not assoc.send_c_store: see c_store
        if status and status.get("Status") == 0x0000:
            acknowledged.append(item)  # list.append is atomic: other threads may read the list meanwhile
        elif failures is not None:
            failures.append(f"status {status.get('Status') if status else 'none (timeout or abort)'} "
                            f"after {time.monotonic() - start:.1f} s")
    if assoc.is_established:
        assoc.release()
