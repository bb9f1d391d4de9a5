"""Image loading: turn a file or an upload into one normalised grayscale array.

Every later stage (datasets, prediction, the REST API) reads pixels through
:func:`load_image`, so the accepted formats, the safety limits and the intensity scaling are
defined once, here. The format is sniffed from the content, never taken from the file name.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from covidxray.errors import ImageError
from covidxray.pixels import min_max, min_max_of, shrink

__all__ = ["MAX_ASPECT", "MAX_FILE_BYTES", "MAX_PIXELS", "MIN_SIDE", "ImageInfo", "load_image", "read_image", "sniff_format"]

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 * 1024 * 1024  # larger inputs are refused before they are read
MAX_PIXELS = 50_000_000  # about 7000x7000: above any radiograph, far below a decompression bomb
MIN_SIDE = 16  # pixels; anything smaller is an icon or a tracking pixel, not an X-ray
MAX_ASPECT = 10  # longest side / shortest side; larger means a strip or a crafted header

_KNOWN = "PNG, JPEG, BMP, TIFF, GIF or DICOM"
_MAGIC = (  # (prefix, format); Pillow decodes all of these
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"BM", "bmp"),
)
# A DICOM data set stored without the 128-byte preamble and "DICM" (older software, raw network dumps)
# starts with an element of the file meta group (0002) or the identifying group (0008), in either
# byte order, followed by an explicit VR or (implicit VR) a 4-byte length.
_BARE_DICOM_GROUPS = {0x0002, 0x0008}
_BARE_DICOM_MAX_ELEMENT = 0x0100  # these files start with a low element: a length, version or character set
_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
        b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
        b"UR", b"US", b"UT", b"UV"}
_RGB_TO_GRAY = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma, as Pillow's convert("L")
_HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}  # scaled by their own range
_GREY_MODES = {"1", "L", "LA", "La"}  # no colour to look at
# Radiographs are grey (a tint or a coloured arrow at most): an image in which more than
# _COLOUR_SHARE of the pixels have a chroma (max - min of R, G, B) above _COLOUR_CHROMA of full
# scale is probably a photo or a drawing. Decoding logs it and reports the share (ImageInfo); the
# input gate (covidxray.gate) decides, with everything else it sees, whether to answer.
_COLOUR_CHROMA = 0.2
_COLOUR_SHARE = 0.05


@dataclass(frozen=True)
class ImageInfo:
    """What a file says about itself beside its pixels: the format and, for DICOM, the header facts
    that tell whether it is a frontal chest radiograph. Empty strings where the file says nothing."""

    format: str  # dicom, png, jpeg, bmp, tiff or gif (from the content, never the file name)
    modality: str = ""  # DICOM Modality (0008,0060), e.g. CR, DX, CT
    body_part: str = ""  # DICOM BodyPartExamined (0018,0015), e.g. CHEST
    view_position: str = ""  # DICOM ViewPosition (0018,5101), e.g. PA, AP, LL
    patient_orientation: str = ""  # DICOM PatientOrientation (0020,0020), e.g. "L\\F"
    sop_class_uid: str = ""  # DICOM SOP Class UID: which kind of object (CR, DX, CT, secondary capture...)
    colour_share: float = 0.0  # share of strongly coloured pixels: radiographs are grey


def sniff_format(head: bytes) -> str | None:
    """Name an image format from the first bytes of a file (its magic number).

    Args:
        head: the start of the file; 132 bytes are enough for every format.

    Returns:
        ``"dicom"``, ``"png"``, ``"jpeg"``, ``"bmp"``, ``"tiff"`` or ``"gif"``; ``None`` when
        the bytes match none of them. A DICOM data set without the preamble is ``"dicom"`` too.

    Examples:
        >>> sniff_format(b"\\x89PNG\\r\\n\\x1a\\n")
        'png'
    """
    # DICOM is tested first: its free 128-byte preamble may itself look like a TIFF header.
    if head[128:132] == b"DICM":
        return "dicom"
    fmt = next((fmt for magic, fmt in _MAGIC if head.startswith(magic)), None)
    return fmt or ("dicom" if _bare_dicom(head) else None)


def _bare_dicom(head: bytes) -> bool:
    """Whether ``head`` starts like a DICOM data set written without preamble and ``DICM`` prefix."""
    if len(head) < 8:
        return False
    for order in "<>":
        group, element = struct.unpack(f"{order}HH", head[:4])
        if group not in _BARE_DICOM_GROUPS or element >= _BARE_DICOM_MAX_ELEMENT:
            continue
        if head[4:6] in _VRS:  # explicit VR
            return True
        if order == "<" and struct.unpack("<I", head[4:8])[0] < 0x10000:  # implicit VR is little endian only
            return True
    return False


def load_image(source: str | os.PathLike | bytes, *, name: str | None = None) -> np.ndarray:
    """The pixels of `read_image`: a 2-D float32 grayscale array with values in [0, 1]."""
    return read_image(source, name=name)[0]


def read_image(
    source: str | os.PathLike | bytes, *, name: str | None = None, min_side: int | None = None,
) -> tuple[np.ndarray, ImageInfo]:
    """Decode an image file into a 2-D float32 grayscale array with values in [0, 1], and its `ImageInfo`.

    8-bit images are divided by 255; 16-bit, 32-bit, float and DICOM images are scaled by
    their own minimum and maximum. Colour is reduced to luma, the EXIF orientation is applied,
    the first frame of an animation or stack is taken, and DICOM MONOCHROME1 is inverted so
    that bone is bright. A clearly coloured picture (probably not an X-ray) is still returned,
    with a logged warning; whether a picture is a frontal chest X-ray at all is the input gate's
    question (`covidxray.gate`), not the decoder's.

    Args:
        source: a path, or the raw bytes of a file (an upload).
        name: how to call ``source`` in error messages when it is bytes (default ``"<bytes>"``);
            it never appears in log lines.
        min_side: decode at a reduced scale where the format allows it, keeping at least this many pixels
            on each side: a JPEG through its DCT scaling (1/2, 1/4 or 1/8, Pillow's ``draft``), a DICOM frame
            shrunk once by a whole factor (box filter) after its LUTs and checks. None (the default, and what training
            and evaluation use): full resolution. The size limits apply to the file's own size either way.

    Returns:
        ``(pixels, info)``: array of shape (height, width), dtype float32, values in [0, 1], and what the
        file says about itself (`ImageInfo`).

    Raises:
        ImageError: for any unreadable, unsupported, corrupt, blank or oversized input; the
            message names the file (or ``name``) and the reason.
        TypeError: if ``source`` is neither a path nor bytes (a programming error).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        label, data = name or "<bytes>", bytes(source)
        # Logs never repeat a client-chosen name: it may hold patient data (a server promises as much).
        log_name = "<bytes>"
    elif isinstance(source, (str, os.PathLike)):
        label = log_name = os.fsdecode(source)
        data = _read_file(label)
    else:
        raise TypeError(f"load_image expects a path or bytes, not {type(source).__name__}")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(label, _too_big(len(data)), "too_large")
    if not data:
        raise ImageError(label, "file is empty", "empty")
    fmt = sniff_format(data[:132])
    if fmt is None:
        raise ImageError(label, f"not a recognised image format ({_KNOWN})", "not_an_image")
    try:
        if fmt == "dicom":
            pixels, info = _decode_dicom(data, label, log_name, min_side)
        else:
            pixels, info = _decode_pillow(data, fmt, label, log_name, min_side)
    except ImageError:
        raise
    except Exception as exc:  # decoders raise anything (OSError, ValueError, struct.error...)
        raise ImageError(label, f"could not decode: {type(exc).__name__}: {exc}", "undecodable") from exc
    log.debug("loaded %s: %s, %dx%d", log_name, fmt, pixels.shape[1], pixels.shape[0])
    return pixels, info


def _too_big(size: int) -> str:
    limit = MAX_FILE_BYTES / 2**20
    return f"file is too large ({size / 2**20:.1f} MiB; the limit is {limit:g} MiB)"


def _read_file(path: str) -> bytes:
    """Read a whole file after checking, from its metadata alone, that it is worth reading."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            raise ImageError(path, "is a directory, not an image file", "unreadable")
        if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
            raise ImageError(path, "is not a regular file", "unreadable")
        if info.st_size > MAX_FILE_BYTES:
            raise ImageError(path, _too_big(info.st_size), "too_large")
        with open(path, "rb") as file:
            # The size it had, and one byte more: a read of the limit itself would make a buffer of the limit's size for
            # every file (0.25 ms of a 512 KB DICOM's decode, in page faults). A file that grew is read on to the limit.
            data = file.read(info.st_size + 1)
            return data + file.read(MAX_FILE_BYTES + 1 - len(data)) if len(data) > info.st_size else data
    except FileNotFoundError:
        raise ImageError(path, "file not found", "unreadable") from None
    except PermissionError:
        raise ImageError(path, "permission denied", "unreadable") from None
    except OSError as exc:
        reason = "symlink loop" if exc.errno == errno.ELOOP else f"cannot read: {exc.strerror}"
        raise ImageError(path, reason, "unreadable") from None
    except ValueError as exc:  # e.g. a NUL byte in the path
        raise ImageError(path, f"invalid path: {exc}", "unreadable") from None


def _check_size(label: str, width: int, height: int) -> None:
    """Refuse sizes no radiograph has, before any pixel is decoded."""
    if width * height > MAX_PIXELS:
        raise ImageError(
            label, f"image too large: {width}x{height} pixels (the limit is {MAX_PIXELS:,})", "too_large"
        )
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(
            label,
            f"absurd size {width}x{height} (each side must be at least {MIN_SIDE} px and "
            f"the long side at most {MAX_ASPECT} times the short one)",
            "absurd_size",
        )


def _colour_share(rgb: np.ndarray, full_scale: float, log_name: str) -> float:
    """Share of strongly coloured pixels of an (H, W, 3) image; logs a warning when it is clearly coloured."""
    chroma = rgb.max(axis=-1).astype(np.float32) - rgb.min(axis=-1)
    share = float((chroma > _COLOUR_CHROMA * full_scale).mean())
    if share > _COLOUR_SHARE:
        log.warning("%s: %.0f%% of the pixels are strongly coloured, so this is probably not a chest X-ray",
                    log_name, 100 * share)
    return share


def _decode_pillow(data: bytes, fmt: str, label: str, log_name: str, min_side: int | None) -> tuple[np.ndarray, ImageInfo]:
    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice that limit; treat the warning as a bomb.
        # (The filter is process-wide, not per thread; _check_size below is the real limit.)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # formats= stops Pillow from trying other decoders than the one the magic named.
            with Image.open(io.BytesIO(data), formats=[fmt.upper()]) as img:
                _check_size(label, *img.size)  # open() parsed only the header so far
                if min_side and fmt == "jpeg":  # the largest DCT scaling that keeps min_side on each side
                    img.draft(img.mode, (min_side, min_side))
                img.load()  # decodes the first frame; raises on truncated data
                img = ImageOps.exif_transpose(img)  # a new image, independent of the file
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(label, f"image too large (decompression bomb?): {exc}", "too_large") from None
        except Image.UnidentifiedImageError:
            raise ImageError(label, f"corrupt {fmt.upper()} header", "undecodable") from None
    if img.mode in _HIGH_DEPTH_MODES:
        return min_max(np.asarray(img), label), ImageInfo(fmt)
    colour = 0.0 if img.mode in _GREY_MODES else _colour_share(np.asarray(img.convert("RGB")), 255, log_name)
    # Alpha is dropped rather than composited: no background colour is right for an X-ray.
    gray = np.asarray(img if img.mode == "L" else img.convert("L"), dtype=np.float32) / 255
    if gray.min() == gray.max():  # refused like a blank deeper image (see `covidxray.pixels.min_max`): nothing to classify
        raise ImageError(label, "image is blank (constant intensity)", "blank")
    return gray, ImageInfo(fmt, colour_share=colour)


class _DecoderFailureFilter(logging.Filter):
    """Drop the traceback pydicom logs for each decoding plug-in that fails on a frame.

    pydicom then raises one error that quotes every plug-in's message, and that becomes the
    `ImageError`'s reason; a traceback on the user's terminal (or in a server log, for every
    hostile upload) would say nothing more.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.funcName == "_decode_frame")


def _quiet_pydicom_decoder_failures() -> None:
    # Installed on first use, not at import: importing covidxray changes no other library.
    logger = logging.getLogger("pydicom.pixels.decoders.base")  # where the per-plug-in failures are logged
    if not any(isinstance(f, _DecoderFailureFilter) for f in logger.filters):
        logger.addFilter(_DecoderFailureFilter())


def _dicom_info(ds: pydicom.Dataset, colour_share: float = 0.0) -> ImageInfo:
    def tag(keyword: str) -> str:
        value = ds.get(keyword, "")
        text = "\\".join(map(str, value)) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else str(value)
        return text.strip().upper()

    return ImageInfo("dicom", modality=tag("Modality"), body_part=tag("BodyPartExamined"),
                     view_position=tag("ViewPosition"), patient_orientation=tag("PatientOrientation"),
                     sop_class_uid=str(ds.get("SOPClassUID", "")), colour_share=colour_share)


def _transfer_syntax(ds: pydicom.Dataset) -> pydicom.uid.UID:
    """The data set's transfer syntax; for a file without one in its meta (no preamble, or an old
    writer), the uncompressed syntax it was actually parsed with."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax:
        return syntax
    implicit, little = ds.original_encoding
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    ds.file_meta.TransferSyntaxUID = syntax  # pydicom's pixel decoding reads it from here
    return syntax


def _decode_dicom(data: bytes, label: str, log_name: str, min_side: int | None) -> tuple[np.ndarray, ImageInfo]:
    # The whole file is already in memory (at most MAX_FILE_BYTES), so nothing is deferred;
    # pydicom decodes pixels only when pixel_array is read, after the checks below. force=True
    # reads a data set without the preamble (sniff_format has already checked how it starts).
    ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageError(label, "DICOM file has no pixel data", "no_pixel_data")
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageError(label, "DICOM file has no Rows/Columns", "no_pixel_data")
    _check_size(label, int(ds.Columns), int(ds.Rows))
    syntax = _transfer_syntax(ds)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageError(label, f"unsupported DICOM transfer syntax {syntax}", "unsupported_compression") from None
    if not decoder.is_available:
        raise ImageError(
            label,
            f"no decoder installed for DICOM transfer syntax '{syntax.name}' ({syntax}); "
            f"install one of: {'; '.join(decoder.missing_dependencies)}",
            "unsupported_compression",
        )
    ds.pixel_array_options(index=0)  # decode only the first frame of a multi-frame file
    _quiet_pydicom_decoder_failures()
    pixels = ds.pixel_array
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":  # stored values are indices
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3:  # colour; pydicom has already converted YBR to RGB
        full = np.iinfo(pixels.dtype).max if pixels.dtype.kind in "iu" else 1.0  # palette LUTs are 16-bit
        colour = _colour_share(pixels[..., :3], full, log_name)
        return shrink(min_max(pixels[..., :3] @ _RGB_TO_GRAY, label), min_side), _dicom_info(ds, colour)
    values = min_max_of(pixels, lambda v: apply_voi_lut(apply_modality_lut(v, ds), ds, index=0), label)
    gray = shrink(values, min_side)  # checked at full resolution, then shrunk once
    # MONOCHROME1 stores bone dark; every other source (and the model) expects bone bright.
    return (1 - gray if ds.get("PhotometricInterpretation") == "MONOCHROME1" else gray), _dicom_info(ds)
