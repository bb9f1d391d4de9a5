"""Tests for covidxray.checkpoint (safetensors + JSON, nothing unpickled) and the atomic writes under it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from covidxray import checkpoint
from covidxray.checkpoint import FORMAT, load_model, load_state, read_model_meta, resolve_model_path, save_model, save_state
from covidxray.config import config_for
from covidxray.engine import _model_meta
from covidxray.errors import CheckpointError
from covidxray.imaging import load_image
from covidxray.models import build_model
from covidxray.presets import Preprocess
from covidxray.utils import atomic_write_bytes, atomic_write_json

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def xrays(manifest: Path) -> torch.Tensor:
    """Two real X-rays (one COVID-19, one normal) as a (2, 1, 64, 64) network input."""
    pre = Preprocess(size=SIZE)
    keys = ["images/covid-cxnet/covid/00001.jpg"]
    normal = next(line.split(",")[0] for line in manifest.read_text().splitlines() if ",normal,radiography-db," in line)
    keys.append(normal)
    return torch.cat([pre(load_image(manifest.parent / k)) for k in keys])


def _meta(manifest: Path, arch: str = "cxrnet") -> dict[str, Any]:
    cfg = config_for("default", data=str(manifest), arch=arch, size=SIZE, weights=None)
    return _model_meta(cfg, Preprocess(size=SIZE), "ab" * 32, epoch=2, val_auc=0.91)


def _trained_looking_cxrnet(seed: int) -> torch.nn.Module:
    """cxrnet with random weights *and* random BatchNorm statistics, so eval mode really differs from train mode."""
    torch.manual_seed(seed)
    model = build_model("cxrnet")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
        model.classifier[3].weight.normal_(0, 0.5)
    return model.eval()


@pytest.fixture()
def saved_run(tmp_path: Path, manifest: Path) -> tuple[Path, torch.nn.Module]:
    run = tmp_path / "run"
    model = _trained_looking_cxrnet(seed=0)
    save_model(run, model, _meta(manifest))
    return run, model


def _edit_json(run: Path, change: Callable[[dict], None]) -> Path:
    p = run / "model.json"
    meta = json.loads(p.read_text())
    change(meta)
    p.write_text(json.dumps(meta))
    return p


# ---------------------------------------------------------------------------------------------- model checkpoint


def test_save_load_round_trip(saved_run, xrays: torch.Tensor, manifest: Path):
    run, model = saved_run
    assert sorted(p.name for p in run.iterdir()) == ["model.json", "model.safetensors"]
    loaded, meta = load_model(run)
    assert not loaded.training
    with torch.no_grad():
        want, got = model(xrays), loaded(xrays)
    assert want.shape == (2, 2)
    assert torch.equal(got, want)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert meta["format"] == FORMAT and meta["weights_file"] == "model.safetensors"
    assert meta["weights_sha256"] == hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    expected = _meta(manifest)
    assert {k: meta[k] for k in expected} == json.loads(json.dumps(expected))
    assert meta["class_names"] == ["normal", "covid"] and meta["positive_class"] == "covid"


def test_model_path_forms(saved_run):
    run, _ = saved_run
    for form in (run, run / "model.json", run / "model.safetensors", str(run)):
        assert resolve_model_path(form) == run / "model.json"
    with pytest.raises(CheckpointError, match="no model here"):
        resolve_model_path(run / "nothing")
    with pytest.raises(CheckpointError, match="no model here"):
        load_model(run.parent)  # a folder without model.json


def test_checkpoint_holds_no_pickle(saved_run):
    run, _ = saved_run
    blob = (run / "model.safetensors").read_bytes()
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_len])
    assert "features.0.weight" in header and header["features.0.weight"]["shape"] == [24, 1, 3, 3]
    assert b"\x80\x02" not in blob[:8 + header_len]  # no pickle protocol marker in the header


@pytest.mark.parametrize("change,pattern", [
    (lambda m: m.pop("threshold"), r"missing field 'threshold'"),
    (lambda m: m.pop("weights_sha256"), r"missing field 'weights_sha256'"),
    (lambda m: m.pop("arch"), r"missing field 'arch'"),
    (lambda m: m.update(num_classes="2"), r"field 'num_classes' has the wrong type \(str\)"),
    (lambda m: m.update(threshold=True), r"field 'threshold' has the wrong type \(bool\)"),
    (lambda m: m.update(class_names="normal,covid"), r"field 'class_names' has the wrong type \(str\)"),
    (lambda m: m.update(preprocess=None), r"field 'preprocess' has the wrong type \(NoneType\)"),
    (lambda m: m.update(format="covidxray-model/0"), r"unsupported format 'covidxray-model/0'.*covidxray-model/1"),
    (lambda m: m.update(class_names=["normal"]), r"1 class names for 2 classes"),
    (lambda m: m.update(class_names=["normal", "covid", "pneumonia"]), r"3 class names for 2 classes"),
], ids=["no-threshold", "no-sha", "no-arch", "num_classes-str", "threshold-bool", "class_names-str",
        "preprocess-null", "format", "too-few-names", "too-many-names"])
def test_read_model_meta_validation(saved_run, change, pattern: str):
    run, _ = saved_run
    p = _edit_json(run, change)
    with pytest.raises(CheckpointError, match=pattern) as e:
        read_model_meta(run)
    assert str(p) in str(e.value)
    with pytest.raises(CheckpointError, match=pattern):
        load_model(run)


def test_read_model_meta_accepts_int_threshold(saved_run):
    run, _ = saved_run
    _edit_json(run, lambda m: m.update(threshold=1, temperature=2))
    meta, p = read_model_meta(run / "model.safetensors")
    assert (meta["threshold"], meta["temperature"], p) == (1, 2, run / "model.json")


@pytest.mark.parametrize("field,value", [("threshold", math.nan), ("threshold", 1.5), ("temperature", 0.0)])
def test_read_model_meta_rejects_unusable_threshold_or_temperature(saved_run, field: str, value: float):
    run, _ = saved_run
    _edit_json(run, lambda m: m.update({field: value}))  # json.dumps writes NaN as the bare token NaN
    with pytest.raises(CheckpointError, match=field):
        read_model_meta(run)


def test_not_json_or_not_an_object(saved_run):
    run, _ = saved_run
    (run / "model.json").write_text("{this is not json")
    with pytest.raises(CheckpointError, match="not valid JSON") as e:
        load_model(run)
    assert str(run / "model.json") in str(e.value)
    (run / "model.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        read_model_meta(run)


def test_swapped_weights_fail_sha_check(saved_run, tmp_path: Path, manifest: Path):
    run, _ = saved_run
    other = tmp_path / "other"
    save_model(other, _trained_looking_cxrnet(seed=1), _meta(manifest))
    load_model(other)  # the other pair on its own is fine
    shutil.copyfile(other / "model.safetensors", run / "model.safetensors")
    with pytest.raises(CheckpointError, match="SHA-256") as e:
        load_model(run)
    assert str(run / "model.safetensors") in str(e.value)


def test_modified_weights_fail_sha_check(saved_run):
    run, _ = saved_run
    w = run / "model.safetensors"
    blob = bytearray(w.read_bytes())
    blob[-5] ^= 0x01  # one bit of one weight
    w.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_model(run)


def test_missing_weights_file(saved_run):
    run, _ = saved_run
    (run / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_model(run)


def test_weights_that_do_not_fit_the_architecture(saved_run):
    run, _ = saved_run
    _edit_json(run, lambda m: m.update(arch="resnet18"))  # weights untouched: the SHA-256 still matches
    with pytest.raises(CheckpointError, match=r"do not fit architecture 'resnet18'"):
        load_model(run)
    _edit_json(run, lambda m: m.update(arch="vgg11"))
    with pytest.raises(CheckpointError, match=r"unknown architecture 'vgg11'"):
        load_model(run)


def test_wrong_num_classes_does_not_fit(saved_run):
    run, _ = saved_run
    _edit_json(run, lambda m: m.update(num_classes=3, class_names=["normal", "covid", "other"]))
    with pytest.raises(CheckpointError, match="do not fit architecture 'cxrnet'"):
        load_model(run)


def test_failed_save_keeps_previous_checkpoint_loadable(saved_run, manifest: Path, xrays: torch.Tensor):
    run, model = saved_run
    bad = {**_meta(manifest), "val_auc": math.nan}
    with pytest.raises(ValueError):
        save_model(run, _trained_looking_cxrnet(seed=2), bad)
    loaded, _ = load_model(run)
    with torch.no_grad():
        assert torch.equal(loaded(xrays), model(xrays))


# ---------------------------------------------------------------------------------------------- training state


def _two_adamw_steps(model: torch.nn.Module, x: torch.Tensor) -> torch.optim.AdamW:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    target = torch.tensor([1, 0])
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    return opt


def _normalised(groups: list[dict]) -> list[dict]:
    # JSON has no tuples: betas come back as a list holding the same numbers.
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]


def test_save_load_state_round_trip(tmp_path: Path, xrays: torch.Tensor):
    torch.manual_seed(0)
    model = build_model("cxrnet").train()
    opt = _two_adamw_steps(model, xrays)
    header = {"epoch": 1, "history": [{"epoch": 1, "val_auc": 0.75}], "scheduler": {"last_epoch": 2}, "config": {"seed": 0}}
    path = tmp_path / "last.safetensors"
    save_state(path, {"model": model}, opt, header)
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]

    torch.manual_seed(1)
    model2 = build_model("cxrnet").train()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5, betas=(0.1, 0.2), weight_decay=0.0)
    got = load_state(path, {"model": model2}, opt2)
    assert got == header

    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    s, s2 = opt.state_dict(), opt2.state_dict()
    assert _normalised(s2["param_groups"]) == _normalised(s["param_groups"])
    assert s2["param_groups"][0]["lr"] == 3e-3 and s2["param_groups"][0]["weight_decay"] == 0.05
    assert s["state"].keys() == s2["state"].keys() and len(s["state"]) == len(list(model.parameters()))
    for idx, st in s["state"].items():
        assert st.keys() == s2["state"][idx].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for k, v in st.items():
            assert torch.equal(s2["state"][idx][k], v), (idx, k)
    assert float(s2["state"][0]["step"]) == 2.0

    # The restored pair continues exactly like the original.
    stem_before = model.features[0].weight.detach().clone()
    for m, o in ((model, opt), (model2, opt2)):
        torch.manual_seed(5)  # same dropout mask in both
        o.zero_grad()
        torch.nn.functional.cross_entropy(m(xrays), torch.tensor([1, 0])).backward()
        o.step()
    after = [(a, b) for a, b in zip(model.parameters(), model2.parameters())]
    assert all(torch.equal(a, b) for a, b in after)
    assert not torch.equal(after[0][0], stem_before)  # the third step did move the weights


def test_load_state_errors(tmp_path: Path, xrays: torch.Tensor):
    model = build_model("cxrnet")
    opt = torch.optim.AdamW(model.parameters())
    not_state = tmp_path / "model.safetensors"
    save_model(tmp_path, model, {"arch": "cxrnet", "num_classes": 2, "class_names": ["normal", "covid"],
                                 "preprocess": {}, "threshold": 0.5, "temperature": 1.0})
    with pytest.raises(CheckpointError, match="not a covidxray training state"):
        load_state(not_state, {"model": model}, opt)  # safetensors without our header
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a covidxray training state"):
        load_state(junk, {"model": model}, opt)
    good = tmp_path / "last.safetensors"
    save_state(good, {"model": model}, _two_adamw_steps(model, xrays), {"epoch": 0})
    with pytest.raises(CheckpointError, match="holds no state for 'ema'"):
        load_state(good, {"model": build_model("cxrnet"), "ema": build_model("cxrnet")}, opt)


# ---------------------------------------------------------------------------------------------- atomic writes


def _assert_only(folder: Path, names: list[str]) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no .tmp left behind


def test_atomic_write_success(tmp_path: Path):
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert (target.stat().st_mode & 0o777) == 0o644
    _assert_only(target.parent, ["f.bin"])


def test_atomic_write_keeps_old_file_when_rename_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "model.json"
    target.write_bytes(b"old contents")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new contents" * 1000)
    monkeypatch.undo()
    assert target.read_bytes() == b"old contents"
    _assert_only(tmp_path, ["model.json"])


def test_atomic_write_keeps_old_file_when_write_fails_midway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "last.safetensors"
    target.write_bytes(b"old state")

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)  # bytes already written to the temp file, then the disk fails
    with pytest.raises(OSError, match="Input/output"):
        atomic_write_bytes(target, b"x" * 100_000)
    monkeypatch.undo()
    assert target.read_bytes() == b"old state"
    _assert_only(tmp_path, ["last.safetensors"])

    with pytest.raises(TypeError):
        atomic_write_bytes(target, "text is not bytes")  # the write itself raises
    assert target.read_bytes() == b"old state"
    _assert_only(tmp_path, ["last.safetensors"])


def test_atomic_write_json_refuses_nan_and_keeps_old_file(tmp_path: Path):
    target = tmp_path / "model.json"
    atomic_write_json(target, {"threshold": 0.4})
    with pytest.raises(ValueError):
        atomic_write_json(target, {"threshold": math.nan})
    assert json.loads(target.read_text()) == {"threshold": 0.4}
    _assert_only(tmp_path, ["model.json"])


def test_save_model_uses_atomic_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, manifest: Path):
    calls: list[str] = []
    real = checkpoint.atomic_write_bytes

    def spy(path, data):
        calls.append(Path(path).name)
        return real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", spy)
    save_model(tmp_path, build_model("cxrnet"), _meta(manifest))
    assert calls == ["model.safetensors"]
    _assert_only(tmp_path, ["model.json", "model.safetensors"])
