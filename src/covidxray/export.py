"""Export a checkpoint to ONNX for fast CPU inference with ONNX Runtime.

``export_onnx(run, out)`` writes ``out`` (graph: ``image`` ``(N, 1, S, S)`` float32, already
preprocessed, -> ``logits`` ``(N, 2)``, dynamic batch) and ``out`` with suffix ``.json``: the
checkpoint's JSON plus the ONNX file's SHA-256, so the same `Preprocess` (the one definition of
preprocessing) and threshold are used whichever backend runs the model.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch

from .checkpoint import load_model
from .errors import CheckpointError
from .utils import atomic_write_bytes, atomic_write_text

__all__ = ["export_onnx"]

log = logging.getLogger(__name__)


def export_onnx(run: str | os.PathLike, out: str | os.PathLike, opset: int = 17) -> Path:
    """Export the model in ``run`` to ONNX at ``out`` (+ ``.json`` contract beside it); returns ``out``."""
    model, meta = load_model(run)
    size = meta["preprocess"]["size"]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices are not for users
        torch.onnx.export(
            model.eval(), (torch.zeros(1, 1, size, size),), buf, input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset, dynamo=False,
        )
    blob = buf.getvalue()
    out = Path(out)
    if out.suffix != ".onnx":
        raise CheckpointError(f"{out}: the ONNX file name must end in .onnx")
    contract = {
        **meta, "onnx_file": out.name, "onnx_sha256": hashlib.sha256(blob).hexdigest(), "onnx_opset": opset,
        "onnx_io": "image: (N, 1, S, S) float32 = (Preprocess.prepare(x) / 255 - mean) / std; "
                   "logits: (N, 2) over class_names; P(covid) = softmax(logits / temperature)[:, 1]",
    }
    text = json.dumps(contract, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(out, blob)
    atomic_write_text(out.with_suffix(".json"), text)
    log.info("exported %s to %s (%.1f MB)", run, out, len(blob) / 2**20)
    return out
