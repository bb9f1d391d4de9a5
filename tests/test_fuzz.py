"""Fuzzing the input boundary: whatever the bytes, covidxray answers or refuses with its typed error.

Bounded, derandomised Hypothesis runs (the same examples on every machine, about a minute on two
cores) over `load_image` — random bytes, random bytes behind each format's magic number, and
valid PNG/JPEG/GIF/TIFF/BMP/DICOM files of a real X-ray mutated by byte flips, boundary values,
truncations, insertions, deletions and duplications, with a bias towards the headers where the
sizes and offsets live.

The property: `load_image` returns a finite 2-D float32 image in [0, 1] of a plausible size, or
raises `ImageError` naming the input; any other exception, or taking longer than the deadline,
is a bug. The upload endpoint is fuzzed the same way (file contents, file names, content types,
and raw or mutated multipart bodies): every answer is JSON, and never a 5xx.
"""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, RLELossless

import dicoms

from covidxray.errors import ImageError
from covidxray.imaging import _MAGIC, MIN_SIDE, load_image

XRAY_KEY = "images/covid-cxnet/covid/00001.jpg"
FUZZ = settings(
    max_examples=1000,
    deadline=timedelta(seconds=5),  # a hang or a decompression bomb shows up here
    derandomize=True,  # CI sees the same examples every run
    database=None,  # nothing written into the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _xray_64(data_root: Path) -> np.ndarray:
    with Image.open(data_root / XRAY_KEY) as img:
        return np.asarray(img.convert("L").resize((64, 64), Image.Resampling.BILINEAR))


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _dicom(gray: np.ndarray, syntax: str | None = None) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.Modality = "DX"
    ds.set_pixel_data(gray.astype(np.uint16) * 16, "MONOCHROME2", 12)
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, 0, 2048, 4096
    if syntax == RLELossless:
        ds.compress(RLELossless)
    elif syntax == JPEGBaseline8Bit:
        ds.set_pixel_data(gray, "MONOCHROME2", 8)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = encapsulate([_save(Image.fromarray(gray), "JPEG", quality=90)])
        ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def seeds(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Valid files of one real X-ray (64x64, so each example decodes in milliseconds)."""
    gray = _xray_64(data_root)
    img = Image.fromarray(gray)
    cr = dicoms.cr(gray.astype(np.uint16) * 16)
    workdir = tmp_path_factory.mktemp("fuzz-seeds")
    return {
        "png": _save(img, "PNG"),
        "png16": _save(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
        "jpeg": _save(img, "JPEG", quality=90),
        "jpeg-progressive": _save(img.convert("RGB"), "JPEG", progressive=True),
        "gif": _save(img, "GIF", save_all=True, append_images=[img.rotate(90)]),
        "tiff": _save(img, "TIFF", compression="tiff_deflate"),
        "bmp": _save(img, "BMP"),
        "dicom": _dicom(gray),
        "dicom-rle": _dicom(gray, RLELossless),
        "dicom-jpeg": _dicom(gray, JPEGBaseline8Bit),
        # What PACS send most: each codec plug-in (C/C++ libraries) gets its own mutated streams.
        "dicom-jpeg-lossless": dicoms.to_bytes(dicoms.compressed(cr, JPEGLosslessSV1, workdir)),
        "dicom-jpeg-ls": dicoms.to_bytes(dicoms.compressed(cr, JPEGLSLossless, workdir)),
        "dicom-j2k": dicoms.to_bytes(dicoms.compressed(cr, JPEG2000Lossless, workdir)),
    }


def _loads_or_refuses(data: bytes) -> None:
    """The property under test."""
    try:
        out = load_image(data, name="fuzz.bin")
    except ImageError as e:
        assert e.source == "fuzz.bin" and e.reason
        return
    assert out.ndim == 2 and out.dtype == np.float32
    assert np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0
    assert min(out.shape) >= MIN_SIDE


@st.composite
def mutations(draw: st.DrawFn, seed: bytes, keep: int) -> bytes:
    """``seed`` with 1-6 random edits after its first ``keep`` bytes (the magic number, so that
    the edits reach the decoder rather than the sniffer), half of them within 256 bytes of it."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        if len(data) <= keep:
            break
        end = len(data) - 1
        pos = draw(st.one_of(st.integers(keep, min(keep + 255, end)), st.integers(keep, end)))
        op = draw(st.sampled_from(["flip", "boundary", "truncate", "insert", "delete", "duplicate"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "boundary":  # sizes, lengths and offsets set to their extremes
            value = draw(st.sampled_from([b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff", b"\x00\x00",
                                          b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00"]))
            data[pos:pos + len(value)] = value
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        else:
            n = draw(st.integers(1, 256))
            data[pos:pos] = data[pos:pos + n]
    return bytes(data)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes(data: bytes):
    _loads_or_refuses(data)


@FUZZ
@given(magic=st.sampled_from([m for m, _ in _MAGIC] + [bytes(128) + b"DICM"]), tail=st.binary(max_size=2048))
def test_random_bytes_behind_a_magic_number(magic: bytes, tail: bytes):
    """Past the sniffer: every decoder gets garbage that claims to be its format."""
    _loads_or_refuses(magic + tail)


@pytest.mark.parametrize("kind", ["png", "png16", "jpeg", "jpeg-progressive", "gif", "tiff", "bmp", "dicom",
                                  "dicom-rle", "dicom-jpeg", "dicom-jpeg-lossless", "dicom-jpeg-ls", "dicom-j2k"])
def test_mutated_files(kind: str, seeds: dict[str, bytes]):
    load_image(seeds[kind], name=kind)  # the seed itself is a valid X-ray

    @settings(FUZZ, max_examples=600)
    @given(data=mutations(seeds[kind], keep=132 if kind.startswith("dicom") else 8))
    def check(data: bytes) -> None:
        _loads_or_refuses(data)

    check()


# ---------------------------------------------------------------------------------------------- the upload endpoint


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient

    from covidxray.predictor import Predictor
    from covidxray.server import create_app

    with TestClient(create_app(predictor=Predictor()), raise_server_exceptions=False) as test_client:
        yield test_client


def _answers_without_5xx(response) -> None:
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200 and body["label"] == "not_answered":  # read, but no frontal chest X-ray
        assert body["reason"] and body["message"] and "probability" not in body
    elif response.status_code == 200:
        assert body["label"] in ("covid", "normal") and 0.0 <= body["probability"] <= 1.0
    else:
        assert response.status_code in (400, 413, 415, 422) and body["error"]["code"] and body["error"]["message"]


def _contents(seeds: dict[str, bytes]) -> st.SearchStrategy[bytes]:
    """Random bytes, valid files, and mutated files, in about equal parts."""
    mutated = st.sampled_from(sorted(seeds.items())).flatmap(
        lambda item: mutations(item[1], keep=132 if item[0].startswith("dicom") else 8))
    return st.one_of(st.binary(max_size=2048), st.sampled_from(sorted(seeds.values())), mutated)


def test_upload_endpoint(client, seeds: dict[str, bytes]):
    names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)  # what a client can encode
    ctypes = st.sampled_from(["application/octet-stream", "image/png", "application/dicom", "text/html", ""])

    @settings(FUZZ, max_examples=300)
    @given(name=names, data=_contents(seeds), ctype=ctypes)
    def check(name: str, data: bytes, ctype: str) -> None:
        _answers_without_5xx(client.post("/v1/predict", files={"file": (name, data, ctype or None)}))

    check()


def test_batch_endpoint(client, seeds: dict[str, bytes]):
    @settings(FUZZ, max_examples=60)
    @given(files=st.lists(_contents(seeds), min_size=1, max_size=5))
    def check(files: list[bytes]) -> None:
        r = client.post("/v1/predict/batch", files=[("files", (f"f{i}.bin", d)) for i, d in enumerate(files)])
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == len(files)

    check()


def test_raw_multipart_bodies(client, seeds: dict[str, bytes]):
    """The multipart parser itself: random and mutated bodies under random boundaries."""
    valid = (b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
             b"Content-Type: image/png\r\n\r\n" + seeds["png"] + b"\r\n--XyZ--\r\n")
    boundaries = st.one_of(st.just("XyZ"), st.text("abcXYZ019-_'()+,./:=? ", max_size=80))

    @settings(FUZZ, max_examples=300)
    @given(body=st.one_of(st.binary(max_size=1024), mutations(valid, keep=0)), boundary=boundaries)
    def check(body: bytes, boundary: str) -> None:
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
        _answers_without_5xx(client.post("/v1/predict", content=body, headers=headers))

    client.post("/v1/predict", content=valid, headers={"content-type": "multipart/form-data; boundary=XyZ"}).raise_for_status()
    check()
