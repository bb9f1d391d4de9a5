"""Pillow's bilinear resize (`resize`, preprocessing's one resize), and the same as weights (`region_to_side`).

`covidxray.presets.Preprocess` darkens what lies outside the lungs with the lung map framed as the network input.
That map used to be made with two Pillow resizes: the segmenter's map over the crop's region brought to the crop's
own pixels, then to the input's side. On a 2500 px film that built a 2132 x 2500 map only to shrink it to 160 x 160
(23 ms of the crop's 39). Both resizes are linear, so together they are one ``(side, map side)`` weight matrix per
axis, made here from the weights Pillow's C code computes (``precompute_coeffs`` in ``Resample.c``: a triangle
filter, widened by the scale when shrinking, normalised per output pixel). The numbers are Pillow's to float32
rounding (Pillow rounds the crop-sized map to float32 in between; this does not). Small crops are still resized twice
by Pillow: the weights cost more to make than the resizes.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = ["region_to_side", "resize", "taps"]

# Up to this many pixels in between (a 300 x 300 px crop), Pillow's own two resizes cost less than making the weights.
_PILLOW_UP_TO = 300 * 300


def taps(in_size: int, start: float, stop: float, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bilinear resampling of samples ``start``..``stop`` (of ``in_size``) to ``out_size``: for each output
    sample, the input samples it reads and their weights, ``(out_size, k)`` each (unused taps: index 0, weight 0)."""
    start, stop = np.float32(start), np.float32(stop)  # Pillow's C code takes the box as float32
    scale = float(stop - start) / out_size
    filterscale = max(scale, 1.0)
    support = filterscale  # the triangle's support (1 sample), widened when shrinking
    center = float(start) + (np.arange(out_size) + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # as C's (int): toward zero
    end = np.minimum((center + support + 0.5).astype(np.int64), in_size)
    index = first[:, None] + np.arange(int(math.ceil(support)) * 2 + 1)
    used = index < end[:, None]
    weight = np.where(used, np.maximum(0.0, 1.0 - np.abs((index - center[:, None] + 0.5) * (1.0 / filterscale))), 0.0)
    total = weight.sum(axis=1, keepdims=True)
    weight = np.divide(weight, total, out=np.zeros_like(weight), where=total != 0)
    return np.where(used, index, 0), weight


def _through(outer: tuple[np.ndarray, np.ndarray], inner: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Two resamplings in a row (``inner`` first) as one: per output sample, the ``k`` neighbouring inputs from its
    first one on and their weights (as `taps` gives them)."""
    (outer_index, outer_weight), (inner_index, inner_weight) = outer, inner
    reads = inner_index[outer_index]  # (out, k_outer, k_inner): the input samples each output sample reaches
    weight = outer_weight[:, :, None] * inner_weight[outer_index]
    first = reads[:, 0, 0]  # the first tap is always used, and the first read is the lowest
    offset = np.where(weight != 0, reads - first[:, None, None], 0)
    k = int(offset.max()) + 1
    flat = (np.arange(len(first))[:, None, None] * k + offset).ravel()
    summed = np.bincount(flat, weight.ravel(), minlength=len(first) * k).reshape(-1, k)
    return np.minimum(first[:, None] + np.arange(k), inner_index.max()), summed


def region_to_side(lungs: np.ndarray, region: tuple[float, float, float, float], via: tuple[int, int],
                   side: int) -> np.ndarray:
    """What Pillow makes of ``lungs`` (float, ``(h, w)``) resized over ``region`` (left, top, right, bottom, in its
    pixels) to ``via`` (height, width), then resized to ``side x side``: float32, without the ``via``-sized map."""
    (h, w), (via_h, via_w) = np.shape(lungs), via
    if via_h * via_w <= _PILLOW_UP_TO:
        return resize(resize(lungs, via, region), side)
    left, top, right, bottom = region
    row_index, row_weight = _through(taps(via_h, 0, via_h, side), taps(h, top, bottom, via_h))
    col_index, col_weight = _through(taps(via_w, 0, via_w, side), taps(w, left, right, via_w))
    rows = np.einsum("ok,okw->ow", row_weight, np.asarray(lungs, dtype=np.float64)[row_index])
    return np.einsum("ok,hok->ho", col_weight, rows[:, col_index]).astype(np.float32)


def resize(image: np.ndarray, size: int | tuple[int, int], box: tuple[float, ...] | None = None) -> np.ndarray:
    """Float image -> ``size`` (side, or (height, width)) by Pillow, bilinear; its filters widen with the scale, so
    shrinking antialiases. ``box``: only that part of the image, ``(left, top, right, bottom)`` in its pixels."""
    h, w = (size, size) if isinstance(size, int) else size
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR, box=box), dtype=np.float32)
