"""Grad-CAM heat maps: where in the X-ray the network looked for COVID-19.

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017) weights each channel of a late convolutional feature map by the mean
gradient of the class score over that channel and keeps the positive part of the sum:

    cam = relu(sum_c w_c * A_c),    w_c = mean_{i,j} d score / d A_c[i, j]

The layer comes from the model registry (`ModelSpec.cam_layer`), never from a guess. A map shows
what drives the score, not that the finding is real: a network that learned hospital markers
lights up the markers (which is exactly why the map is worth looking at).

Example:
    >>> from covidxray.predictor import Predictor
    >>> from covidxray.imaging import load_image
    >>> image = load_image("chest.png")
    >>> prob, cam = explain(Predictor(backend="torch"), image)   # cam: H x W in [0, 1]
    >>> png = overlay_png(image, cam, title=f"P(covid)={prob:.2f}")
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from .errors import CheckpointError, ImageError
from .gate import Verdict
from .imaging import read_image
from .inference import autocast
from .models import get_spec
from .predictor import Prediction, Predictor
from .presets import box_pixels
from .utils import atomic_write_bytes, unique_stem

__all__ = ["grad_cam", "explain", "overlay_png", "explain_files", "Explained"]

log = logging.getLogger(__name__)

COVID = 1  # class index of COVID-19, the positive class


@dataclass(frozen=True)
class Explained:
    """One explained image: the answer, and the files `explain_files` wrote for it."""

    prediction: Prediction
    overlay: Path  # the captioned Grad-CAM overlay PNG
    npy: Path  # the float32 map at the image's size


def grad_cam(model: nn.Module, x: torch.Tensor, layer: str, class_index: int = COVID) -> torch.Tensor:
    """Grad-CAM maps of ``class_index`` for a batch, at the input's size.

    The model runs in eval mode (BatchNorm on running statistics, no dropout); afterwards every
    module's train/eval flag is what it was, the hook is removed (also when the forward raises),
    parameters keep their ``requires_grad`` flags and no ``.grad`` is written, so this is safe on
    a model in the middle of training or with frozen layers.

    Args:
        model: a classifier returning logits ``(N, num_classes)``.
        x: normalised input ``(N, 1, S, S)`` (any memory format).
        layer: dotted name of the module whose output (a 4-D tensor) is explained, e.g.
            ``get_spec(arch).cam_layer``.
        class_index: the logit to explain; 1 is COVID-19.

    Returns:
        float32 maps ``(N, S, S)`` on ``x``'s device, each scaled to [0, 1] by its maximum
        (a map with no positive evidence stays all zero), bilinearly upsampled to the input size.

    Raises:
        ValueError: ``layer`` is not a submodule of ``model``.
        TypeError: ``layer``'s output is not a 4-D tensor.

    Examples:
        >>> from covidxray.models import build_model
        >>> grad_cam(build_model("cxrnet"), torch.zeros(2, 1, 64, 64), "features").shape
        torch.Size([2, 64, 64])
    """
    cams, _ = _cam_and_logits(model, x, layer, class_index)
    return _resize_normalise(cams, tuple(x.shape[-2:]))


def explain(predictor: Predictor, image: np.ndarray) -> tuple[float, np.ndarray]:
    """P(covid) and the COVID-19 Grad-CAM map of one decoded X-ray, from one forward pass.

    The image goes through the predictor's own preprocessing (the input gate is not consulted:
    this explains the classifier), so the probability equals ``predictor.predict_array(image)
    .probability`` for an image the gate lets through; the map is stretched back from the square
    network input onto the part of the image it came from (all of it, or the lung box when the
    model crops to the lungs), and is zero elsewhere.

    Args:
        predictor: a `Predictor` with the torch backend (ONNX has no gradients).
        image: decoded grayscale image, float in [0, 1], ``H x W`` (see `load_image`).

    Returns:
        ``(probability, cam)`` with ``cam`` float32 ``H x W`` in [0, 1].

    Raises:
        CheckpointError: the predictor runs an ONNX model.
    """
    if predictor.model is None:
        raise CheckpointError("Grad-CAM needs the PyTorch model; load the predictor with backend='torch'")
    pre = predictor.preprocess
    prepared, box = pre.prepare_with_box(image)
    x = pre.to_tensor(torch.from_numpy(prepared)[None]).to(predictor.device)
    x = x.contiguous(memory_format=torch.channels_last)  # as `predict_probs` feeds the model
    layer = get_spec(predictor.meta["arch"]).cam_layer
    with autocast(predictor.device):  # the same precision as `predict_probs`, so the probabilities agree
        cams, logits = _cam_and_logits(predictor.model, x, layer, COVID)
    prob = float(torch.softmax(logits.float() / predictor.temperature, dim=1)[0, COVID])
    rows, cols = box_pixels(box, image.shape)
    cam = np.zeros(image.shape[:2], dtype=np.float32)
    # Straight from the coarse grid to the box's pixels: one interpolation, not two.
    cam[rows, cols] = _resize_normalise(cams, (rows.stop - rows.start, cols.stop - cols.start))[0].cpu().numpy()
    return prob, cam


def overlay_png(image: np.ndarray, cam: np.ndarray, title: str | None = None, alpha: float = 0.4) -> bytes:
    """The X-ray in grey under a semi-transparent 'jet' heat map, as PNG bytes of the image's size.

    Args:
        image: grayscale image, float in [0, 1], ``H x W``.
        cam: map of the same shape, values in [0, 1] (see `explain`).
        title: optional caption, drawn in a dark bar across the top of the image (the size stays).
        alpha: opacity of the heat map.

    Returns:
        PNG-encoded RGB image, ``W x H`` pixels.

    Raises:
        ValueError: ``cam`` and ``image`` differ in shape.
    """
    if image.shape != cam.shape or image.ndim != 2:
        raise ValueError(f"overlay needs a 2-D image and a map of the same shape, got {image.shape} and {cam.shape}")
    # matplotlib is heavy (0.4 s and 17 MB to import here) and only its colormap is used, only here: the
    # server and the DICOM node load it with their first heat map, not at start-up (no pyplot, no figure state).
    import matplotlib

    to_u8 = lambda a: (np.clip(np.nan_to_num(a), 0, 1) * 255).round().astype(np.uint8)  # noqa: E731
    grey = Image.fromarray(to_u8(image)).convert("RGB")
    heat = Image.fromarray(matplotlib.colormaps["jet"](to_u8(cam), bytes=True)[..., :3])  # uint8 in: 256-entry lookup
    out = Image.blend(grey, heat, alpha)
    if title:
        _caption(out, title)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def explain_files(
    predictor: Predictor, paths: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
) -> Iterator[Explained | Prediction | ImageError]:
    """Write a Grad-CAM overlay and raw map for each image file; unreadable files are reported, not fatal.

    For ``chest.png`` this writes ``out_dir/chest_gradcam.png`` (the overlay, captioned with the
    answer) and ``out_dir/chest_gradcam.npy`` (the float32 map at the image's size), both atomically.
    When two inputs share a stem, later ones get ``_2``, ``_3``, ... so no output is overwritten.

    Args:
        predictor: a `Predictor` with the torch backend.
        paths: image files (PNG, JPEG, DICOM, ...).
        out_dir: output folder, created if missing.

    Yields:
        One result per input, in order (like `Predictor.predict_paths`): an `Explained`; the
        `Prediction` alone (``not_answered``) when the input gate refuses the image; or the
        `ImageError` of a file that could not be read.
    """
    out = Path(out_dir)
    used: set[str] = set()
    for path in paths:
        try:
            image, info = read_image(path)
        except ImageError as e:
            log.warning("%s", e)
            yield e
            continue
        checked = predictor.check(image, info)
        if isinstance(checked, Verdict):  # nothing to explain: the classifier would not answer it
            yield predictor.refuse(str(path), checked)
            continue
        prob, cam = explain(predictor, image)
        answer = predictor.decide(str(path), prob)
        stem = unique_stem(Path(path).stem, used)
        png, npy = out / f"{stem}_gradcam.png", out / f"{stem}_gradcam.npy"
        title = f"{Path(path).name}: P(covid)={prob:.3f} -> {answer.label} (threshold {answer.threshold:.3f})"
        atomic_write_bytes(png, overlay_png(image, cam, title))
        buf = io.BytesIO()
        np.save(buf, cam)
        atomic_write_bytes(npy, buf.getvalue())
        log.info("%s: P(covid)=%.3f, Grad-CAM written to %s", path, prob, png)
        yield Explained(answer, png, npy)


def _cam_and_logits(model: nn.Module, x: torch.Tensor, layer: str, class_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled maps ``(N, h, w)`` at the layer's resolution and the logits, from one forward pass."""
    try:
        target = model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no layer {layer!r} for Grad-CAM; take it from get_spec(arch).cam_layer") from None
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured.append(output)

    # Per module, not model.train(was): a training model may hold frozen BatchNorm layers in eval mode.
    modes = {m: m.training for m in model.modules()}
    handle = target.register_forward_hook(keep)
    try:
        model.eval()
        # The input requires grad so a graph exists even when every parameter is frozen; the
        # parameters' flags are never touched.
        with torch.enable_grad():
            logits = model(x.detach().requires_grad_(True))
            if not captured or not isinstance(captured[-1], torch.Tensor) or captured[-1].ndim != 4:
                raise TypeError(f"layer {layer!r} did not run or did not output one 4-D feature map; Grad-CAM needs one")
            acts = captured[-1]
            # autograd.grad rather than backward(): no .grad lands on the parameters, so a training
            # step's gradients are not polluted. If the model modifies the map in place afterwards
            # (DenseNet's F.relu(features, inplace=True)), `acts` is that final map and the gradient
            # is taken with respect to it: still the last feature map the classifier sees.
            grads, = torch.autograd.grad(logits[:, class_index].sum(), acts)
    finally:
        handle.remove()
        for m, training in modes.items():
            m.training = training
    acts, grads = acts.detach().float(), grads.float()
    weights = grads.mean(dim=(2, 3), keepdim=True)  # samples are independent in eval mode, so the summed score is fine
    return F.relu((weights * acts).sum(dim=1)), logits.detach()


def _resize_normalise(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(N, h, w)`` -> ``(N, *size)`` float32, bilinear, each map divided by its maximum."""
    cams = F.interpolate(cams[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    cams = torch.nan_to_num(cams.clamp_min(0), nan=0.0, posinf=0.0)
    peak = cams.amax(dim=(1, 2), keepdim=True)
    # An all-zero map (no positive evidence) stays zero instead of becoming 0/0.
    return torch.where(peak > 0, cams / peak.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(cams)).contiguous()


def _caption(img: Image.Image, title: str) -> None:
    """Draw ``title`` in white on a dark bar across the top of ``img`` (in place)."""
    w, h = img.size
    bar = max(12, h // 24)
    try:
        font = ImageFont.load_default(size=int(bar * 0.75))
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, w, bar), fill=(0, 0, 0))
    draw.text((bar // 4, bar // 8), title, fill=(255, 255, 255), font=font)
