"""`covidxray.resample`: Pillow's bilinear weights, computed, give Pillow's numbers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from covidxray.resample import region_to_side, taps


@pytest.mark.parametrize("in_size, start, stop, out_size", [
    (112, 0, 112, 437), (112, 10.3, 101.9, 2132), (437, 0, 437, 160), (2132, 0, 2132, 160), (160, 0, 160, 160),
    (112, 0.0, 112.0, 40), (50, 7.5, 8.25, 9), (1, 0, 1, 5),
])
def test_taps_are_pillows_weights(in_size: int, start: float, stop: float, out_size: int):
    """Up and down, a whole line or a fractional part of it: the weights applied to random samples give what Pillow's
    resize of the same line over the same box gives (it rounds to float32)."""
    line = np.random.default_rng(in_size + out_size).random(in_size).astype(np.float32)
    index, weight = taps(in_size, start, stop, out_size)
    pillow = np.asarray(Image.fromarray(line[None], mode="F").resize((out_size, 1), Image.Resampling.BILINEAR,
                                                                      box=(start, 0, stop, 1)))[0]
    np.testing.assert_allclose((line.astype(np.float64)[index] * weight).sum(axis=1), pillow, rtol=0, atol=2e-7)
    np.testing.assert_allclose(weight.sum(axis=1), 1.0)


def test_region_to_side_is_two_pillow_resizes_in_one():
    """A map's region brought to an in-between size, then to the side: the same numbers as Pillow's two resizes."""
    lungs = np.random.default_rng(0).random((112, 112)).astype(np.float32)
    for region, via in (((9.6, 4.2, 104.8, 99.1), (1900, 2100)), ((0, 0, 112, 112), (330, 300)), ((20, 30, 60, 70), (90, 90))):
        between = Image.fromarray(lungs, mode="F").resize(via[::-1], Image.Resampling.BILINEAR, box=region)
        pillow = np.asarray(between.resize((160, 160), Image.Resampling.BILINEAR))
        ours = region_to_side(lungs, region, via, 160)
        assert ours.dtype == np.float32 and ours.shape == (160, 160)
        np.testing.assert_allclose(ours, pillow, rtol=0, atol=3e-7)
