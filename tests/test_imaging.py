"""Tests for covidxray.imaging: real X-rays, generated files of every format, and broken input."""

from __future__ import annotations

import csv
import io
import logging
import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
import pydicom
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless

import dicoms
from covidxray import imaging
from covidxray.errors import ImageError
from covidxray.imaging import load_image, sniff_format

DATA_ROOT = Path(
    os.environ.get(
        "COVIDXRAY_DATA", Path(__file__).resolve().parents[1] / ".." / "shared/datasets/covid-cxr"
    )
)
RNG = np.random.default_rng(0)


def _gradient(height: int = 64, width: int = 128, high: int = 65535) -> np.ndarray:
    """uint16 image whose value grows left to right, each row the same."""
    row = np.linspace(0, high, width).round().astype(np.uint16)
    return np.tile(row, (height, 1))


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _dicom(
    path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 16, **tags
) -> Path:
    """Write a minimal, valid DX DICOM file with fake patient tags."""
    return dicoms.write(path, dicoms.dx(pixels, photometric, bits, PatientName="Doe^Jane", PatientID="SECRET-PID-42", **tags))


def _encapsulated_dicom(path: Path, frame: bytes, syntax: str) -> Path:
    """Write an 8-bit 64x64 DICOM whose pixel data is ``frame``, compressed as ``syntax``."""
    return dicoms.write(path, dicoms.encapsulated(frame, syntax))


def _png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` 1-bit pixels (no real pixel data)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def _noise(path: Path, size: int = 128) -> Path:
    """Random 8-bit pixels (so the file barely compresses), in the format of the suffix."""
    return _save(Image.fromarray(RNG.integers(0, 256, (size, size), dtype=np.uint8)), path)


def _writing(content: bytes | str):
    """A file maker that writes ``content`` as-is."""

    def make(path: Path) -> Path:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    return make


def _check_gray(out: np.ndarray, shape: tuple[int, int]) -> None:
    assert out.dtype == np.float32
    assert out.shape == shape
    assert out.min() >= 0.0 and out.max() <= 1.0


# --- real X-rays ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_xrays() -> list[Path]:
    """One JPEG per source from the shared data set (so different encoders are covered)."""
    manifest = DATA_ROOT / "manifest.csv"
    if not manifest.is_file():
        pytest.fail(f"real X-ray data not found at {DATA_ROOT} (set COVIDXRAY_DATA)")
    first_per_source: dict[str, Path] = {}
    with manifest.open(newline="") as file:
        for row in csv.DictReader(file):
            first_per_source.setdefault(row["source"], DATA_ROOT / row["path"])
    return list(first_per_source.values())


def test_real_xrays_load_as_normalised_gray(real_xrays):
    assert len(real_xrays) >= 3
    for path in real_xrays:
        out = load_image(path)
        with Image.open(path) as img:
            width, height = img.size
        _check_gray(out, (height, width))
        assert out.std() > 0.05, f"{path} looks constant"
        np.testing.assert_array_equal(out, load_image(path.read_bytes(), name=path.name))


def test_real_jpeg_is_divided_by_255(real_xrays):
    with Image.open(real_xrays[0]) as img:
        expected = np.asarray(img.convert("L"), np.float32) / 255
    np.testing.assert_array_equal(load_image(real_xrays[0]), expected)


# --- generated files of every supported format ---------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_gradient_is_preserved(tmp_path, suffix):
    raw = _gradient()
    path = _save(Image.fromarray(raw), tmp_path / f"grad16{suffix}")
    out = load_image(path)
    _check_gray(out, raw.shape)
    np.testing.assert_allclose(out, raw / 65535, atol=1e-6)
    assert len(np.unique(out)) == raw.shape[1]  # more levels than 8 bits could hold


def test_float_tiff_is_min_max_scaled(tmp_path):
    raw = np.linspace(-3.0, 5.0, 64 * 64, dtype=np.float32).reshape(64, 64)
    out = load_image(_save(Image.fromarray(raw, mode="F"), tmp_path / "float.tif"))
    np.testing.assert_allclose(out, (raw + 3) / 8, atol=1e-6)


def test_colour_modes_become_luma(tmp_path):
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :16] = (255, 0, 0)
    rgb[:, 16:32] = (0, 255, 0)
    rgb[:, 32:] = (0, 0, 255)
    image = Image.fromarray(rgb)
    rgba = np.dstack([rgb, np.full((32, 48), 7, np.uint8)])  # nearly transparent: ignored
    files = {
        "rgb.png": _save(image, tmp_path / "rgb.png"),
        "rgba.png": _save(Image.fromarray(rgba), tmp_path / "rgba.png"),
        "palette.png": _save(image.convert("P"), tmp_path / "palette.png"),
        "rgb.bmp": _save(image, tmp_path / "rgb.bmp"),
        "la.png": _save(image.convert("LA"), tmp_path / "la.png"),
    }
    expected = np.array([76, 150, 29]) / 255  # BT.601 luma of pure red, green, blue
    for name, path in files.items():
        out = load_image(path)
        _check_gray(out, (32, 48))
        np.testing.assert_allclose(out[0, [0, 16, 32]], expected, atol=1 / 255, err_msg=name)


def test_cmyk_jpeg(tmp_path):
    cmyk = np.zeros((32, 64, 4), np.uint8)
    cmyk[:, 32:, 3] = 255  # right half full black ink, left half no ink (white)
    path = _save(Image.fromarray(cmyk, mode="CMYK"), tmp_path / "cmyk.jpg", quality=95)
    out = load_image(path)
    _check_gray(out, (32, 64))
    assert out[:, :24].mean() > 0.9 and out[:, 40:].mean() < 0.1


def test_multiframe_tiff_and_gif_use_first_frame(tmp_path):
    first = np.zeros((32, 64), np.uint8)
    first[:, 32:] = 255
    frames = [Image.fromarray(first), Image.fromarray(255 - first)]
    for name in ("stack.tif", "anim.gif"):
        path = _save(frames[0], tmp_path / name, save_all=True, append_images=frames[1:])
        with Image.open(path) as img:
            assert img.n_frames == 2
        out = load_image(path)
        _check_gray(out, (32, 64))
        assert out[:, :32].max() < 0.05 and out[:, 32:].min() > 0.95, name


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((32, 64), np.uint8)  # 64 wide, 32 tall as stored
    stored[:16, :16] = 255  # bright block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = _save(Image.fromarray(stored), tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = load_image(path)
    _check_gray(out, (64, 32))  # transposed relative to the stored size
    assert out[:16, -16:].mean() > 0.9  # clockwise turn moves top-left to top-right
    assert out[:16, :16].mean() < 0.1


def test_content_is_sniffed_not_the_extension(tmp_path):
    raw = _gradient(32, 32)
    dicom_as_png = _dicom(tmp_path / "scan.png", raw)
    png_as_dcm = _save(Image.fromarray(raw), tmp_path / "image.dcm", format="PNG")
    np.testing.assert_allclose(load_image(dicom_as_png), raw / 65535, atol=1e-6)
    np.testing.assert_allclose(load_image(png_as_dcm), raw / 65535, atol=1e-6)


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "png"),
        (b"\xff\xd8\xff\xe0" + bytes(200), "jpeg"),
        (b"BM" + bytes(200), "bmp"),
        (b"II*\x00" + bytes(200), "tiff"),
        (b"MM\x00*" + bytes(200), "tiff"),
        (b"GIF89a" + bytes(200), "gif"),
        (b"II*\x00" + bytes(124) + b"DICM", "dicom"),  # TIFF-looking preamble: DICOM wins
        (b"<html><body>", None),
        (b"%PDF-1.7", None),
        (b"", None),
    ],
)
def test_sniff_format(head, expected):
    assert sniff_format(head) == expected


def test_bytes_and_path_agree_and_bytes_are_named(tmp_path):
    path = _noise(tmp_path / "noise.png")
    np.testing.assert_array_equal(load_image(path), load_image(path.read_bytes()))
    with pytest.raises(ImageError, match=r"^upload\.png: "):
        load_image(b"not an image", name="upload.png")
    with pytest.raises(ImageError, match=r"^<bytes>: file is empty"):
        load_image(b"")


# --- DICOM ----------------------------------------------------------------------------------


def test_dicom_rescale_keeps_values_and_order(tmp_path):
    raw = _gradient(32, 64, high=4000)
    out = load_image(
        _dicom(tmp_path / "m2.dcm", raw, bits=12, RescaleSlope=2, RescaleIntercept=-1024)
    )
    _check_gray(out, raw.shape)
    np.testing.assert_allclose(out, raw / 4000, atol=1e-6)
    # A negative slope reverses the order, which proves the modality LUT is applied.
    flipped = load_image(
        _dicom(tmp_path / "neg.dcm", raw, bits=12, RescaleSlope=-1, RescaleIntercept=0)
    )
    np.testing.assert_allclose(flipped, 1 - raw / 4000, atol=1e-6)


def _full_film_reference(ds) -> np.ndarray:
    """What DICOM decoding computed before its lookup table: both LUTs, then min-max, in float64 over the whole film."""
    values = np.asarray(apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, index=0), dtype=np.float64)
    return ((values - values.min()) / (values.max() - values.min())).astype(np.float32)


def _voi_lut(lut: list[int], first: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(lut), first, 16]
    item.LUTData = np.array(lut, "<u2").tobytes()
    return item


_RAMP = np.arange(-700, 3396, 4, dtype=np.int16).reshape(32, 32)  # 1024 values, negative ones too
_LUT_CASES = {  # a film's pixels and tags: every LUT the decoder applies, signed and unsigned, monotonic or not
    "rescale+window": (RNG.integers(0, 4096, (40, 50)).astype(np.uint16), dict(
        RescaleSlope=0.7, RescaleIntercept=-1024, WindowCenter=400, WindowWidth=1500)),
    "negative slope, signed": (_RAMP, dict(RescaleSlope=-1.5, RescaleIntercept=12)),
    "sigmoid window": (RNG.integers(0, 4096, (40, 50)).astype(np.uint16), dict(
        WindowCenter=2000, WindowWidth=900, VOILUTFunction="SIGMOID")),
    "VOI LUT, not monotonic": (np.tile(np.array([[3, 5, 6, 9], [3, 4, 5, 6]], np.uint16), (8, 4)), dict(
        VOILUTSequence=[_voi_lut([900, 100, 400, 50, 0, 1000, 300], 3)])),
    "8-bit": (RNG.integers(7, 201, (30, 30)).astype(np.uint8), {}),
    "full 16-bit range": (np.tile(np.array([[0, 65535], [1, 2]], np.uint16), (8, 8)), {}),
}


@pytest.mark.parametrize("case", _LUT_CASES)
def test_dicom_lookup_table_gives_the_full_film_numbers(tmp_path, case):
    pixels, tags = _LUT_CASES[case]
    ds = dicoms.dx(pixels, bits=8 * pixels.dtype.itemsize, **tags)
    if pixels.dtype.kind == "i":
        ds.PixelRepresentation = 1
    ds = pydicom.dcmread(dicoms.write(tmp_path / "lut.dcm", ds))
    expected = _full_film_reference(ds)
    assert len(np.unique(expected)) > 2  # the case exercises the LUTs, not just two levels
    np.testing.assert_array_equal(load_image(tmp_path / "lut.dcm"), expected)  # bit for bit, not approximately


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"])
def test_pydicom_films_decode_to_the_full_film_numbers(name):
    path = get_testdata_file(name, download=False)
    np.testing.assert_array_equal(load_image(path), _full_film_reference(pydicom.dcmread(path)))


def test_dicom_monochrome1_is_inverted(tmp_path):
    raw = _gradient(32, 64)
    mono2 = load_image(_dicom(tmp_path / "m2.dcm", raw, "MONOCHROME2"))
    mono1 = load_image(_dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1"))
    assert mono2[0, -1] == 1.0 and mono1[0, -1] == 0.0  # highest raw value: dark in MONOCHROME1
    np.testing.assert_allclose(mono1, 1 - mono2, atol=1e-6)


def test_dicom_window_clips_outside_the_window(tmp_path):
    raw = _gradient(32, 128, high=4095)
    path = _dicom(tmp_path / "win.dcm", raw, bits=12, WindowCenter=2048, WindowWidth=1024)
    out = load_image(path)
    _check_gray(out, raw.shape)
    assert (out[raw < 1500] == 0).all() and (out[raw > 2600] == 1).all()
    inside = out[0][(raw[0] > 1600) & (raw[0] < 2500)]
    assert inside.size > 5 and (np.diff(inside) > 0).all() and 0 < inside.min() < inside.max() < 1


def test_dicom_multiframe_uses_first_frame(tmp_path):
    first = _gradient(32, 64, high=1000)
    frames = np.stack([first, 1000 - first])
    out = load_image(_dicom(tmp_path / "multi.dcm", frames, bits=16))
    np.testing.assert_allclose(out, first / 1000, atol=1e-6)


def test_dicom_rgb_becomes_luma(tmp_path):
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :16] = (255, 0, 0)
    rgb[:, 16:32] = (0, 255, 0)  # brightest luma
    out = load_image(_dicom(tmp_path / "rgb.dcm", rgb, "RGB", bits=8))
    _check_gray(out, (32, 48))
    np.testing.assert_allclose(out[0, [0, 16, 32]], [0.299 / 0.587, 1.0, 0.0], atol=1e-6)


def test_dicom_palette_colour_uses_the_lookup_table(tmp_path):
    indices = np.tile(np.repeat(np.arange(4, dtype=np.uint8), 16), (32, 1))  # 4 bands of 16 px
    luts = {"Red": [0, 1, 0, 1], "Green": [0, 0, 1, 1], "Blue": [0, 0, 0, 1]}  # K, R, G, W
    tags = {}
    for colour, lut in luts.items():
        tags[f"{colour}PaletteColorLookupTableDescriptor"] = [4, 0, 16]
        tags[f"{colour}PaletteColorLookupTableData"] = (np.array(lut, np.uint16) * 65535).tobytes()
    out = load_image(_dicom(tmp_path / "palette.dcm", indices, "PALETTE COLOR", bits=8, **tags))
    # black, red, green, white after BT.601 luma and min-max scaling
    np.testing.assert_allclose(out[0, ::16], [0.0, 0.299, 0.587, 1.0], atol=1e-6)


def test_dicom_jpeg_baseline_is_decoded(tmp_path):
    src = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    buffer = io.BytesIO()
    Image.fromarray(src).save(buffer, "JPEG", quality=95)
    path = _encapsulated_dicom(tmp_path / "jpeg.dcm", buffer.getvalue(), JPEGBaseline8Bit)
    out = load_image(path)
    _check_gray(out, (64, 64))
    assert np.abs(out - src / 255).max() < 0.05


def test_dicom_without_decoder_names_the_syntax(tmp_path, monkeypatch):
    """Every common syntax has a decoder here (tests/test_dicom_codecs.py); a machine without the plug-in
    is simulated, so the message it would get is still checked."""
    missing = type("Missing", (), {"is_available": False, "missing_dependencies": ["pyjpegls"]})()
    monkeypatch.setattr(imaging, "get_decoder", lambda syntax: missing)
    path = _encapsulated_dicom(tmp_path / "jls.dcm", b"\xff\xd8garbage", JPEGLSLossless)
    with pytest.raises(ImageError, match="JPEG-LS Lossless") as err:
        load_image(path)
    assert "jls.dcm" in str(err.value) and "install" in str(err.value)


def test_dicom_unknown_syntax(tmp_path):
    path = _encapsulated_dicom(tmp_path / "odd.dcm", b"garbage", JPEGLSLossless)
    # Same length as the real UID, so the file stays well formed apart from the syntax.
    path.write_bytes(path.read_bytes().replace(JPEGLSLossless.encode(), b"1.2.840.10008.1.2.4.99"))
    with pytest.raises(ImageError, match=r"odd\.dcm: .*1\.2\.840\.10008\.1\.2\.4\.99"):
        load_image(path)


def test_dicom_errors_and_privacy(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="covidxray")
    raw = _gradient(32, 64)
    load_image(_dicom(tmp_path / "ok.dcm", raw))
    assert "ok.dcm" in caplog.text  # the debug line exists...
    assert "Doe" not in caplog.text and "SECRET" not in caplog.text  # ...without patient tags

    no_pixels = _dicom(tmp_path / "nopix.dcm", raw)
    ds_bytes = no_pixels.read_bytes()
    ds_bytes = ds_bytes[: ds_bytes.index(b"\xe0\x7f\x10\x00")]  # cut at the (7FE0,0010) tag
    no_pixels.write_bytes(ds_bytes)
    with pytest.raises(ImageError, match=r"nopix\.dcm: DICOM file has no pixel data") as err:
        load_image(no_pixels)
    assert "Doe" not in str(err.value)

    crazy = _dicom(tmp_path / "inf.dcm", raw, RescaleSlope="1e308", RescaleIntercept=0)
    with pytest.raises(ImageError, match=r"inf\.dcm: .*non-finite"):
        load_image(crazy)

    blank = _dicom(tmp_path / "blank.dcm", np.full((32, 64), 7, np.uint16))
    with pytest.raises(ImageError, match=r"blank\.dcm: image is blank"):
        load_image(blank)

    # Rows/Columns are checked before any pixel is decoded, even if the data is short.
    strip = _dicom(tmp_path / "strip.dcm", np.zeros((8, 4000), np.uint8), bits=8)
    with pytest.raises(ImageError, match=r"strip\.dcm: absurd size 4000x8"):
        load_image(strip)


def test_float_tiff_with_nan_is_refused(tmp_path):
    raw = np.ones((32, 32), np.float32)
    raw[3, 4] = np.nan
    path = _save(Image.fromarray(raw, mode="F"), tmp_path / "nan.tif")
    with pytest.raises(ImageError, match=r"nan\.tif: image contains non-finite"):
        load_image(path)


# --- broken input ---------------------------------------------------------------------------


def _truncated(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.txt", "hello")
    return path


def _loop(path: Path) -> Path:
    other = path.with_name("loop_b.png")
    path.symlink_to(other)
    other.symlink_to(path)
    return path


def _blank_png(path: Path) -> Path:
    return _save(Image.fromarray(np.full((32, 32), 9, np.uint16)), path)


BROKEN = {  # file name -> (how to make it from its path, expected reason)
    "empty.png": (_writing(b""), "file is empty"),
    "truncated.png": (lambda p: _truncated(_noise(p)), "could not decode"),
    "truncated.jpg": (lambda p: _truncated(_noise(p)), "could not decode"),
    "text.png": (_writing("hello, I am text"), "not a recognised image format"),
    "page.html": (_writing("<!doctype html><p>hi</p>"), "not a recognised image format"),
    "archive.zip": (_zip, "not a recognised image format"),
    "doc.pdf": (_writing(b"%PDF-1.7\n%\xe2\xe3\n1 0 obj"), "not a recognised image format"),
    "badheader.png": (_writing(b"\x89PNG\r\n\x1a\nnonsense"), "could not decode"),
    "notes.bmp": (_writing("BMW service notes, not a bitmap"), "could not decode"),
    "garbage.tif": (_writing(b"II*\x00" + b"garbage " * 40), "corrupt TIFF header"),
    "folder.png": (lambda p: p.mkdir() or p, "is a directory"),
    "missing.png": (lambda p: p, "file not found"),
    "loop_a.png": (_loop, "symlink loop"),
    "tiny.png": (lambda p: _save(Image.new("L", (1, 1)), p), "absurd size 1x1"),
    "strip.png": (_writing(_png_header(100_000, 10)), "absurd size 100000x10"),
    "big.png": (_writing(_png_header(8000, 8000)), "image too large: 8000x8000"),
    "warnbomb.png": (_writing(_png_header(10_000, 10_000)), "decompression bomb"),
    "bomb.png": (_writing(_png_header(30_000, 30_000)), "decompression bomb"),
    "blank.png": (_blank_png, "image is blank (constant intensity)"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_input_raises_image_error(tmp_path, name):
    make, reason = BROKEN[name]
    path = make(tmp_path / name)
    filters_before = list(warnings.filters)
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert name in str(err.value)
    assert reason in err.value.reason
    assert warnings.filters == filters_before  # the bomb filter does not leak


def test_unreadable_file(tmp_path, monkeypatch):
    path = _noise(tmp_path / "secret.png")
    path.chmod(0)
    if os.geteuid() == 0:  # root reads anything: make the kernel's refusal explicit instead
        def deny(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))

        monkeypatch.setattr(imaging, "open", deny, raising=False)
    with pytest.raises(ImageError, match=r"secret\.png: permission denied"):
        load_image(path)


def test_file_size_limit_is_checked_before_reading(tmp_path, monkeypatch):
    path = _noise(tmp_path / "large.png")
    monkeypatch.setattr(imaging, "MAX_FILE_BYTES", 100)
    monkeypatch.setattr(imaging, "open", lambda *args: pytest.fail("file opened"), raising=False)
    with pytest.raises(ImageError, match=r"large\.png: file is too large"):
        load_image(path)
    with pytest.raises(ImageError, match=r"upload: file is too large"):
        load_image(path.read_bytes(), name="upload")


def test_a_file_that_grew_after_its_size_was_checked_is_read_whole_and_still_limited(tmp_path, monkeypatch):
    path = _noise(tmp_path / "growing.png")
    size, real_stat = path.stat().st_size, os.stat

    def stale_stat(p, *args, **kwargs):  # the size the file had a moment before it was written to the end
        fields = list(real_stat(p, *args, **kwargs))
        fields[6] = size // 2
        return os.stat_result(fields)

    monkeypatch.setattr(imaging.os, "stat", stale_stat)
    assert imaging._read_file(str(path)) == path.read_bytes()  # read on past the stale size
    monkeypatch.setattr(imaging, "MAX_FILE_BYTES", size - 1)  # the stale size passes the check; what is read does not
    with pytest.raises(ImageError, match=r"growing\.png: file is too large"):
        load_image(path)


def test_import_leaves_pillow_globals_alone():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's default


def test_wrong_argument_type_is_a_type_error():
    with pytest.raises(TypeError):
        load_image(42)  # type: ignore[arg-type]
