"""Export a checkpoint to ONNX for fast CPU inference with ONNX Runtime, optionally quantised to int8.

``export_onnx(run, out)`` writes

* ``out``: the classifier, ``image`` ``(N, 1, S, S)`` float32 (already preprocessed) -> ``logits``
  ``(N, 2)`` and ``features`` ``(N, D)`` (the head's input, for the unfamiliarity score), dynamic batch;
* ``segmenter.onnx`` beside it when the model has a lung segmenter: ``image`` ``(N, 1, s, s)`` and
  ``extras`` ``(N, 2)`` -> ``lungs`` (P(lung) per pixel) and, with an input gate, ``gate`` (class
  probabilities); the input gate and the lung crop then run in ONNX Runtime too;
* ``out`` + ``.json`` (e.g. ``model.int8.onnx.json``): the contract, naming the ``model.json`` beside it
  and the weights it was exported from, and the ONNX files' SHA-256. Preprocessing, threshold and
  temperature are read from that ``model.json`` whichever backend runs, so recalibrating the model
  (``covidxray calibrate``) also recalibrates its ONNX graphs, and graphs exported from other
  weights are refused. The model's other files (weights, segmenter, familiarity) are copied beside
  ``out`` when it is another folder, so the folder is a complete model.

With ``int8`` the classifier is quantised statically (ONNX Runtime, QDQ, per-channel weights,
activations calibrated on training films through the one preprocessing), then checked against
PyTorch on the run's test split: ROC-AUC within `INT8_MAX_AUC_DROP` and at least
`INT8_MIN_AGREEMENT` of the decisions unchanged, or the export fails and says so (the float file
stays the one to use).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from .cache import readable_images
from .checkpoint import ONNX_FORMAT, contract_path, copy_model, load_model, read_model_meta, resolve_data
from .data import load_samples
from .errors import CheckpointError, DataError
from .models import get_spec
from .predictor import Predictor
from .segment import LungSegmenter
from .utils import atomic_write_bytes, atomic_write_text

__all__ = ["export_onnx", "classifier_onnx", "quantise", "calibration_inputs", "int8_parity", "INT8_MAX_AUC_DROP", "INT8_MIN_AGREEMENT"]

log = logging.getLogger(__name__)

INT8_MAX_AUC_DROP = 0.002
INT8_MIN_AGREEMENT = 0.99
SEGMENTER_ONNX = "segmenter.onnx"


class _WithFeatures(nn.Module):
    """The classifier returning ``(logits, features)``: its head replaced by identity, then applied."""

    def __init__(self, model: nn.Module, head_name: str):
        super().__init__()
        parent_name, _, child = head_name.rpartition(".")
        self.head = model.get_submodule(head_name)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
        self.body = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(x).flatten(1)
        return self.head(feats), feats


def _onnx_bytes(module: nn.Module, args: tuple, inputs: list[str], outputs: list[str], opset: int) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices are not for users
        torch.onnx.export(module.eval(), args, buf, input_names=inputs, output_names=outputs, opset_version=opset,
                          dynamic_axes={n: {0: "batch"} for n in inputs + outputs}, dynamo=False)
    return buf.getvalue()


def classifier_onnx(model: nn.Module, meta: dict[str, Any], opset: int = 17) -> bytes:
    """The classifier of checkpoint ``meta`` as ONNX bytes: ``image`` in, ``logits`` and ``features`` out (batch dynamic).

    The graph is float; `quantise` makes the int8 one. ``model`` is consumed (its head is swapped for identity).
    """
    size = meta["preprocess"]["size"]
    return _onnx_bytes(_WithFeatures(model, get_spec(meta["arch"]).head), (torch.zeros(1, 1, size, size),),
                       ["image"], ["logits", "features"], opset)


def export_onnx(run: str | os.PathLike, out: str | os.PathLike, opset: int = 17, int8: bool = False,
                calibration_images: int = 300) -> Path:
    """Export the model in ``run`` to ONNX at ``out`` (+ ``.json`` contract, + ``segmenter.onnx``); returns ``out``."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise CheckpointError(f"{out}: the ONNX file name must end in .onnx")
    model, meta = load_model(run)
    _, json_path = read_model_meta(run)
    if out.parent.resolve() != json_path.parent.resolve():
        copy_model(run, out.parent)  # a complete model folder: weights (Grad-CAM), segmenter, familiarity
    blob = classifier_onnx(model, meta, opset)
    contract: dict[str, Any] = {"format": ONNX_FORMAT, "model": "model.json", "weights_sha256": meta["weights_sha256"],
                                "onnx_file": out.name, "onnx_opset": opset,
                                "onnx_io": "image: (N, 1, S, S) float32 = (Preprocess.prepare(x) / 255 - mean) / std; "
                                           "logits: (N, 2) over class_names; P(covid) = softmax(logits / temperature)[:, 1]; "
                                           "features: (N, D) the head's input (unfamiliarity)"}
    seg_json = json_path.parent / "segmenter.json"
    if seg_json.is_file():
        contract["segmenter_onnx"] = _export_segmenter(LungSegmenter(seg_json), out.parent / SEGMENTER_ONNX, opset)
    if int8:
        blob, contract["int8"] = _quantise(blob, run, meta, calibration_images)
    contract["onnx_sha256"] = hashlib.sha256(blob).hexdigest()
    text = json.dumps(contract, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(out, blob)
    atomic_write_text(contract_path(out), text)
    log.info("exported %s to %s (%.1f MB%s)", run, out, len(blob) / 2**20, ", int8" if int8 else "")
    return out


def _export_segmenter(seg: LungSegmenter, path: Path, opset: int) -> dict[str, str]:
    s = seg.size
    outputs = ["lungs", "gate"] if seg.gate is not None else ["lungs"]
    blob = _onnx_bytes(seg.graph, (torch.zeros(1, 1, s, s), torch.zeros(1, 2)), ["image", "extras"], outputs, opset)
    atomic_write_bytes(path, blob)
    return {"file": path.name, "sha256": hashlib.sha256(blob).hexdigest(), "segmenter_sha256": seg.sha256}


def _quantise(blob: bytes, run: str | os.PathLike, meta: dict[str, Any], n_calibration: int) -> tuple[bytes, dict[str, Any]]:
    """Static QDQ int8 with per-channel weights, calibrated on training films; refuses a model that drifts."""
    predictor = Predictor(run, backend="torch", gate=False)
    samples = load_samples(*resolve_data(run, meta))
    x = calibration_inputs(predictor, samples, n_calibration)
    # Symmetric int8 activations: with asymmetric uint8 ones, 3 % of the bundled model's test decisions
    # flipped; symmetric ones kept 99.2 % (the bundled model's test split, same calibration films).
    quantised = quantise(blob, x, activation_type="QInt8", extra_options={"ActivationSymmetric": True})
    parity = int8_parity(predictor, quantised, samples)
    if parity["roc_auc_drop"] > INT8_MAX_AUC_DROP or parity["agreement"] < INT8_MIN_AGREEMENT:
        raise CheckpointError(
            f"int8 quantisation changed the model too much on the test split (ROC-AUC {parity['roc_auc_torch']:.4f} -> "
            f"{parity['roc_auc_int8']:.4f}, {parity['agreement']:.2%} of decisions unchanged; limits "
            f"{INT8_MAX_AUC_DROP} and {INT8_MIN_AGREEMENT:.0%}): use the float ONNX file (export without --int8)")
    return quantised, {**parity, "calibration_images": len(x), "format": "QDQ, per-channel int8 weights, symmetric int8 activations"}


def calibration_inputs(predictor: Predictor, samples: list, n: int) -> np.ndarray:
    """Network inputs ``(n, 1, S, S)`` of ``n`` training films (a fixed random pick) for int8 calibration."""
    train = [s for s in samples if s.split == "train"]
    picks = [train[i] for i in np.random.default_rng(0).permutation(len(train))[:n]]
    _, images, _ = readable_images(picks, predictor.preprocess, desc="int8 calibration")
    return predictor.preprocess.to_tensor(images).numpy()


def quantise(blob: bytes, x: np.ndarray, activation_type: str = "QInt8", calibrate_method: str = "MinMax",
             **options: Any) -> bytes:
    """The classifier graph ``blob`` quantised statically (QDQ, per-channel int8 weights) with activations
    calibrated on ``x``; ``activation_type`` and ``calibrate_method`` name ONNX Runtime's enums, ``options``
    go to ``quantize_static`` as they are (e.g. ``extra_options``, ``nodes_to_exclude``)."""
    import onnxruntime as ort  # the int8 path only
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    ort.set_default_logger_severity(3)  # the quantiser's per-initializer notices are not for users

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": x[i:i + 16]} for i in range(0, len(x), 16)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(blob)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType[activation_type], weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod[calibrate_method], **options)
        return dst.read_bytes()


def int8_parity(predictor: Predictor, quantised: bytes, samples: list) -> dict[str, Any]:
    """PyTorch vs the int8 graph on the run's test split: ROC-AUC of each and the share of equal decisions."""
    import onnxruntime as ort  # the int8 path only

    test = [s for s in samples if s.split == "test"]
    if not test:
        raise DataError("the int8 check needs the run's test split; it has none")
    test, images, _ = readable_images(test, predictor.preprocess, desc="int8 check")
    y = np.array([s.label for s in test])
    p_torch = predictor.predict_prepared(images)
    session = ort.InferenceSession(quantised, providers=["CPUExecutionProvider"])
    x = predictor.preprocess.to_tensor(images).numpy()
    logits = np.concatenate([session.run(["logits"], {"image": x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    p_int8 = torch.softmax(torch.from_numpy(logits) / predictor.temperature, dim=1)[:, 1].numpy()
    auc_torch, auc_int8 = float(roc_auc_score(y, p_torch)), float(roc_auc_score(y, p_int8))
    t = predictor.threshold
    return {"test_images": len(y), "roc_auc_torch": auc_torch, "roc_auc_int8": auc_int8,
            "roc_auc_drop": auc_torch - auc_int8, "agreement": float(((p_torch >= t) == (p_int8 >= t)).mean())}
