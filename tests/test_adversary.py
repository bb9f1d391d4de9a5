"""The origin adversary (`covidxray.adversary`): gradient reversal, one head per label, and real training with it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from covidxray.adversary import OriginAdversary, build_adversary, reversal_strength, reverse_gradient
from covidxray.checkpoint import read_state_header
from covidxray.config import config_for
from covidxray.engine import train
from covidxray.imaging import load_image
from covidxray.models import build_model
from covidxray.predictor import Predictor
from covidxray.presets import Preprocess

SIZE = 64
TIMINGS = {"img_per_s", "train_seconds", "val_seconds"}


def test_gradient_reversal_is_the_identity_forward_and_flips_and_scales_the_gradient():
    x = torch.linspace(-2, 3, 12).reshape(3, 4).requires_grad_()
    w = torch.arange(12.0).reshape(3, 4) - 5
    y = reverse_gradient(x, 0.3)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.equal(x.grad, -0.3 * w)


def test_reversal_strength_ramps_from_zero_towards_one():
    ramp = [reversal_strength(p) for p in torch.linspace(0, 1, 21).tolist()]
    assert ramp[0] == 0.0 and all(a < b for a, b in zip(ramp, ramp[1:]))
    assert ramp[-1] == pytest.approx(2 / (1 + math.exp(-10)) - 1) and ramp[-1] > 0.9999
    assert reversal_strength(0.1) == pytest.approx(0.4621, abs=1e-4)


@pytest.fixture(scope="module")
def six_xrays(manifest: Path) -> torch.Tensor:
    """Six real X-rays (three normal, three COVID-19) as a (6, 1, 64, 64) network input."""
    lines = manifest.read_text().splitlines()[1:]
    keys = [line.split(",")[0] for line in lines if ",normal,radiography-db," in line][:3]
    keys += [line.split(",")[0] for line in lines if ",covid,covid-cxnet," in line][:3]
    pre = Preprocess(size=SIZE)
    return torch.cat([pre(load_image(manifest.parent / k)) for k in keys])


def test_one_head_per_label_with_two_sources_and_only_such_labels_count(six_xrays: torch.Tensor):
    model = build_model("cxrnet", weights=None)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    # training sources: label 0 comes from source 0 alone, label 1 from sources 1 and 2
    rng = torch.get_rng_state()
    adversary = OriginAdversary(model, "cxrnet", labels, torch.tensor([0, 0, 0, 1, 2, 1]), weight=0.5, seed=0)
    assert torch.equal(torch.get_rng_state(), rng), "building the heads drew from the global random stream"
    assert list(adversary.heads) == ["1"] and adversary.heads["1"].out_features == 2
    assert not any(k.startswith("classifier") for k in adversary.state_dict()), "the classifier head leaked in"

    def step(sources: list[int]) -> torch.Tensor:
        model.zero_grad(), adversary.zero_grad()
        with adversary.watch(model):
            model(six_xrays)
        loss = adversary.loss(labels, torch.tensor(sources), progress=0.5)
        loss.backward()
        return loss.detach()

    loss = step([0, 0, 0, 1, 2, 1])
    head = adversary.heads["1"]
    assert 0 < float(loss) and head.weight.grad.abs().sum() > 0
    assert model.get_submodule("classifier.3").weight.grad is None, "the classifier's own head must not be trained here"
    assert model.get_submodule("features.0").weight.grad.abs().sum() > 0
    stats = adversary.epoch_stats()
    assert stats["adv_origin_chance"] == pytest.approx(2 / 3) and stats["adv_strength"] == reversal_strength(0.5)
    assert stats["adv_loss"] == pytest.approx(float(loss) / 0.5, rel=1e-5)  # one label counted: its mean CE x weight
    # a batch whose COVID-19 films share one source has nothing to hide: no loss, but the head still gets a (zero) gradient
    assert float(step([0, 0, 0, 1, 1, 1])) == 0.0 and torch.count_nonzero(head.weight.grad) == 0
    assert adversary.epoch_stats()["adv_loss"] == 0.0


def test_every_label_gets_its_own_head_and_its_own_source_numbering(six_xrays: torch.Tensor):
    """Normals from three sources, COVID-19 films from two others: each head names only its label's sources."""
    model = build_model("cxrnet", weights=None)
    labels, sources = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 1, 2, 3, 4, 3])
    adversary = OriginAdversary(model, "cxrnet", labels, sources, weight=1.0, seed=0)
    assert {k: h.out_features for k, h in adversary.heads.items()} == {"0": 3, "1": 2}
    assert adversary.target.tolist() == [[0, 1, 2, -1, -1], [-1, -1, -1, 0, 1]]
    with adversary.watch(model):
        model(six_xrays)
    loss = adversary.loss(labels, sources, progress=1.0)
    loss.backward()
    assert all(h.weight.grad.abs().sum() > 0 for h in adversary.heads.values())
    stats = adversary.epoch_stats()
    assert stats["adv_origin_chance"] == pytest.approx((1 + 2) / 6)  # one of three normals, two of three COVID-19 films
    assert float(loss.detach()) == pytest.approx(stats["adv_loss"], rel=1e-5)  # three films per label: the two means agree


def test_the_features_are_pushed_against_the_heads(six_xrays: torch.Tensor):
    """The gradient reaching the features is the heads' own gradient, flipped and scaled by the reversal strength."""
    model = build_model("cxrnet", weights=None).eval()
    labels, sources = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 0, 1, 2, 1])
    adversary = OriginAdversary(model, "cxrnet", labels, sources, weight=1.0, seed=0)
    feats = model.features(six_xrays).mean((2, 3)).detach().requires_grad_()
    adversary._features = [feats]
    adversary.loss(labels, sources, progress=0.2).backward()
    plain = feats.detach().requires_grad_()
    mask = labels == 1
    F.cross_entropy(adversary.heads["1"](plain[mask]), adversary.target[1, sources[mask]]).backward()
    assert torch.allclose(feats.grad, -reversal_strength(0.2) * plain.grad, atol=1e-7)


def test_weight_zero_builds_nothing_and_draws_no_random_number():
    model = build_model("cxrnet", weights=None)
    rng = torch.get_rng_state()
    assert build_adversary(model, "cxrnet", torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]), 0.0, 0, torch.device("cpu")) is None
    assert torch.equal(torch.get_rng_state(), rng)


def _config(manifest: Path, split_file: Path, cache_dir: Path, out: Path, weight: float):
    return config_for("default", data=str(manifest), splits=str(split_file), out=str(out), cache_dir=str(cache_dir), size=SIZE,
                      epochs=2, limit=160, deterministic=True, patience=0, seed=3, balance_sources=True,
                      origin_adversary=weight)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, manifest: Path, split_file: Path, cache_dir: Path) -> dict[str, Path]:
    """Two real tiny runs on shared X-rays, the same but for the adversary: weight 0 and weight 0.5."""
    base = tmp_path_factory.mktemp("adversary")
    return {name: train(_config(manifest, split_file, cache_dir, base / name, weight))
            for name, weight in (("off", 0.0), ("on", 0.5))}


def _state_keys(run: Path) -> list[str]:
    with safe_open(str(run / "last.safetensors"), framework="pt") as f:
        return list(f.keys())


@pytest.mark.slow
def test_weight_zero_leaves_no_trace_in_the_run(runs: dict[str, Path]):
    off = runs["off"]
    assert not any(k.startswith("adversary.") for k in _state_keys(off))
    assert len(read_state_header(off / "last.safetensors")["optim_param_groups"]) == 1
    assert not any(k.startswith("adv_") for k in json.loads((off / "history.json").read_text())[0])


@pytest.mark.slow
def test_the_adversary_trains_but_the_saved_model_is_the_plain_classifier(runs: dict[str, Path]):
    off, on = (load_file(runs[k] / "model.safetensors") for k in ("off", "on"))
    assert {k: (v.shape, v.dtype) for k, v in off.items()} == {k: (v.shape, v.dtype) for k, v in on.items()}
    assert any(not torch.equal(off[k], on[k]) for k in off), "the adversary changed nothing"
    meta_off, meta_on = (json.loads((runs[k] / "model.json").read_text()) for k in ("off", "on"))
    assert meta_off.keys() == meta_on.keys()
    assert (meta_on["arch"], meta_on["num_classes"], meta_on["preprocess"]) == (meta_off["arch"], 2, meta_off["preprocess"])
    assert Predictor(runs["on"], backend="torch").meta["weights_sha256"] == meta_on["weights_sha256"]  # serving loads it
    keys = _state_keys(runs["on"])
    heads = [k for k in keys if k.startswith("adversary.")]
    assert heads and all(k.startswith("adversary.heads.") for k in heads)
    assert len(read_state_header(runs["on"] / "last.safetensors")["optim_param_groups"]) == 2
    history = json.loads((runs["on"] / "history.json").read_text())
    for row in history:
        assert 0 < row["adv_origin_chance"] <= 1 and 0 <= row["adv_origin_acc"] <= 1 and row["adv_loss"] > 0
    # the strength of epoch 1's last step: 160 films in 5 steps, progress (0 + 4 / 5) / 2 epochs
    assert history[0]["adv_strength"] == pytest.approx(reversal_strength(0.4))


@pytest.mark.slow
def test_resume_with_the_adversary_replays_the_uninterrupted_run(runs: dict[str, Path], tmp_path: Path, manifest: Path,
                                                                 split_file: Path, cache_dir: Path, crash_in_second_epoch):
    with crash_in_second_epoch(), pytest.raises(KeyboardInterrupt):
        train(_config(manifest, split_file, cache_dir, tmp_path / "crashed", 0.5))
    resumed = train(config_for("default", out=str(tmp_path / "crashed"), epochs=0), resume=True)

    full = runs["on"]
    h_full, h_res = (json.loads((r / "history.json").read_text()) for r in (full, resumed))
    assert [{k: v for k, v in h.items() if k not in TIMINGS} for h in h_full] == \
           [{k: v for k, v in h.items() if k not in TIMINGS} for h in h_res]
    assert (full / "model.safetensors").read_bytes() == (resumed / "model.safetensors").read_bytes()
    a, b = (load_file(r / "last.safetensors") for r in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k.startswith(("adversary.", "optim.")))
