"""Pixel values to a float32 image in [0, 1]: min-max scaling (refusing blank and non-finite images), the DICOM
LUTs through a table over the stored values, and shrinking by a whole factor. Used by `covidxray.imaging` only."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from covidxray.errors import ImageError

__all__ = ["min_max", "min_max_of", "shrink"]

_EXACT_IN_FLOAT32 = 2**24  # every integer of at most this size is exact in float32


def min_max(values: np.ndarray, label: str) -> np.ndarray:
    """Scale to [0, 1] by the image's own range, refusing NaN, infinity and blank images.

    The numbers are those of ``(values - low) / (high - low)`` in float64, rounded to float32. Integer pixels whose
    range float32 holds exactly (every 8- to 16-bit film) are scaled in float32 directly: the same numbers (a quotient
    of exact operands is correctly rounded either way), without a float64 copy of the film, in a fifth of the time.
    """
    values = np.asarray(values)
    if values.dtype.kind not in "iuf":
        values = values.astype(np.float64)
    low, high = _range(values, label)
    if values.dtype.kind in "iu" and -_EXACT_IN_FLOAT32 <= int(low) and int(high) <= _EXACT_IN_FLOAT32 \
            and int(high) - int(low) <= _EXACT_IN_FLOAT32:  # every value, the low and each difference: exact in float32
        out = values.astype(np.float32)
        out -= np.float32(low)
        out /= np.float32(int(high) - int(low))
        return out
    return _scale(values, low, high)


def _range(values: np.ndarray, label: str) -> tuple:
    """The lowest and highest value, refusing NaN, infinity (either shows in them) and a blank image."""
    low, high = values.min(), values.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ImageError(label, "image contains non-finite values (NaN or infinity)", "non_finite")
    if low == high:
        raise ImageError(label, "image is blank (constant intensity)", "blank")
    return low, high


def _scale(values: np.ndarray, low, high) -> np.ndarray:
    """``(values - low) / (high - low)`` in float64, as float32."""
    out = np.subtract(values, float(low), dtype=np.float64)
    out /= float(high) - float(low)
    return out.astype(np.float32)


def min_max_of(pixels: np.ndarray, transform: Callable[[np.ndarray], np.ndarray], label: str) -> np.ndarray:
    """``min_max(transform(pixels))`` for a value-by-value ``transform`` (a DICOM modality and VOI LUT).

    8- and 16-bit pixels go through a table over the range of their stored values instead: the transform and the
    scaling are computed once per value, in float64 as before, and looked up per pixel. The same numbers; on a
    3000 px CR with a window, the float64 passes over the whole film were most of its decoding time.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # a crazy rescale is refused by _range
        if pixels.dtype.kind not in "iu" or pixels.dtype.itemsize > 2:
            return min_max(transform(pixels), label)
        first, last = int(pixels.min()), int(pixels.max())
        domain = np.arange(first, last + 1, dtype=pixels.dtype)[None]
        if (mapped := transform(domain)) is domain:  # no LUT to apply: scaled as it is (faster than a look-up)
            return min_max(pixels, label)
        table = np.asarray(mapped, dtype=np.float64)[0]
        steps = np.diff(table)  # NaN where the table has a NaN or infinities: then not monotonic
    index = pixels - first if pixels.dtype.kind == "u" else pixels.astype(np.int32) - first
    if (steps >= 0).all() or (steps <= 0).all():  # monotonic: the extremes are the ends, both in the image
        present = table[[0, -1]]
    else:  # a LUT that is not: only the values the image holds count
        present = table[np.bincount(index.ravel(), minlength=len(table)) > 0]
    return _scale(table, *_range(present, label))[index]


def shrink(values: np.ndarray, min_side: int | None) -> np.ndarray:
    """A float32 image in [0, 1] shrunk by the largest whole factor that keeps ``min_side`` on each side
    (box filter: the mean of each factor x factor block, a partial block at the edge included)."""
    factor = min(values.shape) // min_side if min_side else 1
    if factor < 2:
        return values
    return np.asarray(Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F").reduce(factor))
