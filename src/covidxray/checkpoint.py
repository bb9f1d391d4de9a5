"""Checkpoints: weights as safetensors, everything else as JSON. Nothing here unpickles.

A run directory holds

* ``model.safetensors`` + ``model.json`` — the model to use: architecture, preprocessing, class
  names, operating threshold, temperature, metrics, data fingerprint and the SHA-256 of the
  weights file (so a weights/JSON pair from different writes is detected);
* ``last.safetensors`` — the training state for ``--resume``: model and optimizer tensors plus a
  JSON header (epoch, scheduler, history, config) in the safetensors metadata, so the whole state
  is one file and one atomic rename.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from .config import settings
from .errors import CheckpointError, DataError
from .models import build_model
from .presets import Preprocess
from .segment import LungSegmenter
from .utils import atomic_write_bytes, atomic_write_text, read_json_object, read_verified

__all__ = [
    "FORMAT", "save_model", "load_model", "read_model_meta", "update_model_meta", "save_state", "load_state",
    "read_state_header", "resolve_model_path", "run_dir", "default_model_path", "load_preprocess", "model_files", "copy_model", "resolve_data",
    "ONNX_FORMAT", "contract_path", "read_onnx_contract",
]

FORMAT = "covidxray-model/1"
# Field -> type every model.json must carry (validated on load with a clear message).
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str, "arch": str, "num_classes": int, "class_names": list, "preprocess": dict,
    "threshold": (float, int), "temperature": (float, int), "weights_sha256": str,
}


def _tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses views that share storage; a contiguous copy is a few MB at most.
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()}


ONNX_FORMAT = "covidxray-onnx/1"


def contract_path(onnx_file: str | os.PathLike) -> Path:
    """The contract of an exported graph (`covidxray.export`): ``model.int8.onnx`` -> ``model.int8.onnx.json``."""
    return Path(f"{onnx_file}.json")


def read_onnx_contract(onnx_file: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """An exported graph's contract, its bytes checked, and the ``model.json`` it belongs to.

    Returns:
        ``(contract, meta, json_path)``.

    Raises:
        CheckpointError: no or a foreign contract, a graph whose bytes or source weights do not match.
    """
    onnx_file = Path(onnx_file)
    cpath = contract_path(onnx_file)
    if not cpath.is_file():
        raise CheckpointError(f"{cpath}: no contract beside {onnx_file.name}; export again")
    contract = read_json_object(cpath, ONNX_FORMAT, "ONNX contract", CheckpointError)
    meta, json_path = read_model_meta(onnx_file.parent / Path(str(contract.get("model", "model.json"))).name)
    if contract.get("weights_sha256") != meta["weights_sha256"]:
        raise CheckpointError(f"{onnx_file}: exported from other weights than {json_path.name}'s; export again")
    return contract, meta, json_path


def default_model_path() -> Path:
    """``$COVIDXRAY_MODEL`` if set, else the model shipped inside the package (``covidxray/bundled/``)."""
    env = settings().model
    if env:
        return Path(env)
    return Path(str(resources.files(__package__) / "bundled"))  # package data: wheels are installed unzipped


def load_preprocess(meta: dict[str, Any], json_path: Path) -> Preprocess:
    """The checkpoint's `Preprocess`, with its lung segmenter attached when it crops to the lungs.

    The segmenter is the ``segmenter.json`` pair beside ``json_path``, and its weights must be the
    ones the model was trained with (``segmenter_sha256``): another segmenter draws other boxes.
    """
    pre = Preprocess(**meta["preprocess"])
    if not pre.lung_crop:
        return pre
    seg_json = json_path.parent / "segmenter.json"
    if not seg_json.is_file():
        raise CheckpointError(f"{json_path}: the model crops to the lungs but {seg_json.name} is not beside it")
    seg = LungSegmenter(seg_json)
    if seg.sha256 != pre.segmenter_sha256:
        raise CheckpointError(f"{seg_json}: not the segmenter this model was trained with (SHA-256 differs)")
    return replace(pre, segmenter=seg)


def resolve_data(
    run: str | os.PathLike, meta: dict[str, Any], data: str | None = None, splits: str | None = None,
) -> tuple[str, str | None]:
    """``(data, splits)``: the given data, else the run's training data and split file (from ``meta``)."""
    if data is None:
        cfg = meta.get("train_config", {})
        data = cfg.get("data")
        if not data:
            raise DataError(f"{run}: the checkpoint does not say which data it was trained on; pass --data")
        if splits is None:
            folder = run_dir(run)
            splits = cfg.get("splits") or (str(folder / "splits.csv") if (folder / "splits.csv").is_file() else None)
    return str(data), splits


def model_files(path: str | os.PathLike) -> list[Path]:
    """Every file a model needs, beside its ``model.json``: weights, familiarity statistics, a refitted head's kept
    features, segmenter and gate, and the exported ONNX graphs with their contracts (`covidxray.export`) when there are any."""
    meta, p = read_model_meta(path)
    names = ["model.json", meta.get("weights_file", "model.safetensors")]
    if "familiarity" in meta:
        names.append(meta["familiarity"]["file"])
    if "features_file" in meta.get("head_refit", {}):  # what a site's own head is fitted on (`covidxray.headfit`)
        names.append(meta["head_refit"]["features_file"])
    seg = p.parent / "segmenter.json"
    if seg.is_file():
        seg_meta = json.loads(seg.read_text())
        names += ["segmenter.json", seg_meta["weights_file"]] + ([seg_meta["gate"]["weights_file"]] if "gate" in seg_meta else [])
    for contract in sorted(p.parent.glob("*.onnx.json")):
        entry = json.loads(contract.read_text()).get("segmenter_onnx")
        names += [contract.name, contract.name.removesuffix(".json")] + ([entry["file"]] if entry else [])
    return list(dict.fromkeys(p.parent / Path(n).name for n in names))


def copy_model(path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Copy a model (`model_files`) into ``folder``, e.g. to change its threshold without touching the original."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for f in model_files(path):
        atomic_write_bytes(folder / f.name, f.read_bytes())
    return folder


def run_dir(path: str | os.PathLike) -> Path:
    """The run folder of a run folder, ``model.json``, ``model.safetensors`` or ``model.onnx`` path."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def resolve_model_path(path: str | os.PathLike) -> Path:
    """Map a run directory, ``model.json`` or ``model.safetensors`` to the ``model.json`` path."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.json"
    elif p.suffix == ".safetensors":
        p = p.with_suffix(".json")
    if not p.is_file():
        raise CheckpointError(f"{p}: no model here (expected a run folder or model.json with model.safetensors beside it)")
    return p


def save_model(run_dir: str | os.PathLike, model: nn.Module, meta: dict[str, Any], stem: str = "model") -> Path:
    """Write ``<stem>.safetensors`` then ``<stem>.json`` atomically; returns the JSON path."""
    run_dir = Path(run_dir)
    blob = st_save(_tensors(model.state_dict()))
    meta = {**meta, "format": FORMAT, "weights_file": f"{stem}.safetensors", "weights_sha256": hashlib.sha256(blob).hexdigest()}
    text = json.dumps(meta, indent=2, allow_nan=False) + "\n"  # fails before anything is overwritten
    atomic_write_bytes(run_dir / f"{stem}.safetensors", blob)
    atomic_write_text(run_dir / f"{stem}.json", text)
    return run_dir / f"{stem}.json"


def read_model_meta(path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """Read and validate ``model.json``; returns ``(meta, json_path)``."""
    p = resolve_model_path(path)
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from e
    _validate(meta, p)
    return meta, p


def _validate(meta: Any, p: Path) -> None:
    """Raise `CheckpointError` naming ``p`` unless ``meta`` is a complete, sane model.json object."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p}: expected a JSON object")
    for key, typ in REQUIRED.items():
        if key not in meta:
            raise CheckpointError(f"{p}: missing field {key!r}")
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool):
            raise CheckpointError(f"{p}: field {key!r} has the wrong type ({type(meta[key]).__name__})")
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{p}: unsupported format {meta['format']!r} (this covidxray reads {FORMAT})")
    if not 0.0 <= meta["threshold"] <= 1.0:  # also false for NaN
        raise CheckpointError(f"{p}: field 'threshold' must be a probability in [0, 1], got {meta['threshold']}")
    if not meta["temperature"] > 0.0:
        raise CheckpointError(f"{p}: field 'temperature' must be positive, got {meta['temperature']}")
    if len(meta["class_names"]) != meta["num_classes"]:
        raise CheckpointError(f"{p}: {len(meta['class_names'])} class names for {meta['num_classes']} classes")
    name = meta.get("weights_file", "model.safetensors")
    # A bare file name only: a path could send the loader to /dev/zero, a pipe or another run's weights.
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        raise CheckpointError(f"{p}: field 'weights_file' must be the name of a file beside {p.name}, got {name!r}")
    _validate_preprocess(meta["preprocess"], p)


def _validate_preprocess(pre: dict[str, Any], p: Path) -> None:
    """Check the preprocessing contract field by field against `Preprocess`, so it fails on load, not mid-prediction."""
    hints = get_type_hints(Preprocess)
    del hints["segmenter"]  # attached at load time, never stored
    for key, value in pre.items():
        if key not in hints:
            raise CheckpointError(f"{p}: unknown preprocess field {key!r} (known: {', '.join(hints)})")
        want = (int, float) if hints[key] is float else hints[key]
        if not isinstance(value, want) or isinstance(value, bool) != (hints[key] is bool):
            raise CheckpointError(f"{p}: preprocess field {key!r} has the wrong type ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(f"{p}: preprocess field {key!r} must be finite, got {value}")
    try:
        pre_ = Preprocess(**pre)
    except ValueError as e:  # Preprocess's own range checks
        raise CheckpointError(f"{p}: preprocess: {e}") from e
    if not 8 <= pre_.size <= 4096:
        raise CheckpointError(f"{p}: preprocess: size must be between 8 and 4096 pixels, got {pre_.size}")
    if not pre_.std > 0:
        raise CheckpointError(f"{p}: preprocess: std must be positive, got {pre_.std}")


def update_model_meta(path: str | os.PathLike, changes: dict[str, Any]) -> dict[str, Any]:
    """Change fields of ``model.json`` (threshold, temperature, ...) in one atomic rewrite; weights stay as they are.

    The weights file must still match the JSON's ``weights_sha256`` (a mismatched pair is never
    re-stamped as valid), the fields that tie the JSON to the weights cannot be changed, and the
    result is validated like any loaded checkpoint before it replaces the old file.

    Args:
        path: run folder, ``model.json`` or ``model.safetensors``.
        changes: fields to set.

    Returns:
        The new metadata, as written.

    Raises:
        CheckpointError: the weights do not match, a protected field is in ``changes``, or the
            result would not be a valid checkpoint.
    """
    meta, p = read_model_meta(path)
    protected = sorted({"format", "weights_file", "weights_sha256", "arch", "num_classes"} & set(changes))
    if protected:
        raise CheckpointError(f"{p}: {', '.join(protected)} describe the weights and cannot be changed in place")
    read_verified(p.parent / meta.get("weights_file", "model.safetensors"), meta["weights_sha256"], "weights", p.name)
    new = {**meta, **changes}
    _validate(new, p)
    try:
        text = json.dumps(new, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{p}: the new fields are not valid JSON ({e})") from e
    atomic_write_text(p, text)
    return new


def load_model(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network described by ``model.json`` and load its safetensors weights (eval mode)."""
    meta, p = read_model_meta(path)
    wpath = p.parent / meta.get("weights_file", "model.safetensors")
    blob = read_verified(wpath, meta["weights_sha256"], "weights", p.name)
    try:
        sd = st_load(blob)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{wpath}: not a safetensors file ({e})") from e
    model = build_model(meta["arch"], in_chans=meta.get("in_chans", 1), num_classes=meta["num_classes"])
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:3]
        raise CheckpointError(f"{wpath}: weights do not fit architecture {meta['arch']!r}: {' '.join(first)}") from e
    return model.eval(), meta


def save_state(
    path: str | os.PathLike, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, header: dict[str, Any]
) -> None:
    """Write the resumable training state as one safetensors file.

    Args:
        modules: name -> module whose state is saved (e.g. ``{"model": net, "ema": averaged}``).
        header: JSON-able facts (epoch, scheduler state, history, config) stored in the metadata.
    """
    if "optim" in modules:
        raise ValueError("'optim' is reserved for the optimizer's tensors")
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    opt = optimizer.state_dict()
    plain: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                plain.setdefault(str(idx), {})[k] = v
    header = {**header, "optim_param_groups": opt["param_groups"], "optim_plain": plain}
    atomic_write_bytes(path, st_save(_tensors(tensors), metadata={"header": json.dumps(header, allow_nan=False)}))


def read_state_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of `save_state`'s file (epoch, config, history, ...), without reading any tensor."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})["header"])
    except (OSError, SafetensorError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a covidxray training state ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a covidxray training state (its header is not a JSON object)")
    return header


def load_state(path: str | os.PathLike, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore ``modules`` and the optimizer from `save_state`'s file in place; returns the JSON header."""
    path = Path(path)
    header = read_state_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: not a covidxray training state ({e})") from e
    for name, m in modules.items():
        prefix = f"{name}."
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not sd:
            raise CheckpointError(f"{path}: holds no state for {name!r}")
        try:
            m.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            first = " ".join(str(e).strip().splitlines()[:3])
            raise CheckpointError(f"{path}: the saved {name!r} does not fit the model: {first}") from e
    try:
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        for idx, st in header.pop("optim_plain").items():
            state.setdefault(int(idx), {}).update(st)
        optimizer.load_state_dict({"state": state, "param_groups": header.pop("optim_param_groups")})
    except (KeyError, ValueError, TypeError, AttributeError) as e:  # hand-edited or from another version
        raise CheckpointError(f"{path}: the saved optimizer state does not fit ({type(e).__name__}: {e})") from e
    return header
