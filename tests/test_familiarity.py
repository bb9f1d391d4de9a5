"""Unfamiliarity: the Mahalanobis distance to the training films, read as a share of validation films."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidxray.errors import CheckpointError
from covidxray.familiarity import WARN_ABOVE, Familiarity
from covidxray.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _gaussian(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 0.1, 40)  # an elongated cloud, like network features
    return rng.normal(size=(n, 40)) * scales + shift


def test_in_distribution_is_typical_and_far_away_is_unfamiliar(tmp_path: Path):
    fam = Familiarity.fit(_gaussian(2000, 0), _gaussian(1000, 1), k=8)
    inside = fam(_gaussian(1000, 2))
    assert 0.4 < np.median(inside) < 0.6 and (inside > WARN_ABOVE).mean() < 0.03  # uniform-ish on fresh draws
    # Films from elsewhere: the same kind of cloud, shifted by three of its own widths along every axis.
    off = _gaussian(200, 3) + 3 * np.linspace(3.0, 0.1, 40)
    assert (fam(off) > WARN_ABOVE).mean() > 0.9
    sha = fam.save(tmp_path)
    again = Familiarity.load(tmp_path, sha)
    np.testing.assert_allclose(again(off), fam(off))
    with pytest.raises(CheckpointError, match="SHA-256"):
        Familiarity.load(tmp_path, "0" * 64)


def test_the_bundled_model_reports_unfamiliarity_and_warns_on_strange_films(manifest: Path):
    predictor = Predictor()
    assert predictor.familiarity is not None
    typical = [predictor.predict_path(p) for p in sorted((manifest.parent / "images/radiography-db/normal").glob("*.jpg"))[:20]]
    values = [a.unfamiliarity for a in typical]
    assert all(0.0 <= v <= 1.0 for v in values) and np.median(values) < 0.9
    noise = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((256, 256)) * 255).astype(np.uint8)).save(noise, format="PNG")
    forced = Predictor(gate=False).predict_bytes(noise.getvalue())  # past the gate: the score is the last line of defence
    assert forced.unfamiliarity > WARN_ABOVE and "unlike the films the model was trained on" in forced.message
