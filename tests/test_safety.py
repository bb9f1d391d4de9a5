"""Model files are data, not code: every loader refuses pickles and malformed checkpoints clearly.

A hostile "model" is a pickle whose ``__reduce__`` runs a shell command that creates a marker
file. It is planted wherever covidxray reads a model or a training state — ``model.safetensors``,
``last.safetensors``, a ``--weights`` file, ``model.json`` — and each entry point (``load_model``,
``load_state``, `Predictor`, ``covidxray predict``, ``train --weights``, ``train --resume``) must
refuse it with a `CheckpointError` naming the file, while the marker never appears.
(``build_model(weights=...)`` on .pth/.pt pickles is covered in test_models.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from covidxray.checkpoint import load_model, load_state, read_model_meta, save_model, save_state
from covidxray.cli import main
from covidxray.errors import CheckpointError
from covidxray.models import build_model
from covidxray.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCH, SIZE = "cxrnet", 32


class _Payload:
    """Unpickling this runs ``touch MARKER`` through the shell: any code a hostile file could run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def _pickle(marker: Path) -> bytes:
    return pickle.dumps({"features.0.weight": _Payload(marker)})


def _torch_zip(marker: Path, tmp: Path) -> bytes:
    path = tmp / "payload.pt"
    torch.save({"features.0.weight": _Payload(marker)}, path)  # torch's zip format, pickle inside
    return path.read_bytes()


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A valid run folder holding a small cxrnet checkpoint and a training state."""
    out = tmp_path / "run"
    torch.manual_seed(0)
    model = build_model(ARCH)
    meta = {"arch": ARCH, "in_chans": 1, "num_classes": 2, "class_names": ["normal", "covid"],
            "preprocess": {"size": SIZE, "equalize": True, "mean": 0.5, "std": 0.5}, "threshold": 0.5, "temperature": 1.0}
    save_model(out, model, meta)
    save_state(out / "last.safetensors", {"model": model}, torch.optim.AdamW(model.parameters()),
               {"epoch": 0, "history": [], "config": {}, "scheduler": {}, "best_auc": 0.5, "best_epoch": 0})
    return out


def _set_json(run: Path, **changes) -> None:
    p = run / "model.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **changes}))


def _plant_weights(run: Path, blob: bytes, name: str = "model.safetensors", rehash: bool = True) -> None:
    """Replace the weights; with ``rehash`` also update model.json so the SHA-256 check passes."""
    (run / name).write_bytes(blob)
    if rehash:
        _set_json(run, weights_file=name, weights_sha256=hashlib.sha256(blob).hexdigest())


def test_the_payload_is_live(marker: Path):
    """Guard for every test below: plain unpickling does run the payload."""
    pickle.loads(_pickle(marker))
    assert marker.exists()


# ---------------------------------------------------------------------------------------------- model checkpoint

MODEL_ATTACKS: dict[str, tuple[Callable[[Path, Path, Path], None], str]] = {
    # name -> (plant(run, marker, tmp), expected message)
    "pickle-as-model.safetensors": (lambda r, m, t: _plant_weights(r, _pickle(m), rehash=False), "SHA-256 differs"),
    "pickle-as-model.safetensors-rehashed": (lambda r, m, t: _plant_weights(r, _pickle(m)), "not a safetensors file"),
    "torch-zip-as-model.safetensors": (lambda r, m, t: _plant_weights(r, _torch_zip(m, t)), "not a safetensors file"),
    "pickle-as-weights_file.pth": (lambda r, m, t: _plant_weights(r, _pickle(m), "weights.pth"), "not a safetensors file"),
    "pickle-as-model.json": (lambda r, m, t: (r / "model.json").write_bytes(_pickle(m)), "not valid JSON"),
}


@pytest.mark.parametrize("attack", sorted(MODEL_ATTACKS))
def test_model_loaders_refuse_pickles(attack: str, run: Path, marker: Path, tmp_path: Path, capsys, source_xray: Path):
    plant, message = MODEL_ATTACKS[attack]
    plant(run, marker, tmp_path)
    for load in (load_model, Predictor):
        with pytest.raises(CheckpointError, match=message) as err:
            load(run)
        assert str(run) in str(err.value)
    assert main(["predict", str(source_xray), "--model", str(run)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not marker.exists(), "loading ran the pickled code"


@pytest.mark.parametrize("name", ["../outside.safetensors", "/dev/zero", "sub/model.safetensors", "", ".."])
def test_weights_file_must_be_a_file_beside_the_json(name: str, run: Path):
    """model.json must not send the loader elsewhere: an endless /dev/zero, another folder's file."""
    shutil.copyfile(run / "model.safetensors", run.parent / "outside.safetensors")
    _set_json(run, weights_file=name)
    with pytest.raises(CheckpointError, match=r"field 'weights_file' must be the name of a file beside"):
        read_model_meta(run)


@pytest.mark.parametrize("preprocess,pattern", [
    ({"size": "big"}, r"preprocess field 'size' has the wrong type \(str\)"),
    ({"size": 32, "equalize": "yes"}, r"preprocess field 'equalize' has the wrong type \(str\)"),
    ({"size": 32, "std": None}, r"preprocess field 'std' has the wrong type \(NoneType\)"),
    ({"size": 32, "resize": "crop"}, r"unknown preprocess field 'resize'"),
    ({"size": 0}, r"preprocess: size must be"),
    ({"size": 32, "std": 0}, r"preprocess: std must be"),
    ({"size": 32, "mask_border": 0.7}, r"preprocess: mask_border must be"),
], ids=["size-str", "equalize-str", "std-null", "unknown-key", "size-0", "std-0", "mask-border"])
def test_preprocess_fields_are_validated(preprocess: dict, pattern: str, run: Path):
    """A malformed preprocessing contract fails on load, not later inside a prediction."""
    _set_json(run, preprocess=preprocess)
    with pytest.raises(CheckpointError, match=pattern) as err:
        Predictor(run)
    assert str(run / "model.json") in str(err.value)


def test_wrong_tensor_shape_is_named(run: Path):
    tensors = st_load((run / "model.safetensors").read_bytes())
    tensors["classifier.3.weight"] = torch.zeros(2, 7)  # right name, wrong shape
    _plant_weights(run, st_save(tensors))
    with pytest.raises(CheckpointError, match=r"do not fit architecture 'cxrnet'.*classifier\.3\.weight"):
        load_model(run)


# ---------------------------------------------------------------------------------------------- training state


def _state_modules() -> tuple[dict[str, torch.nn.Module], torch.optim.Optimizer]:
    model = build_model(ARCH)
    return {"model": model}, torch.optim.AdamW(model.parameters())


@pytest.mark.parametrize("payload", ["pickle", "torch-zip"])
def test_load_state_refuses_pickles(payload: str, run: Path, marker: Path, tmp_path: Path):
    blob = _pickle(marker) if payload == "pickle" else _torch_zip(marker, tmp_path)
    (run / "last.safetensors").write_bytes(blob)
    with pytest.raises(CheckpointError, match="not a covidxray training state") as err:
        load_state(run / "last.safetensors", *_state_modules())
    assert str(run / "last.safetensors") in str(err.value)
    assert not marker.exists()


def test_load_state_names_a_wrong_tensor_shape(run: Path):
    path = run / "last.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["model.classifier.3.weight"] = torch.zeros(2, 7)
    path.write_bytes(st_save(tensors, metadata=metadata))
    with pytest.raises(CheckpointError, match=r"last\.safetensors: .*'model'.*classifier\.3\.weight"):
        load_state(path, *_state_modules())


# ---------------------------------------------------------------------------------------------- train --weights / --resume


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """ROOT/{train,val}/{covid,normal}/ with two real X-rays each (symlinks into the shared data)."""
    root = tmp_path_factory.mktemp("tiny")
    picks = {"covid": sorted((data_root / "images" / "covid-cxnet" / "covid").iterdir())[:4],
             "normal": sorted((data_root / "images" / "radiography-db" / "normal").iterdir())[:4]}
    for label, files in picks.items():
        for i, f in enumerate(files):
            folder = root / ("train" if i < 2 else "val") / label
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def source_xray(data_root: Path) -> Path:
    return data_root / "images" / "covid-cxnet" / "covid" / "00001.jpg"


def _train(*extra: str, tree: Path, out: Path) -> list[str]:
    return ["train", "--data", str(tree), "--recipe", "fast", "--size", str(SIZE), "--epochs", "1",
            "--out", str(out), "--cache-dir", "", *extra]


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".safetensors"])
def test_train_weights_refuses_pickles(suffix: str, tiny_tree: Path, tmp_path: Path, marker: Path, capsys):
    evil = tmp_path / f"pretrained{suffix}"
    evil.write_bytes(_torch_zip(marker, tmp_path) if suffix == ".pt" else _pickle(marker))
    assert main(_train("--weights", str(evil), tree=tiny_tree, out=tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert str(evil) in err and "Traceback" not in err
    assert "refused to unpickle" in err or "not a safetensors file" in err
    assert not marker.exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("payload", ["pickle", "torch-zip"])
def test_train_resume_refuses_a_pickled_state(payload: str, tmp_path: Path, marker: Path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.safetensors").write_bytes(_pickle(marker) if payload == "pickle" else _torch_zip(marker, tmp_path))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "not a covidxray training state" in err and str(run / "last.safetensors") in err
    assert "Traceback" not in err
    assert not marker.exists()


def test_train_resume_refuses_a_state_with_unknown_config(run: Path, capsys):
    """A state written by another version (unknown config fields) is a clear error, not a TypeError."""
    from safetensors import safe_open

    path = run / "last.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["header"])
    header["config"] = {"data": "x", "out": str(run), "epochs": 2, "teleport": True}
    path.write_bytes(st_save(tensors, metadata={"header": json.dumps(header)}))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "teleport" in err and str(path) in err
