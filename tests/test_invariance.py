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
from covidxray.errors import DataError
from covidxray.invariance import acquisition_twin, mix_style, mixed_styles, twin_loss
from covidxray.models import build_model, get_spec
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
    _, sharpen = torch.rand(len(films), generator=g), torch.rand(len(films), generator=g) < 0.5  # the draws it made (sigma, kind)
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


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory, manifest: Path, split_file: Path, cache_dir: Path):
    """``short_run(name, **options)``: one short default training run with ``options``; its model.json."""
    root = tmp_path_factory.mktemp("runs")

    def run(name: str, **options) -> dict:
        cfg = config_for("default", data=str(manifest), splits=str(split_file), out=str(root / name), cache_dir=str(cache_dir),
                         size=SIZE, epochs=1, limit=96, deterministic=True, patience=0, seed=3, **options)
        return json.loads((train(cfg) / "model.json").read_text())

    return run


@pytest.fixture(scope="module")
def plain_run(short_run) -> dict:
    return short_run("off")


@pytest.mark.parametrize("option, value", [("consistency", 0.5), ("mixstyle", 0.5)])
def test_a_training_only_term_changes_the_run_and_only_the_run(short_run, plain_run: dict, option: str, value: float):
    off, on = plain_run, short_run(option, **{option: value})
    assert on["train_config"][option] == value and off["train_config"][option] == 0
    assert on["weights_sha256"] != off["weights_sha256"]
    # the term exists in training only: the saved classifier has the same tensors either way
    assert {k for k in on if k != "train_seconds"} == {k for k in off if k != "train_seconds"}


def test_mixed_styles_move_each_film_between_its_own_and_a_partners_statistics():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 16) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1) + torch.tensor([0.0, 5.0]).view(2, 1, 1, 1)
    torch.manual_seed(1)
    mixed = mix_style(x)
    mu, sd = x.mean((2, 3)), x.std((2, 3))
    for stat, before in ((mixed.mean((2, 3)), mu), (mixed.std((2, 3)), sd)):
        low, high = before.min(0).values - 1e-3, before.max(0).values + 1e-3
        assert torch.all((stat >= low) & (stat <= high)), "a mixed statistic lies between the two films' own"
    assert not torch.allclose(mixed, x, atol=1e-3), "the draw for seed 1 mixes"
    # the content stays: each channel of each film is an affine map of what it was
    z = lambda t: (t - t.mean((2, 3), keepdim=True)) / t.std((2, 3), keepdim=True)  # noqa: E731
    assert torch.allclose(z(mixed), z(x), atol=1e-4)


def test_mixed_styles_act_inside_the_block_only_and_only_where_declared():
    model = build_model("tf_efficientnet_lite0", in_chans=1).train()
    x = torch.randn(4, 1, 64, 64)
    torch.manual_seed(0)
    plain = model(x)
    torch.manual_seed(0)
    with mixed_styles(model, get_spec("tf_efficientnet_lite0").style, p=1.0):
        mixed = model(x)
    torch.manual_seed(0)
    after = model(x)
    assert not torch.allclose(mixed, plain, atol=1e-4)
    assert torch.allclose(after, plain) and not any(m._forward_hooks for m in model.modules()), "hooks removed"
    with pytest.raises(DataError, match="mixstyle"), mixed_styles(build_model("cxrnet", in_chans=1), get_spec("cxrnet").style, 0.5):
        pass
