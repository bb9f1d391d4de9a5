"""Every common DICOM transfer syntax decodes: pydicom's own test files, and real X-rays compressed each way.

What a PACS sends is mostly JPEG Lossless SV1 (CR/DX), JPEG-LS, JPEG 2000, RLE, 12-bit JPEG Extended
or uncompressed data, sometimes from software that writes no preamble. The decoders are the
pylibjpeg plug-ins and pyjpegls (dependencies of the package); compressions pydicom cannot write are
made with dcmtk's ``dcmcjpeg`` (``make test`` installs Debian's dcmtk).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
from pydicom import uid

import dicoms
from covidxray.errors import ImageError
from covidxray.imaging import read_image, sniff_format

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
# One file per syntax that must decode (transfer syntax in the comment); each failed before the codecs were added.
MUST_DECODE = {
    "JPGExtended.dcm": "12-bit JPEG Extended (.51)",
    "SC_rgb_jpeg_gdcm.dcm": "JPEG Lossless SV1 (.70)",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS lossless (.80)",
    "SC_rgb_jls_lossy_line.dcm": "JPEG-LS near-lossless (.81)",
    "MR_small_jp2klossless.dcm": "JPEG 2000 lossless (.90)",
    "JPEG2000.dcm": "JPEG 2000 (.91)",
    "SC_rgb_jpeg_dcmtk.dcm": "JPEG baseline (.50)",
    "MR_small_RLE.dcm": "RLE lossless (.5)",
    "image_dfl.dcm": "deflated explicit VR little endian",
    "MR_small_bigendian.dcm": "explicit VR big endian",
    "MR_small_implicit.dcm": "implicit VR little endian",
}
# The same MR slice stored four ways: the lossless ones must give the very same pixels.
LOSSLESS_TWINS = ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_implicit.dcm"]
LOSSLESS = [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.RLELossless, uid.JPEGLSLossless,
            uid.JPEG2000Lossless, uid.JPEGLosslessSV1, uid.JPEGLossless]
LOSSY = [uid.JPEGLSNearLossless, uid.JPEG2000, uid.JPEGExtended12Bit]


@pytest.fixture(scope="module")
def xray(manifest: Path) -> Path:
    with open(manifest, newline="") as f:
        return manifest.parent / next(csv.DictReader(f))["path"]


def test_every_bundled_pydicom_file_decodes_or_is_refused_with_a_reason():
    files = sorted(p for p in TEST_FILES.rglob("*") if p.is_file())
    assert len(files) > 70, f"pydicom's test files are missing from {TEST_FILES}"
    decoded, refused = set(), {}
    for path in files:
        name = str(path.relative_to(TEST_FILES))
        try:
            pixels, _ = read_image(path)
        except ImageError as exc:
            refused[name] = exc.reason
            continue
        assert pixels.ndim == 2 and pixels.dtype == np.float32 and 0 <= pixels.min() < pixels.max() <= 1, name
        decoded.add(name)
    assert not {n: r for n, r in refused.items() if "no decoder" in r}
    assert all(len(reason) > 10 for reason in refused.values())
    assert set(MUST_DECODE) <= decoded, set(MUST_DECODE) - decoded
    # Deliberately broken streams in pydicom's collection: refused as such, not for a missing decoder.
    assert "misplaced marker" in refused["JPEG-lossy.dcm"]
    assert refused["MR_truncated.dcm"].startswith("could not decode")
    # Files without preamble are now read as DICOM; these hold no image, and say so.
    for name in ("ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm", "rtstruct.dcm"):
        assert refused[name] == "DICOM file has no pixel data"


def test_lossless_twins_decode_to_the_same_pixels():
    reference, _ = read_image(TEST_FILES / "MR_small.dcm")
    for name in LOSSLESS_TWINS:
        np.testing.assert_array_equal(read_image(TEST_FILES / name)[0], reference, err_msg=name)


@pytest.mark.parametrize("syntax", LOSSLESS + LOSSY, ids=lambda s: uid.UID(s).keyword)
def test_real_xray_in_every_common_syntax(syntax: str, xray: Path, tmp_path: Path):
    original = dicoms.cr(dicoms.xray_pixels(xray, 256, bits=12))
    reference, _ = read_image(dicoms.to_bytes(original))
    ds = dicoms.compressed(original, syntax, tmp_path)
    assert ds.file_meta.TransferSyntaxUID == syntax
    pixels, info = read_image(dicoms.to_bytes(ds))
    assert (info.format, info.modality, info.view_position) == ("dicom", "CR", "PA")
    if syntax in LOSSLESS:
        np.testing.assert_array_equal(pixels, reference)
    else:
        assert np.abs(pixels - reference).mean() < 0.01


def test_8bit_jpeg_baseline_from_dcmtk(xray: Path, tmp_path: Path):
    original = dicoms.cr(dicoms.xray_pixels(xray, 256, bits=8), bits=8)
    pixels, _ = read_image(dicoms.to_bytes(dicoms.compressed(original, uid.JPEGBaseline8Bit, tmp_path)))
    assert np.abs(pixels - read_image(dicoms.to_bytes(original))[0]).mean() < 0.02


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit-VR", "explicit-VR"])
def test_dicom_without_preamble_is_read(implicit: bool, xray: Path):
    ds = dicoms.cr(dicoms.xray_pixels(xray, 128))
    bare = dicoms.without_preamble(ds, implicit=implicit)
    assert bare[128:132] != b"DICM" and sniff_format(bare[:132]) == "dicom"
    pixels, info = read_image(bare, name="bare.dcm")
    np.testing.assert_array_equal(pixels, read_image(dicoms.to_bytes(ds))[0])
    assert info.modality == "CR"


@pytest.mark.parametrize("head", [b"\x08\x00\x05\x00" + b"\xff" * 8, b"\x08\x00\x00\x02CS\x02\x00", b"\x02\x00" + bytes(2),
                                  b"\x00\x08\x00\x05\x0a\x00\x00\x00"])
def test_bytes_that_only_resemble_a_bare_dicom_are_no_format(head: bytes):
    # a huge implicit length; an element number no file starts with; too short; big-endian implicit VR (no such thing)
    assert sniff_format(head) is None
