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

The classifier and segmenter graphs have their TensorFlow-'SAME' padding fixed at their input sizes (a
constant inside each convolution, not Shape/Ceil/Pad nodes at run time): same numbers, the int8 graph
then runs every convolution in ONNX Runtime's int8 kernels, and the float segmenter runs 1.3x faster.

With ``int8`` the classifier is quantised statically (ONNX Runtime, QDQ, per-channel int8 weights,
asymmetric uint8 activations calibrated on training films of every source and label through the
one preprocessing, biases corrected for the mean error of the rounded weights: `bias_corrected`),
then checked against PyTorch on the run's test split and on the validation films of each source:
ROC-AUC within `INT8_MAX_AUC_DROP` and at least `INT8_MIN_AGREEMENT` of the decisions unchanged on
each, or the export fails and says so (the float file stays the one to use). The int8 graph is served with a
float re-check (`covidxray.backends.CascadeRunner`): a film whose int8 P(covid) lies within a band of a threshold
in play is scored again by the float graph, written beside it as ``model.onnx``. The export takes the narrowest
band of `RECHECK_BANDS` at which these checks, made on the cascade's probabilities, hold, and records it with
the share of films re-checked; none holding, it refuses, naming the sources.
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
from torch import nn

from .cache import readable_images
from .checkpoint import ONNX_FORMAT, contract_path, copy_model, load_model, read_model_meta, resolve_data
from .data import load_samples
from .errors import CheckpointError
from .int8_check import FLOAT_ONNX, INT8_MAX_AUC_DROP, INT8_MIN_AGREEMENT, RECHECK_BANDS, failures, int8_parity
from .models import get_spec
from .predictor import Predictor
from .segment import LungSegmenter
from .utils import atomic_write_bytes, atomic_write_text

__all__ = ["export_onnx", "classifier_onnx", "quantise", "calibration_inputs", "int8_parity", "INT8_MAX_AUC_DROP", "INT8_MIN_AGREEMENT",
           "RECHECK_BANDS"]

log = logging.getLogger(__name__)

INT8_FLOAT_CONVOLUTIONS = 3  # the first convolutions (EfficientNet-Lite0: stem and first block) stay float in int8
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


class _StaticPad(nn.Module):
    """A convolution behind a fixed zero padding: a TensorFlow-'SAME' convolution (timm's ``Conv2dSame``) at one input size."""

    def __init__(self, conv: nn.Conv2d, pads: tuple[int, int, int, int]):
        super().__init__()
        self.conv, self.pads = conv, pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(nn.functional.pad(x, self.pads))


def _fix_same_padding(model: nn.Module, *example: torch.Tensor) -> None:
    """Replace each 'SAME'-padded convolution of ``model`` by its padding at the ``example`` inputs' size and a plain
    convolution.

    timm's ``Conv2dSame`` computes its padding from the input's shape at run time, which the ONNX graph
    then does with Shape/Gather/Ceil/Pad nodes before every strided convolution; those stop ONNX Runtime
    fusing the int8 convolutions around them (measured: int8 no faster than float), and keep even the float
    segmenter out of ONNX Runtime's blocked layout around each Pad (measured: 24 % of its time). The graphs' input
    sizes are fixed, so the padding is a constant that `_fold_pads` moves into the convolution. Same numbers.
    """
    shapes: dict[str, tuple[int, int]] = {}
    same = {name: m for name, m in model.named_modules() if type(m).__name__ == "Conv2dSame"}
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=name: shapes.__setitem__(n, tuple(args[0].shape[-2:])))
             for name, m in same.items()]
    with torch.no_grad():
        model.eval()(*example)
    for h in hooks:
        h.remove()
    for name, m in same.items():
        conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, 0, m.dilation, m.groups, m.bias is not None)
        conv.load_state_dict(m.state_dict())
        pad = [max((-(-i // s) - 1) * s + (k - 1) * d + 1 - i, 0)
               for i, k, s, d in zip(shapes[name], m.kernel_size, m.stride, m.dilation)]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                _StaticPad(conv, (pad[1] // 2, pad[1] - pad[1] // 2, pad[0] // 2, pad[0] - pad[0] // 2)))


def _constant_folded(blob: bytes) -> bytes:
    """The graph after ONNX Runtime's basic, hardware-independent passes (constant folding, dead nodes): plain ONNX."""
    import onnxruntime as ort  # heavy; export only

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
        ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])
        return Path(opts.optimized_model_filepath).read_bytes()


def _fold_pads(blob: bytes) -> bytes:
    """The graph, constant-folded, with each zero Pad that feeds only a Conv folded into that Conv's ``pads``."""
    import onnx  # the exporter's own dependency
    from onnx import helper, numpy_helper

    graph = (model := onnx.load_from_string(_constant_folded(blob))).graph
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    consts.update({t.name: numpy_helper.to_array(t) for t in graph.initializer})
    users: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        amounts, value = consts.get(pad.input[1]), consts.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else 0
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        after = users.get(pad.output[0], [])
        if amounts is None or mode != b"constant" or np.any(value != 0) or len(after) != 1 or after[0].op_type != "Conv":
            continue
        n = len(amounts) // 2
        if np.any(amounts[:2]) or np.any(amounts[n:n + 2]):
            continue  # pads the batch or channel axis: not a convolution's padding
        conv = after[0]
        old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0] * (2 * (n - 2)))
        new = [int(p) + int(q) for p, q in zip(old, list(amounts[2:n]) + list(amounts[n + 2:]))]
        kept = [a for a in conv.attribute if a.name not in ("pads", "auto_pad")]
        del conv.attribute[:]
        conv.attribute.extend(kept + [helper.make_attribute("pads", new)])
        conv.input[0] = pad.input[0]
        graph.node.remove(pad)
    used = {i for n in graph.node for i in n.input}  # the folded pads' amounts: else ONNX Runtime warns at every load
    for unused in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(unused)
    return onnx.shape_inference.infer_shapes(model).SerializeToString()


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
    _fix_same_padding(model, torch.zeros(1, 1, size, size))  # one grey channel
    return _fold_pads(_onnx_bytes(_WithFeatures(model, get_spec(meta["arch"]).head), (torch.zeros(1, 1, size, size),),
                                  ["image"], ["logits", "features"], opset))


def export_onnx(run: str | os.PathLike, out: str | os.PathLike, opset: int = 17, int8: bool = False,
                calibration_images: int = 300, min_band: float = 0.0) -> Path:
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
        if out.name == FLOAT_ONNX:
            raise CheckpointError(f"{out}: name the int8 graph otherwise (model.int8.onnx); its float graph, which "
                                  f"re-checks films near the threshold, is written beside it as {FLOAT_ONNX}")
        quantised, contract["int8"] = _quantise(run, meta, calibration_images, opset, blob, min_band)
        _write_graph(out.with_name(FLOAT_ONNX), blob, {**contract, "onnx_file": FLOAT_ONNX, "int8": None})
        blob = quantised
    _write_graph(out, blob, contract)
    if not int8:
        _drop_stale_int8(out, hashlib.sha256(blob).hexdigest(), contract.get("segmenter_onnx"))
    log.info("exported %s to %s (%.1f MB%s)", run, out, len(blob) / 2**20, ", int8" if int8 else "")
    return out


def _drop_stale_int8(out: Path, float_sha256: str, segmenter: dict[str, str] | None) -> None:
    """Remove the int8 graphs beside ``out`` that a new float export left unusable.

    An int8 graph re-checks films with the float graph its contract names, and shares the segmenter graph, both by
    hash. Export is not byte-reproducible across library versions, so exporting ``out`` again (or a model copied
    with its int8 graph) would leave a folder that refuses to load; the stale graph goes, and ``--int8`` remakes it.
    """
    for path in sorted(out.parent.glob("*.onnx.json")):
        try:
            theirs = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        recheck = (theirs.get("int8") or {}).get("recheck") or {}
        stale_float = recheck.get("float_onnx") == out.name and recheck.get("float_onnx_sha256") != float_sha256
        stale_seg = segmenter is not None and (theirs.get("segmenter_onnx") or {}).get("sha256") != segmenter["sha256"]
        if theirs.get("int8") and (stale_float or stale_seg):
            graph = path.with_name(theirs.get("onnx_file", path.name[: -len(".json")]))
            path.unlink()  # the contract first: a graph without one is never loaded
            graph.unlink(missing_ok=True)
            log.warning("removed %s: its float re-check or segmenter graph was exported again (export --int8 makes "
                        "it anew)", graph)


def _write_graph(path: Path, blob: bytes, contract: dict[str, Any]) -> None:
    """``blob`` at ``path`` and its contract (``contract`` with the blob's hash; a None entry left out) beside it."""
    contract = {k: v for k, v in contract.items() if v is not None} | {"onnx_sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write_bytes(path, blob)
    atomic_write_text(contract_path(path), json.dumps(contract, indent=2, allow_nan=False) + "\n")


def _export_segmenter(seg: LungSegmenter, path: Path, opset: int) -> dict[str, str]:
    example = (torch.zeros(1, 1, seg.size, seg.size), torch.zeros(1, 2))
    outputs = ["lungs", "gate"] if seg.gate is not None else ["lungs"]
    _fix_same_padding(graph := seg.graph, *example)
    blob = _fold_pads(_onnx_bytes(graph, example, ["image", "extras"], outputs, opset))
    atomic_write_bytes(path, blob)
    return {"file": path.name, "sha256": hashlib.sha256(blob).hexdigest(), "segmenter_sha256": seg.sha256}


def _quantise(run: str | os.PathLike, meta: dict[str, Any], n_calibration: int, opset: int,
              float_graph: bytes, min_band: float = 0.0) -> tuple[bytes, dict[str, Any]]:
    """Static QDQ int8 with per-channel weights, calibrated on training films; refuses a model that drifts even with
    the float re-check (of ``float_graph``) at the widest band."""
    predictor = Predictor(run, backend="torch", gate=False)
    samples = load_samples(*resolve_data(run, meta))
    x = calibration_inputs(predictor, samples, n_calibration)
    blob = classifier_onnx(bias_corrected(load_model(run)[0], x, INT8_FLOAT_CONVOLUTIONS), meta, opset)
    # Asymmetric uint8 activations: ONNX Runtime drops the ReLU6 into the convolution and fuses every
    # convolution and residual sum into its int8 kernels (bundled model, batch 32: 2.3x float; symmetric
    # int8 activations keep a Q/DQ pair around each ReLU6 and about a third of the convolutions in float:
    # 1.1x). Before `_fix_same_padding` the asymmetric graph padded with the wrong zero (7 % flipped).
    # The stem and first block (the first three convolutions) stay float: bundled model, bias-corrected
    # MinMax, 300 films: test 98.74 -> 99.46 % of decisions kept, every origin's validation films pooled
    # 97.16 -> 98.26 %, still 2.3x float (bench/int8_variants.py); keeping 6 or 9 float kept fewer.
    quantised = quantise(blob, x, activation_type="QUInt8", nodes_to_exclude=_convolutions(blob)[:INT8_FLOAT_CONVOLUTIONS])
    parity = int8_parity(predictor, quantised, samples, float_graph, min_band)
    if failed := failures({"test split": parity, **parity["val_sources"]}):
        raise CheckpointError(
            f"int8 quantisation changed the model too much on the {', '.join(failed)}, even with films within "
            f"{parity['recheck']['band']} of the threshold scored again in float (test ROC-AUC "
            f"{parity['roc_auc_torch']:.4f} -> {parity['roc_auc_int8']:.4f}, {parity['agreement']:.2%} of decisions "
            f"unchanged; {_val_summary(parity)}; limits {INT8_MAX_AUC_DROP} and {INT8_MIN_AGREEMENT:.0%} on each): "
            "use the float ONNX file (export without --int8)")
    return quantised, {**parity, "calibration_images": len(x),
                       "format": "QDQ, per-channel int8 weights, asymmetric uint8 activations (MinMax), biases "
                                 "corrected for the rounded weights, the first three convolutions float"}


def bias_corrected(model: nn.Module, x: np.ndarray, float_layers: int = 0) -> nn.Module:
    """``model`` (changed in place) with each convolution's and linear layer's bias shifted by the mean error that
    rounding its weights to per-channel int8 adds to its outputs, over the calibration inputs ``x``; the first
    ``float_layers`` of them (in model order), which stay float in the int8 graph, are left as they are.

    Empirical bias correction (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
    Correction", ICCV 2019): the rounding error of a layer's weights has a non-zero mean over its inputs, which
    then shifts every later layer. The weights stay float here (ONNX Runtime rounds them as simulated: symmetric,
    per output channel, -127..127); only the graph handed to the quantiser gets the corrected biases. Bundled
    model, weights rounded in PyTorch: 42 -> 19 of 447 near-threshold decisions flipped.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))][float_layers:]
    sums: dict[int, torch.Tensor] = {}

    def record(k: int, inputs: tuple) -> None:
        a = inputs[0].detach().double()
        sums[k] = sums.get(k, 0) + (a.sum(dim=(0, 2, 3)) / a[0, 0].numel() if a.dim() == 4 else a.sum(dim=0))

    hooks = [m.register_forward_pre_hook(lambda _m, i, k=k: record(k, i)) for k, m in enumerate(layers)]
    with torch.no_grad():
        model.eval()
        for i in range(0, len(x), 50):
            model(torch.from_numpy(x[i:i + 50]))
        for h in hooks:
            h.remove()
        for k, m in enumerate(layers):
            mean_in = (sums[k] / len(x)).float()
            scale = m.weight.abs().flatten(1).amax(1).clamp_min(1e-12) / 127
            shape = (-1,) + (1,) * (m.weight.dim() - 1)
            error = torch.round(m.weight / scale.view(shape)).clamp(-127, 127) * scale.view(shape) - m.weight
            if isinstance(m, nn.Linear):
                shift = error @ mean_in
            else:  # a constant input through the error kernel: its mean effect, borders aside
                shift = nn.functional.conv2d(mean_in.view(1, -1, 1, 1).expand(1, -1, *m.kernel_size), error, groups=m.groups).flatten()
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros_like(shift))
            m.bias -= shift
    return model


def _convolutions(blob: bytes) -> list[str]:
    """The names of the graph's Conv nodes, in graph order (input first)."""
    import onnx  # the exporter's own dependency

    return [n.name for n in onnx.load_from_string(blob).graph.node if n.op_type == "Conv"]


def _val_summary(parity: dict[str, Any]) -> str:
    return "validation " + ", ".join(
        f"{k} {r['agreement']:.2%}" + ("" if r["roc_auc_drop"] is None else f" (ROC-AUC drop {r['roc_auc_drop']:+.4f})")
        for k, r in parity["val_sources"].items())


def calibration_inputs(predictor: Predictor, samples: list, n: int) -> np.ndarray:
    """Network inputs ``(n, 1, S, S)`` of ``n`` training films for int8 calibration: a fixed random pick, taken
    round-robin over every (source, label) group so that a small collection's films set ranges too."""
    groups: dict[tuple[str, int], list] = {}
    for s in (s for s in samples if s.split == "train"):
        groups.setdefault((s.source, s.label), []).append(s)
    rng = np.random.default_rng(0)
    queues = [[g[i] for i in rng.permutation(len(g))] for _, g in sorted(groups.items())]
    picks = [q[k] for k in range(max(map(len, queues), default=0)) for q in queues if k < len(q)][:n]
    _, images, _ = readable_images(picks, predictor.preprocess, desc="int8 calibration")
    return predictor.preprocess.to_tensor(images).numpy()


def quantise(blob: bytes, x: np.ndarray | dict[str, np.ndarray], activation_type: str = "QUInt8",
             calibrate_method: str = "MinMax", **options: Any) -> bytes:
    """The graph ``blob`` quantised statically (QDQ, per-channel int8 weights) with activations calibrated on ``x``
    (the classifier's ``image`` input, or every input of another graph by name); ``activation_type`` and
    ``calibrate_method`` name ONNX Runtime's enums, ``options`` go to ``quantize_static`` as they are (e.g.
    ``extra_options``, ``nodes_to_exclude``)."""
    import onnxruntime as ort  # the int8 path only
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    ort.set_default_logger_severity(3)  # the quantiser's per-initializer notices are not for users

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            # equal batches: the histogram calibrators (Percentile, Entropy) stack them
            feeds = x if isinstance(x, dict) else {"image": x}
            n = len(next(iter(feeds.values())))
            step = max(d for d in range(1, 17) if n % d == 0)
            self.batches = iter([{k: v[i:i + step] for k, v in feeds.items()} for i in range(0, n, step)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(blob)
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType[activation_type], weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod[calibrate_method], **options)
        return dst.read_bytes()
