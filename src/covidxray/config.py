"""Configuration: `TrainConfig`, the named `RECIPES` and `config_for`; `settings`, what the environment says.

This module imports nothing heavier than the standard library, so the command line can build
its parser (one flag per `TrainConfig` field, help text from the field's metadata) without
loading torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .errors import DataError

__all__ = ["ARCHITECTURES", "AUGMENT_NAMES", "TrainConfig", "RECIPES", "config_for", "Settings", "settings", "for_workers"]

# The model registry's names (`covidxray.models.REGISTRY`; a test keeps the two equal). Listed here
# so that `covidxray train --help` can offer them without importing torch.
ARCHITECTURES = (
    "tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2", "resnet18", "resnet34", "resnet50",
    "densenet121", "efficientnet_b0", "mobilenet_v3_small", "mobilenet_v3_large", "cxrnet",
)
AUGMENT_NAMES = ("cxr", "acquisition", "soft-normals", "soft-zoom", "reference", "none")  # `covidxray.presets.AUGMENTS`, "none"


def _f(default: Any, help: str, **argparse_options: Any) -> Any:
    """A dataclass field whose metadata carries its command-line help (and argparse options such as ``choices``)."""
    return field(default=default, metadata={"help": help, **argparse_options})


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in the checkpoint and the resume state."""

    data: str = _f("", "folder tree or CSV manifest")
    out: str = _f("runs/default", "run directory")
    splits: str | None = _f(None, "split CSV (default: the data's own split, else one is made)")
    recipe: str = _f("default", "preset this config starts from")
    arch: str = _f("tf_efficientnet_lite0", "architecture (model registry name)", choices=ARCHITECTURES)
    weights: str | None = _f("imagenet", "'imagenet' (offline sources only), 'none', or a local weights file")
    size: int = _f(192, "input side in pixels")
    equalize: bool = _f(True, "histogram equalisation in preprocessing")
    mask_border: float = _f(0.0, "blank this fraction of each side before equalisation, in training and serving (0: off)")
    lung_crop: bool = _f(False, "crop every film to its lungs (found by the lung segmenter), in training and serving")
    lung_margin: float = _f(0.1, "widen the lung box by this fraction of its size on each side")
    outside: float = _f(0.0, "0..1: darken the crop outside the (dilated) lungs by this much (0: keep it)")
    equalize_lungs: bool = _f(False, "with --lung-crop: equalise on the lung pixels' histogram, so every origin's lungs "
                                     "span the same grey levels")
    box_views: int = _f(1, "with --lung-crop: crops prepared per training film, the first at the lungs' own box and the "
                           "others at boxes moved on the film by up to --box-shift of their size (and margins of "
                           "0.5-1.5x), one drawn per film and epoch (1: the own box only)")
    box_shift: float = _f(0.05, "with --box-views: how far the other boxes move, as a share of the box's height or width")
    smooth: float = _f(0.0, "Gaussian blur sigma in input pixels after resizing, in training and serving (0: off)")
    segmenter: str = _f("bundled", "folder holding segmenter.json: the lung segmenter and input gate copied into the run "
                                   "('bundled': covidxray's own; 'none': no segmenter, no gate, no lung crop)")
    epochs: int = _f(5, "training epochs")
    batch_size: int = _f(32, "images per optimiser step (the global batch under torchrun)")
    optimizer: str = _f("adamw", "optimiser", choices=("adamw", "adam", "sgd"))
    lr: float = _f(1e-3, "peak learning rate")
    weight_decay: float = _f(0.02, "weight decay")
    scheduler: str = _f("cosine", "cosine (linear warm-up, cosine decay per step) or step (StepLR per epoch)",
                        choices=("cosine", "step"))
    warmup_epochs: float = _f(0.3, "warm-up length in epochs (cosine only)")
    step_size: int = _f(3, "epochs per learning-rate step (step only)")
    gamma: float = _f(0.1, "learning-rate factor per step (step only)")
    label_smoothing: float = _f(0.1, "label smoothing of the cross-entropy")
    balanced: bool = _f(True, "sample both classes equally often")
    balance_sources: bool = _f(False, "with --balanced: also sample every source of a class equally often")
    origin_adversary: float = _f(0.0, "weight of a class-conditional origin adversary behind gradient reversal "
                                      "(DANN; training only, not in the saved model; 0: off)")
    consistency: float = _f(0.0, "weight of a consistency term: the logit margin of each film and of its sharpened or "
                                 "blurred twin should agree (`covidxray.invariance`; training only; 0: off)")
    mixstyle: float = _f(0.0, "probability per batch and layer that the early stages' outputs swap part of their "
                              "per-channel statistics with another film of the batch (MixStyle, `covidxray.invariance`; "
                              "training only; 0: off)")
    finding_task: float = _f(0.0, "weight of a second task, another finding versus normal, on the films of sources "
                                  "that give both (labels normal and other): they leave the COVID-19 question and "
                                  "train a head of their own on the same features (`covidxray.findings`; training "
                                  "only; 0: off)")
    augment: str = _f("cxr", "training augmentation", choices=AUGMENT_NAMES)
    freeze: bool = _f(True, "freeze the architecture's declared early layers (fast on CPU)")
    ema: float = _f(0.997, "per-step decay of the weight average that is validated and saved (0: off)")
    patience: int = _f(3, "stop after this many epochs without a better validation AUC (0: never)")
    target_sensitivity: float | None = _f(None, "choose the highest threshold at which every COVID-19 origin "
                                                "of the validation films (20 or more) reaches this sensitivity "
                                                "(default: Youden's J)")
    logit_shift: bool = _f(True, "calibrate with a logit shift besides the temperature (Platt scaling on validation, "
                                 "kept in the classifier's bias): probabilities that a class-biased training skewed "
                                 "mean what they say again")
    seed: int = _f(0, "seed of sampling, augmentation and initialisation")
    deterministic: bool = _f(False, "deterministic kernels (slower)")
    limit: int | None = _f(None, "use at most this many images per split (quick runs)")
    device: str = _f("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    compile: bool = _f(False, "torch.compile the training model (pays off on GPU for long runs)")
    cache_dir: str | None = _f(None, "decoded-image cache (default $COVIDXRAY_CACHE or ~/.cache/covidxray)")
    eval_batch_size: int = _f(128, "images per validation batch")


RECIPES: dict[str, dict[str, Any]] = {
    # Chosen on validation and leave-one-origin-out (bench/loso.py, README), never on test: ImageNet
    # EfficientNet-Lite1 (offline), frozen stem, 5 epochs, on the lungs only (crop to the segmenter's lung box at
    # 160 px, the rest of the crop darkened by 70%) with augmentation that softens normal films (so sharpness and
    # contrast, which differ by hospital, stop predicting the label). Needs the lung segmenter ('bundled' by default).
    "default": dict(lung_crop=True, size=160, outside=0.7, augment="soft-normals", arch="tf_efficientnet_lite1"),
    # The default before it, with EfficientNet-Lite0 (the model shipped until 2026-12-05).
    "lungs-lite0": dict(lung_crop=True, size=160, outside=0.7, augment="soft-normals"),
    # The default until the lung crop: the whole film at 192 px (the base the screened lung recipes override).
    "whole-film": {},
    # The project this grew from: ResNet18, 224 px, Adam 1e-3, StepLR(3, 0.1), 15 epochs, flips/rotation.
    "reference": dict(
        arch="resnet18", weights="imagenet", size=224, equalize=False, epochs=15, optimizer="adam", lr=1e-3,
        weight_decay=0.0, scheduler="step", step_size=3, gamma=0.1, label_smoothing=0.0, balanced=False,
        augment="reference", freeze=False, ema=0.0, patience=0,
    ),
    # A from-scratch compact CNN: no pretrained weights needed, trains in minutes.
    "fast": dict(arch="cxrnet", weights=None, size=128, epochs=12, lr=3e-3, freeze=False, patience=4),
}


def config_for(recipe: str, **overrides: Any) -> TrainConfig:
    """A `TrainConfig` from a named recipe with ``overrides`` (None values are ignored).

    Raises:
        DataError: an unknown recipe, or an override that is not a `TrainConfig` field (so a
            misspelt option fails instead of being dropped).
    """
    if recipe not in RECIPES:
        raise DataError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise DataError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    values = {**RECIPES[recipe], **{k: v for k, v in overrides.items() if v is not None}}
    values.pop("recipe", None)
    return TrainConfig(recipe=recipe, **values)


@dataclass(frozen=True)
class Settings:
    """What covidxray reads from the environment; `settings` is the one place that reads it."""

    data: str | None  # $COVIDXRAY_DATA: the covid-cxr data set (the folder holding manifest.csv), for `demo`
    model: str | None  # $COVIDXRAY_MODEL: the model used when none is given (else the bundled one)
    cache: str | None  # $COVIDXRAY_CACHE: the decoded-image cache (else ~/.cache/covidxray)
    api_key: str | None  # $COVIDXRAY_API_KEY: the key the REST API asks for (unset or empty: none)
    max_upload_mb: float | None  # $COVIDXRAY_MAX_UPLOAD_MB: the REST API's largest upload (else 20 MiB)
    sites: str | None = None  # $COVIDXRAY_SITES: the site registry folder (else ~/.local/share/covidxray/sites)
    # Set by ``serve --workers N`` for its workers (`for_workers`): $COVIDXRAY_SERVE_APP, the app each one makes
    # ({"app": create_app's keyword arguments, "log_level": N} as JSON), and $PROMETHEUS_MULTIPROC_DIR, the folder
    # where prometheus_client's multiprocess mode keeps every worker's counts.
    serve_app: str | None = None
    metrics_dir: str | None = None


def settings(environ: Mapping[str, str] | None = None) -> Settings:
    """The `Settings` in ``environ`` (default `os.environ`, read now: a test's monkeypatch shows). Unset or empty is None.

    Raises:
        DataError: ``COVIDXRAY_MAX_UPLOAD_MB`` is not a number.
    """
    env = os.environ if environ is None else environ

    def get(name: str) -> str | None:
        return env.get(f"COVIDXRAY_{name}") or None

    upload = get("MAX_UPLOAD_MB")
    try:
        max_upload_mb = float(upload) if upload else None
    except ValueError:
        raise DataError(f"COVIDXRAY_MAX_UPLOAD_MB={upload!r} is not a number of MiB (unset it for the 20 MiB default)") from None
    return Settings(data=get("DATA"), model=get("MODEL"), cache=get("CACHE"), api_key=get("API_KEY"),
                    max_upload_mb=max_upload_mb, sites=get("SITES"), serve_app=get("SERVE_APP"),
                    metrics_dir=env.get("PROMETHEUS_MULTIPROC_DIR") or None)


def for_workers(serve_app: str, metrics_dir: str) -> None:
    """Put ``serve --workers N``'s settings where the worker processes uvicorn starts will find them (`Settings`)."""
    os.environ.update({"COVIDXRAY_SERVE_APP": serve_app, "PROMETHEUS_MULTIPROC_DIR": metrics_dir})
