"""Preprocessing presets: the one definition of how an X-ray becomes a network input.

Every consumer (training, evaluation, prediction, the REST API, ONNX export) goes through
`Preprocess`:

1. `Preprocess.prepare` — decoded grayscale image (float in [0, 1], any size) -> ``size x size``
   uint8 image, histogram-equalised. This is also what the training cache stores, so a cached
   image and a freshly decoded one are bit-identical.
2. `Preprocess.to_tensor` — uint8 images -> normalised float tensor ``(N, 1, size, size)``.

Why these choices (see the dataset README's caveats):

* Every image is squashed to a square: one source of the shared data was squashed to 224x224 by
  its publisher, so keeping other sources' aspect ratios would hand the network a label cue.
* Histogram equalisation puts every image on the same intensity distribution, removing much of
  the exposure, processing and scanner look that differs between hospitals.
* Optionally (``mask_border``) an outer frame is blanked before equalisation: burned-in text,
  markers and film edges sit there, the lungs do not.

`TrainAugment` adds the random part for training, batched in torch so it costs little on CPU:
affine jitter, resolution jitter (down- then up-sampling, so sharpness cannot identify a
source), gamma/contrast jitter, noise and random erasing (to discourage reliance on burned-in
text and markers).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["Preprocess", "TrainAugment", "equalize", "mask_border"]


def equalize(img: np.ndarray) -> np.ndarray:
    """Histogram-equalise a uint8 image (classic CDF mapping; constant images stay constant)."""
    hist = np.bincount(img.ravel(), minlength=256)
    cdf = np.cumsum(hist)
    cdf_min = cdf[np.nonzero(hist)[0][0]]
    denom = cdf[-1] - cdf_min
    if denom == 0:
        return img.copy()
    lut = np.clip(np.round((cdf - cdf_min) / denom * 255.0), 0, 255).astype(np.uint8)
    return lut[img]


def mask_border(img: np.ndarray, fraction: float) -> np.ndarray:
    """A copy of a square-ish image with an outer frame of ``fraction`` of each side set to 0."""
    h, w = img.shape[-2:]
    dy, dx = round(h * fraction), round(w * fraction)
    out = np.zeros_like(img)
    out[..., dy:h - dy, dx:w - dx] = img[..., dy:h - dy, dx:w - dx]
    return out


@dataclass(frozen=True)
class Preprocess:
    """Deterministic preprocessing shared by training and serving (stored in every checkpoint)."""

    size: int = 224  # square side in pixels fed to the network
    equalize: bool = True  # histogram equalisation (intensity standardisation across hospitals)
    mean: float = 0.5  # normalisation: (x - mean) / std with x in [0, 1]
    std: float = 0.5
    mask_border: float = 0.0  # fraction of each side blanked (set to 0) before equalisation; 0 = off

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_border < 0.5:
            raise ValueError(f"mask_border must be in [0, 0.5), got {self.mask_border}")

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Float grayscale image in [0, 1] (H x W) -> uint8 ``size x size``, border-masked and equalised if configured."""
        pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
        # Pillow's resampling filters widen with the scale factor, i.e. they antialias when shrinking.
        small = np.asarray(pil.resize((self.size, self.size), Image.Resampling.BILINEAR), dtype=np.float32)
        u8 = np.clip(np.round(small * 255.0), 0, 255).astype(np.uint8)
        if self.mask_border:
            u8 = mask_border(u8, self.mask_border)
        return equalize(u8) if self.equalize else u8

    def to_tensor(self, prepared: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``(size, size)`` or ``(N, size, size)`` / ``(N, 1, size, size)`` -> normalised float ``(N, 1, size, size)``."""
        x = torch.as_tensor(prepared)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        while x.ndim < 4:
            x = x.unsqueeze(0) if x.ndim == 2 else x.unsqueeze(1)
        return (x - self.mean) / self.std

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """Decoded image -> network input ``(1, 1, size, size)``."""
        return self.to_tensor(self.prepare(image))

    def to_dict(self) -> dict:
        d = asdict(self)
        # Off by default and unknown to older readers: leaving it out keeps existing checkpoints,
        # ONNX contracts and decoded-image cache keys byte-identical.
        if not d["mask_border"]:
            del d["mask_border"]
        return d


@dataclass(frozen=True)
class TrainAugment:
    """Random augmentation applied to a batch of prepared images (float in [0, 1], ``(N, 1, S, S)``)."""

    rotate: float = 10.0  # max rotation in degrees
    scale: tuple[float, float] = (0.85, 1.15)  # zoom range
    aspect: float = 0.1  # max relative stretch of one axis
    translate: float = 0.08  # max shift as a fraction of the side
    hflip: float = 0.5  # probability of a horizontal flip
    resolution: tuple[float, float] = (0.4, 1.0)  # down-sample factor range before up-sampling back
    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: float = 0.15  # max relative contrast change
    noise: float = 0.02  # max std of additive Gaussian noise
    erase: float = 0.5  # probability of erasing one random rectangle

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731 - local shorthand
        # Geometric: one affine grid per image, pixels outside the image become black (as film edges).
        ang = (u(n) * 2 - 1) * math.radians(self.rotate)
        s = self.scale[0] + u(n) * (self.scale[1] - self.scale[0])
        sx = s * (1 + (u(n) * 2 - 1) * self.aspect)
        sy = s
        flip = torch.where(u(n) < self.hflip, -1.0, 1.0)
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack([
            torch.stack([cos / sx * flip, -sin / sy, (u(n) * 2 - 1) * self.translate * 2], 1),
            torch.stack([sin / sx * flip, cos / sy, (u(n) * 2 - 1) * self.translate * 2], 1),
        ], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # Resolution jitter: one random factor per batch keeps this a single resize call.
        r = self.resolution[0] + float(u(1)) * (self.resolution[1] - self.resolution[0])
        if r < 0.98:
            small = F.interpolate(x, size=(max(8, int(h * r)), max(8, int(w * r))), mode="area")
            x = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        # Intensity: gamma, contrast about the image mean, noise.
        gam = self.gamma[0] + u(n, 1, 1, 1) * (self.gamma[1] - self.gamma[0])
        x = x.clamp(0, 1) ** gam
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * (1 + (u(n, 1, 1, 1) * 2 - 1) * self.contrast) + mean
        x = x + torch.randn(x.shape, generator=g) * (u(n, 1, 1, 1) * self.noise)
        x = x.clamp(0, 1)
        # Random erasing: one rectangle, 10-35 % of each side, filled with a random grey level.
        for i in torch.nonzero(u(n) < self.erase).flatten().tolist():
            eh, ew = int(h * (0.1 + 0.25 * float(u(1)))), int(w * (0.1 + 0.25 * float(u(1))))
            top, left = int((h - eh) * float(u(1))), int((w - ew) * float(u(1)))
            x[i, :, top:top + eh, left:left + ew] = float(u(1))
        return x
