"""The consistency term (`covidxray.invariance`): sharpened or blurred twins, and a loss that teaches invariance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from covidxray.config import config_for
from covidxray.engine import train
from covidxray.imaging import load_image
from covidxray.invariance import acquisition_twin, twin_loss
from covidxray.presets import Preprocess

SIZE = 64
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def films(manifest: Path) -> torch.Tensor:
    """Sixteen real X-rays (normal and COVID-19), as prepared [0, 1] images (16, 1, 64, 64)."""
    lines = manifest.read_text().splitlines()[1:]
    keys = [line.split(",")[0] for line in lines if ",normal,radiography-db," in line][:8]
    keys += [line.split(",")[0] for line in lines if ",covid,covid-cxnet," in line][:8]
    pre = Preprocess(size=SIZE)
    return torch.cat([pre(load_image(manifest.parent / k)) for k in keys]) * pre.std + pre.mean


def _detail(x: torch.Tensor) -> torch.Tensor:
    """High-frequency energy of each film: mean |Laplacian|."""
    lap = torch.tensor([[[[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]]])
    return F.conv2d(x, lap).abs().mean((1, 2, 3))


def test_each_twin_is_its_film_sharpened_or_blurred(films: torch.Tensor):
    twin = acquisition_twin(films, torch.Generator().manual_seed(0))
    again = acquisition_twin(films, torch.Generator().manual_seed(0))
    assert torch.equal(twin, again) and twin.shape == films.shape
    assert twin.min() >= 0 and twin.max() <= 1
    g = torch.Generator().manual_seed(0)
    g_sigma, sharpen = torch.rand(len(films), generator=g), torch.rand(len(films), generator=g) < 0.5  # the draws it made
    assert 0 < int(sharpen.sum()) < len(films), "a batch of 16 should hold both kinds"
    before, after = _detail(films), _detail(twin)
    assert torch.all(after[sharpen] > 1.2 * before[sharpen]), "sharpened twins have more fine detail"
    assert torch.all(after[~sharpen] < 0.8 * before[~sharpen]), "blurred twins have less"
    assert torch.allclose(twin[~sharpen].mean((1, 2, 3)), films[~sharpen].mean((1, 2, 3)), atol=0.01)  # blur keeps brightness


class _Texture(nn.Module):
    """A tiny classifier whose score depends on fine detail: a 3 x 3 filter bank, its mean response, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight.mul_(30)  # a score that really moves with the filters' response

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).abs().mean((2, 3)))


def test_the_twin_loss_teaches_the_score_to_ignore_sharpness(films: torch.Tensor):
    pre = Preprocess(size=SIZE)
    x = (films - pre.mean) / pre.std
    model = _Texture()

    def gap() -> float:
        with torch.no_grad():
            return float(twin_loss(model, x, model(x), pre, torch.Generator().manual_seed(1), 1.0))

    start = gap()
    with torch.no_grad():
        assert float(twin_loss(model, x, model(x), pre, torch.Generator().manual_seed(1), 2.5)) == pytest.approx(2.5 * start)
    assert start > 1e-3, "the texture model's score moves with sharpness to begin with"
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    for _ in range(60):
        optimizer.zero_grad()
        twin_loss(model, x, model(x), pre, g, 1.0).backward()
        optimizer.step()
    end = gap()
    assert end < 0.2 * start


def test_training_with_the_consistency_term_changes_the_run_and_only_the_run(tmp_path: Path, manifest: Path,
                                                                           split_file: Path, cache_dir: Path):
    def run(name: str, weight: float) -> Path:
        cfg = config_for("default", data=str(manifest), splits=str(split_file), out=str(tmp_path / name), cache_dir=str(cache_dir),
                         size=SIZE, epochs=1, limit=96, deterministic=True, patience=0, seed=3, consistency=weight)
        return train(cfg)

    off, on = run("off", 0.0), run("on", 0.5)
    meta = {name: json.loads((r / "model.json").read_text()) for name, r in (("off", off), ("on", on))}
    assert meta["on"]["train_config"]["consistency"] == 0.5
    assert meta["on"]["weights_sha256"] != meta["off"]["weights_sha256"]
    # the twin exists in training only: the saved classifier has the same tensors either way
    assert {k for k in meta["on"] if k != "train_seconds"} == {k for k in meta["off"] if k != "train_seconds"}
