"""Bad input, end to end: a corpus of odd and hostile files through every entry point.

Every kind of input is generated here from one real X-ray of the shared data set (nothing
binary is committed) and goes through (a) `load_image`, (b) ``covidxray predict``, (c)
``covidxray data check`` on a folder tree holding all of them and (d) the REST API. Each is
either a valid-but-odd X-ray that must be classified, or an input that must be refused with
a message naming the file and the problem, never a traceback or a 5xx.

Decisions recorded by this table:

* what decodes but is no frontal chest X-ray gets the third outcome, no answer (``no_answer``,
  with its reason), from the input gate: a DICOM whose ViewPosition says lateral (the header), a
  frontal film turned by 90 degrees and a strongly coloured picture (the pixels; the loader also
  logs that the picture is probably not an X-ray). A mirrored frontal film is still one: answered;
* an unreadable file (mode 000) is refused with "permission denied", unless the process can
  read it anyway (root), in which case it is simply classified.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless

import dicoms
from covidxray.cli import main
from covidxray.errors import IMAGE_ERROR_CODES, ImageError
from covidxray.imaging import load_image

XRAY_KEY = "images/covid-cxnet/covid/00001.jpg"  # a real frontal chest film from the shared data
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "SECRET-123"  # must never be echoed anywhere
COLOUR_WARNING = "probably not a chest X-ray"


@dataclass(frozen=True)
class Source:
    """What the factories build from: one real X-ray, as its file and as 256x256 grey pixels."""

    jpeg: bytes
    gray: np.ndarray  # uint8 (256, 256)


Factory = Callable[[Source], bytes]


@dataclass(frozen=True)
class Case:
    """One kind of input and what every entry point must do with it."""

    id: str
    name: str  # file name in the corpus folder
    outcome: str  # "ok" (classified), "no_answer" (read, but not a frontal chest X-ray) or "error" (unreadable)
    message: str = ""  # for errors: a substring of the reason every entry point reports; for no_answer: the reason
    data: Factory | None = None  # the file's bytes; None for kinds that exist only as paths
    make: Callable[[Path, Source], None] | None = None  # creates a path-only kind at the given path
    in_tree: bool = True  # whether `data check` sees it in a folder tree (it must exist as an entry)
    cli_message: str | None = None  # when the CLI words the problem differently


# ---------------------------------------------------------------------------------------------- factories


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _gray(src: Source) -> Image.Image:
    return Image.fromarray(src.gray)


def _dicom(src: Source, photometric: str = "MONOCHROME2", **tags) -> bytes:
    """The real X-ray as a 12-bit DX DICOM file with fake patient tags."""
    pixels = src.gray.astype(np.uint16) * 16
    pixels = 4080 - pixels if photometric == "MONOCHROME1" else pixels
    return dicoms.to_bytes(dicoms.dx(pixels, photometric, 12, PatientName=PATIENT_NAME, PatientID=PATIENT_ID, **tags))


def _dicom_encapsulated(frame: bytes, syntax: str) -> bytes:
    """A 64x64 8-bit DICOM whose single frame is ``frame``, compressed as ``syntax``."""
    return dicoms.to_bytes(dicoms.encapsulated(frame, syntax))


def _undecodable_syntax() -> tuple[str, str]:
    """A compressed transfer syntax this machine has no decoder for, and the expected reason."""
    if not get_decoder(JPEGLSLossless).is_available:
        return JPEGLSLossless, "no decoder installed"
    return JPEGLSLossless, "could not decode"  # a JPEG-LS plug-in is installed: the junk stream fails


def _without_pixel_data(dicom: bytes) -> bytes:
    return dicom[: dicom.index(b"\xe0\x7f\x10\x00")]  # cut at the (7FE0,0010) tag


def _dicom_huge(src: Source) -> bytes:
    # Rows/Columns of 60000 (3.6 gigapixels) in front of a tiny pixel buffer.
    data = _dicom(src)
    tag = lambda element, value: struct.pack("<HH2sHH", 0x0028, element, b"US", 2, value)  # noqa: E731
    return data.replace(tag(0x0010, 256), tag(0x0010, 60000)).replace(tag(0x0011, 256), tag(0x0011, 60000))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@lru_cache(maxsize=1)
def _png_bomb(side: int = 12_000) -> bytes:
    """A real decompression bomb: ~100 KB of zlib that inflates to side**2 bytes of zeros."""
    z = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + one row of grey pixels
    body = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")


def _jpeg_huge(src: Source) -> bytes:
    data = bytearray(_save(_gray(src), "JPEG"))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length(2) precision(1) height(2) width(2)
    data[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(data)


def _gif_huge(src: Source) -> bytes:
    data = bytearray(_save(_gray(src), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen size
    return bytes(data)


def _bmp_huge(src: Source) -> bytes:
    data = bytearray(_save(_gray(src), "BMP"))
    data[18:26] = struct.pack("<ii", 50000, 50000)  # BITMAPINFOHEADER width, height
    return bytes(data)


def _tiff_huge(src: Source) -> bytes:
    """A baseline grey TIFF declaring 100000x100000 pixels with 10 bytes of strip data."""
    entries = [(256, 4, 100_000), (257, 4, 100_000), (258, 3, 8), (259, 3, 1), (262, 3, 1),
               (273, 4, 8 + 2 + 12 * 9 + 4), (277, 3, 1), (278, 4, 100_000), (279, 4, 10)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", t, k, 1, v) for t, k, v in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4 + b"\x80" * 10


def _frames(src: Source) -> list[Image.Image]:
    first = _gray(src)
    return [first, first.transpose(Image.Transpose.FLIP_TOP_BOTTOM), Image.fromarray(255 - src.gray)]


def _colour_photo(_: Source) -> bytes:
    """A colourful synthetic picture (hue wheel): a photo, not a radiograph."""
    y, x = np.mgrid[0:256, 0:256] / 255.0
    rgb = np.stack([x, y, 1 - x * y], axis=-1) * 255
    return _save(Image.fromarray(rgb.astype(np.uint8)), "PNG")


def _exif_rotated(src: Source) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    return _save(_gray(src), "JPEG", exif=exif, quality=90)


def _zip(_: Source) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("chest.png", "not really")
    return buf.getvalue()


def _polyglot(src: Source) -> bytes:
    return _save(_gray(src), "PNG") + _zip(src)  # a valid PNG with a ZIP appended


def _float_tiff_nan(src: Source) -> bytes:
    raw = src.gray.astype(np.float32)
    raw[10, 10] = np.nan
    return _save(Image.fromarray(raw, mode="F"), "TIFF")


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


# ---------------------------------------------------------------------------------------------- path-only kinds


def _make_dir(path: Path, _: Source) -> None:
    path.mkdir()


def _make_loop(path: Path, _: Source) -> None:
    partner = path.with_name(f".{path.name}.partner")  # hidden: a folder scan sees only the case itself
    path.symlink_to(partner)
    partner.symlink_to(path)


def _make_dangling(path: Path, _: Source) -> None:
    path.symlink_to(path.with_name("gone.png"))


def _make_fifo(path: Path, _: Source) -> None:
    os.mkfifo(path)


def _make_unreadable(path: Path, src: Source) -> None:
    path.write_bytes(src.jpeg)
    path.chmod(0)


_SYNTAX, _SYNTAX_REASON = _undecodable_syntax()
UNRECOGNISED = "not a recognised image format"

CASES: list[Case] = [
    # -- valid but odd: classified
    Case("real-jpeg", "xray.jpg", "ok", data=lambda s: s.jpeg),
    Case("png-16bit", "xray16.png", "ok", data=lambda s: _save(Image.fromarray(s.gray.astype(np.uint16) * 257), "PNG")),
    Case("png-rgba", "rgba.png", "ok",
         data=lambda s: _save(Image.fromarray(np.dstack([s.gray] * 3 + [np.full_like(s.gray, 128)])), "PNG")),
    Case("png-palette", "palette.png", "ok", data=lambda s: _save(_gray(s).convert("RGB").quantize(64), "PNG")),
    Case("jpeg-cmyk", "cmyk.jpg", "ok", data=lambda s: _save(_gray(s).convert("CMYK"), "JPEG")),
    Case("jpeg-rgb-grey", "rgb.jpg", "ok", data=lambda s: _save(_gray(s).convert("RGB"), "JPEG")),
    Case("tiff-cmyk", "cmyk.tif", "ok", data=lambda s: _save(_gray(s).convert("CMYK"), "TIFF")),
    Case("gif-animated", "anim.gif", "ok",
         data=lambda s: _save(_frames(s)[0], "GIF", save_all=True, append_images=_frames(s)[1:])),
    Case("tiff-multiframe", "stack.tif", "ok",
         data=lambda s: _save(_frames(s)[0], "TIFF", save_all=True, append_images=_frames(s)[1:])),
    # The pixels are upright but the EXIF orientation says "turn 90 degrees to display": decoded as a
    # viewer shows it, the film lies on its side, so the gate refuses it like any turned film.
    Case("jpeg-exif-rotated", "exif.jpg", "no_answer", "rotated", data=_exif_rotated),
    Case("xray-rotated-90", "rotated.png", "no_answer", "rotated",
         data=lambda s: _save(_gray(s).transpose(Image.Transpose.ROTATE_90), "PNG")),
    Case("xray-mirrored", "mirrored.png", "ok", data=lambda s: _save(_gray(s).transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG")),
    Case("colour-photo", "holiday.png", "no_answer", "not_chest_xray", data=_colour_photo),
    Case("png-with-zip-appended", "polyglot.png", "ok", data=_polyglot),
    Case("dicom-pa", "frontal.dcm", "ok", data=lambda s: _dicom(s, ViewPosition="PA")),
    Case("dicom-monochrome1", "mono1.dcm", "ok", data=lambda s: _dicom(s, "MONOCHROME1")),
    Case("unicode-name", "рентген_胸部_ñ.png", "ok", data=lambda s: _save(_gray(s), "PNG")),
    Case("long-name", "x" * 240 + ".png", "ok", data=lambda s: _save(_gray(s), "PNG")),
    Case("unreadable", "locked.jpg", "error", "permission denied", make=_make_unreadable),  # ok where readable
    # -- refused: not an image, or nothing like an X-ray
    Case("zero-byte", "empty.png", "error", "file is empty", data=lambda s: b""),
    Case("truncated-png", "cut.png", "error", "could not decode", data=lambda s: _truncated(_save(_gray(s), "PNG"))),
    Case("truncated-jpeg", "cut.jpg", "error", "could not decode", data=lambda s: _truncated(s.jpeg)),
    Case("text-as-png", "notes.png", "error", UNRECOGNISED, data=lambda s: b"patient is fine, no x-ray taken\n"),
    Case("text-as-dcm", "notes.dcm", "error", UNRECOGNISED, data=lambda s: b"DICM? no, just text\n" * 10),
    Case("html", "page.png", "error", UNRECOGNISED, data=lambda s: b"<!doctype html><title>404</title>"),
    Case("zip", "archive.png", "error", UNRECOGNISED, data=_zip),
    Case("pdf", "report.pdf", "error", UNRECOGNISED, data=lambda s: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\n"),
    Case("svg", "drawing.svg", "error", UNRECOGNISED, data=lambda s: b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
    Case("webp", "xray.webp", "error", UNRECOGNISED, data=lambda s: _save(_gray(s), "WEBP")),
    Case("png-decompression-bomb", "bomb.png", "error", "decompression bomb", data=lambda s: _png_bomb()),
    Case("jpeg-huge-declared", "huge.jpg", "error", "decompression bomb", data=_jpeg_huge),
    Case("gif-huge-declared", "huge.gif", "error", "decompression bomb", data=_gif_huge),
    Case("bmp-huge-declared", "huge.bmp", "error", "decompression bomb", data=_bmp_huge),
    Case("tiff-huge-declared", "huge.tif", "error", "decompression bomb", data=_tiff_huge),
    Case("dicom-huge-declared", "huge.dcm", "error", "image too large: 60000x60000", data=_dicom_huge),
    Case("png-1x1", "dot.png", "error", "absurd size 1x1", data=lambda s: _save(Image.new("L", (1, 1), 128), "PNG")),
    Case("png-100000x10", "strip.png", "error", "absurd size 100000x10",
         data=lambda s: _save(Image.fromarray(np.tile(np.arange(100_000, dtype=np.uint8), (10, 1))), "PNG")),
    Case("png-blank", "blank.png", "error", "image is blank", data=lambda s: _save(Image.new("L", (64, 64), 9), "PNG")),
    Case("tiff-float-nan", "nan.tif", "error", "non-finite", data=_float_tiff_nan),
    Case("dicom-no-pixel-data", "nopixels.dcm", "error", "no pixel data", data=lambda s: _without_pixel_data(_dicom(s))),
    Case("dicom-undecodable-syntax", "jpegls.dcm", "error", _SYNTAX_REASON,
         data=lambda s: _dicom_encapsulated(b"\xff\xd8\xff\xf7junk", _SYNTAX)),
    Case("dicom-corrupt-jpeg", "badjpeg.dcm", "error", "could not decode",
         data=lambda s: _dicom_encapsulated(b"\xff\xd8\xff\xe0junk" * 4, JPEGBaseline8Bit)),
    Case("dicom-truncated-pixels", "short.dcm", "error", "could not decode", data=lambda s: _dicom(s)[:-5000]),
    Case("dicom-nan-rescale", "nan.dcm", "error", "non-finite", data=lambda s: _dicom(s, RescaleSlope="NaN", RescaleIntercept=0)),
    Case("dicom-inf-rescale", "inf.dcm", "error", "non-finite", data=lambda s: _dicom(s, RescaleSlope="1e308", RescaleIntercept=0)),
    Case("dicom-lateral", "lateral.dcm", "no_answer", "lateral_view", data=lambda s: _dicom(s, ViewPosition="LL")),
    # -- paths that are not image files
    Case("directory", "folder.png", "error", "is a directory", make=_make_dir, in_tree=False,
         cli_message="no files found"),  # the CLI reads a folder as "every image in it": none here
    Case("symlink-loop", "loop.png", "error", "symlink loop", make=_make_loop),
    Case("dangling-symlink", "dangling.png", "error", "file not found", make=_make_dangling),
    Case("fifo", "pipe.png", "error", "not a regular file", make=_make_fifo),
    Case("missing", "missing.png", "error", "file not found", make=lambda p, s: None, in_tree=False),
    Case("name-too-long", "y" * 300 + ".png", "error", "File name too long", make=lambda p, s: None, in_tree=False),
]
BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "case ids must be unique"


def expected(case: Case, path: Path) -> tuple[str, str]:
    """(outcome, message) for ``case`` on this machine: root reads a mode-000 file anyway."""
    if case.id == "unreadable" and os.access(path, os.R_OK):
        return "ok", ""
    return case.outcome, case.message


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def source(data_root: Path) -> Source:
    jpeg = (data_root / XRAY_KEY).read_bytes()
    with Image.open(io.BytesIO(jpeg)) as img:
        gray = np.asarray(img.convert("L").resize((256, 256), Image.Resampling.BILINEAR))
    return Source(jpeg=jpeg, gray=gray)


def _write(case: Case, folder: Path, src: Source) -> Path:
    path = folder / case.name
    if case.data is not None:
        path.write_bytes(case.data(src))
    else:
        case.make(path, src)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, source: Source) -> dict[str, Path]:
    """Every case written into one flat folder: id -> the path to hand to the loader."""
    folder = tmp_path_factory.mktemp("corpus")
    return {case.id: _write(case, folder, source) for case in CASES}


@pytest.fixture(scope="module")
def predictor():
    """The bundled model, loaded once for the module."""
    from covidxray.predictor import Predictor

    return Predictor()


def test_the_corpus_is_large_and_varied():
    assert len(CASES) >= 30
    assert sum(c.outcome == "ok" for c in CASES) >= 10 and sum(c.outcome == "error" for c in CASES) >= 25
    assert sum(c.outcome == "no_answer" for c in CASES) >= 3


# ---------------------------------------------------------------------------------------------- (a) load_image


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_load_image(case: Case, corpus: dict[str, Path], caplog: pytest.LogCaptureFixture):
    path = corpus[case.id]
    outcome, message = expected(case, path)
    caplog.set_level("WARNING", logger="covidxray")
    if outcome != "error":  # decoding is not the gate's business: what is readable is read
        image = load_image(path)
        assert image.ndim == 2 and image.dtype == np.float32 and 0.0 <= image.min() < image.max() <= 1.0
    else:
        with pytest.raises(ImageError) as err:
            load_image(path)
        assert err.value.source == str(path)
        assert message in err.value.reason
    # Only the colour photo is flagged as "probably not an X-ray": grey films, however odd, are not.
    assert (COLOUR_WARNING in caplog.text) == (case.id == "colour-photo")
    assert PATIENT_NAME.split("^")[0] not in caplog.text and PATIENT_ID not in caplog.text


@pytest.mark.parametrize("case", [c for c in CASES if c.data is not None], ids=lambda c: c.id)
def test_load_image_bytes_agree_with_the_file(case: Case, corpus: dict[str, Path], source: Source):
    """An upload of the same bytes gets the same pixels or the same reason, under its own name."""
    path = corpus[case.id]
    outcome, message = expected(case, path)
    if outcome != "error":
        np.testing.assert_array_equal(load_image(case.data(source), name="upload"), load_image(path))
    else:
        with pytest.raises(ImageError, match=r"^upload: ") as err:
            load_image(case.data(source), name="upload")
        assert message in err.value.reason


# The machine word each refused case carries: what the listener's database and the API's status are decided by.
CODES = {
    "unreadable": "unreadable", "zero-byte": "empty", "truncated-png": "undecodable", "truncated-jpeg": "undecodable",
    **{k: "not_an_image" for k in ("text-as-png", "text-as-dcm", "html", "zip", "pdf", "svg", "webp")},
    **{k: "too_large" for k in ("png-decompression-bomb", "jpeg-huge-declared", "gif-huge-declared", "bmp-huge-declared",
                                "tiff-huge-declared", "dicom-huge-declared")},
    "png-1x1": "absurd_size", "png-100000x10": "absurd_size", "png-blank": "blank", "tiff-float-nan": "non_finite",
    "dicom-no-pixel-data": "no_pixel_data",
    "dicom-undecodable-syntax": "unsupported_compression" if _SYNTAX_REASON == "no decoder installed" else "undecodable",
    "dicom-corrupt-jpeg": "undecodable", "dicom-truncated-pixels": "undecodable", "dicom-nan-rescale": "non_finite",
    "dicom-inf-rescale": "non_finite", "directory": "unreadable", "symlink-loop": "unreadable",
    "dangling-symlink": "unreadable", "fifo": "unreadable", "missing": "unreadable", "name-too-long": "unreadable",
}


def test_every_refused_case_has_a_code():
    assert set(CODES) == {c.id for c in CASES if c.outcome == "error"}
    assert set(CODES.values()) <= IMAGE_ERROR_CODES


@pytest.mark.parametrize("case", [c for c in CASES if c.outcome == "error"], ids=lambda c: c.id)
def test_load_image_error_code_survives_pickling(case: Case, corpus: dict[str, Path]):
    """The code is set where the error is raised, and crosses process boundaries (DataLoader workers) intact."""
    path = corpus[case.id]
    if expected(case, path)[0] != "error":  # root reads the mode-000 file: nothing refused, no code
        assert load_image(path).ndim == 2
        return
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert err.value.code == CODES[case.id]
    copy = pickle.loads(pickle.dumps(err.value))
    assert (type(copy), copy.source, copy.reason, copy.code, str(copy)) == (
        ImageError, err.value.source, err.value.reason, err.value.code, str(err.value))


def test_an_unknown_code_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown ImageError code"):
        ImageError("x.png", "broken", "broken")


def test_the_lateral_dicom_is_the_frontal_one_but_for_its_tag(source: Source, predictor):
    """Only ViewPosition differs, so the refusal is the policy (the gate's header rule), not a decoding accident."""
    frontal = load_image(_dicom(source, ViewPosition="PA"))
    assert predictor.predict_bytes(_dicom(source, ViewPosition="PA"), "front.dcm").answered
    for view in ("LL", "RL", " ll "):
        side = _dicom(source, ViewPosition=view.strip())
        np.testing.assert_array_equal(load_image(side), frontal)
        answer = predictor.predict_bytes(side, "side.dcm")
        assert (answer.label, answer.reason) == ("not_answered", "lateral_view")
        assert "frontal (PA/AP)" in answer.message
    np.testing.assert_array_equal(load_image(_dicom(source, ViewPosition="AP")), frontal)


# ---------------------------------------------------------------------------------------------- (b) the CLI


@pytest.fixture()
def shared_predictor(predictor, monkeypatch: pytest.MonkeyPatch):
    """`covidxray predict` in-process, reusing the module's loaded model instead of loading it per case."""
    monkeypatch.setattr("covidxray.predictor.Predictor", lambda *args, **kwargs: predictor)
    return predictor


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cli_predict(case: Case, corpus: dict[str, Path], shared_predictor, capsys: pytest.CaptureFixture):
    path = corpus[case.id]
    outcome, message = expected(case, path)
    code = main(["predict", str(path), "--format", "json"])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if outcome == "ok":
        assert code == 0, err
        row = json.loads(out)
        assert row["path"] == str(path) and row["label"] in ("covid", "normal") and 0 <= row["probability"] <= 1
    elif outcome == "no_answer":
        assert code == 3, err
        row = json.loads(out)
        assert (row["label"], row["reason"], row["probability"]) == ("not_answered", message, None)
    else:
        assert code == 2
        assert str(path) in err and (case.cli_message or message) in err


def test_console_script_on_the_whole_corpus(corpus: dict[str, Path]):
    """The installed `covidxray` command, all inputs at once: one line per file, exit 2, no traceback."""
    exe = Path(sys.executable).with_name("covidxray")
    files = [p for cid, p in corpus.items() if cid != "directory"]  # a folder would be expanded
    proc = subprocess.run([str(exe), "predict", *map(str, files), "--format", "json"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    rows = {r["path"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(rows) == set(map(str, files))
    for cid, path in corpus.items():
        if cid == "directory":
            continue
        outcome, message = expected(BY_ID[cid], path)
        row = rows[str(path)]
        if outcome == "ok":
            assert row["label"] in ("covid", "normal"), cid
        elif outcome == "no_answer":
            assert (row["label"], row["reason"]) == ("not_answered", message), cid
        else:
            assert message in row["error"], cid
            assert f"error: {path}: " in proc.stderr, cid
    assert COLOUR_WARNING in proc.stderr  # the warning reaches the user of the command line
    assert PATIENT_ID not in proc.stdout + proc.stderr and PATIENT_NAME.split("^")[0] not in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------- (c) data check


def test_data_check_lists_every_unreadable_file(tmp_path: Path, source: Source, capsys: pytest.CaptureFixture):
    root = tmp_path / "dataset"
    (root / "covid").mkdir(parents=True)
    (root / "normal").mkdir()
    (root / "normal" / "good.jpg").write_bytes(source.jpeg)
    paths = {c.id: _write(c, root / "covid", source) for c in CASES if c.in_tree}
    code = main(["data", "check", str(root)])
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in out + err
    listed = {line.strip() for line in out.splitlines() if line.startswith("  ")}
    refused = {cid: expected(BY_ID[cid], p) for cid, p in paths.items() if expected(BY_ID[cid], p)[0] == "error"}
    assert f"unreadable files: {len(refused)}" in out
    for cid, (_, message) in refused.items():
        name = BY_ID[cid].name
        assert any(name in line and message in line for line in listed), f"{cid} not listed with {message!r}"
    total = len(paths) + 1
    assert re.search(rf"total: {total} images", out), "every entry of the tree is counted, broken ones too"


def test_near_duplicates_in_a_folder_tree_come_from_decoded_images(tmp_path: Path, source: Source):
    """DICOM files get a real pHash; unreadable entries (a pipe included: it must not block) pair with nothing."""
    from covidxray.data import near_duplicate_pairs, read_folder

    (tmp_path / "covid").mkdir()
    (tmp_path / "normal").mkdir()
    scan = _dicom(source)
    (tmp_path / "covid" / "a.dcm").write_bytes(scan)
    (tmp_path / "normal" / "a-again.dcm").write_bytes(scan.replace(PATIENT_ID.encode(), b"OTHER-0123"))
    (tmp_path / "normal" / "inverted.dcm").write_bytes(_dicom(Source(source.jpeg, 255 - source.gray)))
    for case in ("zero-byte", "text-as-png", "fifo", "symlink-loop"):
        _write(BY_ID[case], tmp_path / "covid", source)
    samples = read_folder(tmp_path)
    assert len(samples) == 7
    pairs = [(samples[i].key, samples[j].key) for i, j, _ in near_duplicate_pairs(samples)]
    assert pairs == [("covid/a.dcm", "normal/a-again.dcm")]


# ---------------------------------------------------------------------------------------------- (d) the REST API

UPLOADS = [c for c in CASES if c.data is not None]  # the path-only kinds cannot be uploaded


@pytest.fixture(scope="module")
def uploads(source: Source) -> dict[str, bytes]:
    return {case.id: case.data(source) for case in UPLOADS}


@pytest.fixture(scope="module")
def client(predictor):
    """The REST API around the module's loaded model; a 5xx is answered, not raised, so tests can see it."""
    from fastapi.testclient import TestClient

    from covidxray.server import create_app

    with TestClient(create_app(predictor=predictor), raise_server_exceptions=False) as test_client:
        yield test_client


def _expected_status(case: Case) -> int:
    return 200 if case.outcome != "error" else 415 if case.message == UNRECOGNISED else 422


def _check_answer(case: Case, status: int, body: dict) -> None:
    """One file's answer from /v1/predict (or its entry in a batch): a prediction or a JSON error."""
    assert status == _expected_status(case), body
    if case.outcome == "ok":
        assert body["label"] in ("covid", "normal") and 0.0 <= body["probability"] <= 1.0
        assert body["filename"] == case.name[:120]  # the server shortens names it echoes
    elif case.outcome == "no_answer":  # a 200 with the third outcome: the request was fine, the picture is no CXR
        assert (body["label"], body["reason"]) == ("not_answered", case.message) and "probability" not in body
    else:
        error = body["error"]
        assert error["code"] and error["message"].startswith(f"{case.name}: ") and case.message in error["message"]


@pytest.mark.parametrize("case", UPLOADS, ids=lambda c: c.id)
def test_api_predict(case: Case, uploads: dict[str, bytes], client, caplog: pytest.LogCaptureFixture):
    caplog.set_level("DEBUG")
    r = client.post("/v1/predict", files={"file": (case.name, uploads[case.id], "application/octet-stream")})
    assert r.headers["content-type"] == "application/json"
    _check_answer(case, r.status_code, r.json())
    assert "Traceback" not in caplog.text
    assert case.name not in caplog.text  # the client's file name may hold patient data: never logged


def test_api_batch(uploads: dict[str, bytes], client):
    """The batch endpoint gives every file its own answer, good and bad mixed, in order."""
    for start in range(0, len(UPLOADS), 16):  # the server's default limit of files per request
        chunk = UPLOADS[start:start + 16]
        r = client.post("/v1/predict/batch",
                        files=[("files", (c.name, uploads[c.id], "application/octet-stream")) for c in chunk])
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert len(results) == len(chunk)
        for case, result in zip(chunk, results):
            _check_answer(case, result.get("status", 200), result)


def test_api_still_serves_after_every_bad_input(uploads: dict[str, bytes], client, source: Source):
    for case in UPLOADS:
        if case.outcome == "error":
            assert 400 <= client.post("/v1/predict", files={"file": (case.name, uploads[case.id])}).status_code < 500
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    r = client.post("/v1/predict", files={"file": ("good.jpg", source.jpeg, "image/jpeg")})
    assert r.status_code == 200 and r.json()["label"] in ("covid", "normal")
