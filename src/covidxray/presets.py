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

import functools
import io
import math
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from .resample import region_to_side, resize as _resize

__all__ = ["AUGMENTS", "Preprocess", "TrainAugment", "box_pixels", "equalize", "lung_box", "mask_border", "max_filter", "moved_box"]


def equalize(img: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Histogram-equalise a uint8 image (classic CDF mapping; constant images stay constant).

    With ``where`` (a boolean mask of the image's shape), the mapping is built from those pixels only and
    applied to every pixel; a mask with (almost) nothing in it falls back to the whole image.
    """
    chosen = img[where] if where is not None and where.sum() >= 64 else img
    hist = np.bincount(chosen.ravel(), minlength=256)
    cdf = np.cumsum(hist)
    cdf_min = cdf[np.nonzero(hist)[0][0]]
    denom = cdf[-1] - cdf_min
    if denom == 0:
        return img.copy()
    lut = np.clip(np.round((cdf - cdf_min) / denom * 255.0), 0, 255).astype(np.uint8)  # values below cdf_min clip to 0
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
    lung_crop: bool = False  # crop to the lungs' bounding box (needs a lung map from covidxray.segment)
    lung_margin: float = 0.1  # widen that box by this fraction of its height and width on each side
    outside: float = 0.0  # 0..1: how far the crop outside the (dilated) lungs is darkened to black; 0 = kept
    # With lung_crop: the equalisation mapping comes from the lung pixels alone, so every origin's lungs span the same
    # grey levels (a bright detector's normal lungs no longer read as opacity); the rest of the crop follows that mapping.
    equalize_lungs: bool = False
    smooth: float = 0.0  # Gaussian blur (sigma, in network-input pixels) after resizing: erases detector and processing sharpness
    segmenter_sha256: str = ""  # with lung_crop: the weights of the segmenter the lung maps must come from
    # The segmenter itself (image -> P(lung) map), attached when a model is loaded; not part of the contract's JSON.
    segmenter: Callable[[np.ndarray], np.ndarray] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_border < 0.5:
            raise ValueError(f"mask_border must be in [0, 0.5), got {self.mask_border}")
        if not 0.0 <= self.smooth <= 10.0:
            raise ValueError(f"smooth must be a blur sigma in [0, 10] pixels, got {self.smooth}")
        if self.equalize_lungs and not (self.lung_crop and self.equalize):
            raise ValueError("equalize_lungs needs lung_crop and equalize: it is equalisation on the lungs' pixels")
        if not 0.0 <= self.lung_margin <= 1.0 or not 0.0 <= self.outside <= 1.0:
            raise ValueError(f"lung_margin and outside must be in [0, 1], got {self.lung_margin} and {self.outside}")

    def prepare(self, image: np.ndarray, lungs: np.ndarray | None = None) -> np.ndarray:
        """Float grayscale image in [0, 1] (H x W) -> uint8 ``size x size``, cropped, masked and equalised as configured.

        Args:
            image: decoded image (see `covidxray.imaging.load_image`).
            lungs: P(lung) map of the whole image, any size; with ``lung_crop`` and no map, the attached
                ``segmenter`` makes one. Ignored without ``lung_crop``.
        """
        return self.prepare_with_box(image, lungs)[0]

    def prepare_with_box(
        self, image: np.ndarray, lungs: np.ndarray | None = None, box: tuple[float, float, float, float] | None = None,
    ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """`prepare`, plus the part of the image it kept as relative ``(top, left, bottom, right)``.

        ``box`` (with ``lung_crop``) crops there instead of the lungs' own box: for robustness checks that move it.
        """
        if self.lung_crop:
            if lungs is None:
                if self.segmenter is None:
                    raise ValueError("this preprocessing crops to the lungs: attach the lung segmenter or pass a lung map")
                lungs = self.segmenter(image)
            box = box or lung_box(lungs, self.lung_margin)
            image, lungs = _crop(image, lungs, box, self.size)
        else:
            box = (0.0, 0.0, 1.0, 1.0)
        small = _resize(image, self.size)
        if self.smooth:
            small = ndimage.gaussian_filter(small, self.smooth, mode="nearest")
        u8 = np.clip(np.round(small * 255.0), 0, 255).astype(np.uint8)
        if self.mask_border:
            u8 = mask_border(u8, self.mask_border)
        if self.equalize_lungs:
            u8 = equalize(u8, lungs > 0.5)
        if self.lung_crop and self.outside:
            u8 = _darken_outside(u8, lungs, self.outside)
        return (equalize(u8) if self.equalize and not self.equalize_lungs else u8), box

    def prepare_moved(self, image: np.ndarray, moves: list[tuple[tuple[float, float], float]]) -> np.ndarray:
        """`prepare` at the lungs' own box, then at that box moved by each of ``moves`` (a (rows, columns) shift and
        a margin scale, as `moved_box` takes them): ``(1 + len(moves), size, size)`` uint8, one lung map for all."""
        if not (self.lung_crop and self.segmenter is not None):
            raise ValueError("moved boxes need a lung crop with its segmenter attached")
        lungs = self.segmenter(image)
        own = lung_box(lungs, self.lung_margin)
        boxes = [own, *(moved_box(own, self.lung_margin, shift, scale) for shift, scale in moves)]
        return np.stack([self.prepare_with_box(image, lungs, box)[0] for box in boxes])

    def input_lungs(self, lungs: np.ndarray) -> np.ndarray:
        """A whole-image lung map as the network input frames it: cut to the same box (with ``lung_crop``)
        and brought to ``size x size`` (float, the map's own values)."""
        if self.lung_crop:
            rows, cols = box_pixels(lung_box(lungs, self.lung_margin), lungs.shape)
            lungs = np.asarray(lungs)[rows, cols]
        return _resize(np.asarray(lungs, dtype=np.float32), self.size)

    def to_tensor(self, prepared: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``(size, size)`` or ``(N, size, size)`` / ``(N, 1, size, size)`` -> normalised float ``(N, 1, size, size)``."""
        x = torch.as_tensor(prepared)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        while x.ndim < 4:
            x = x.unsqueeze(0) if x.ndim == 2 else x.unsqueeze(1)
        return (x - self.mean) / self.std

    def __call__(self, image: np.ndarray, lungs: np.ndarray | None = None) -> torch.Tensor:
        """Decoded image -> network input ``(1, 1, size, size)``."""
        return self.to_tensor(self.prepare(image, lungs))

    def to_dict(self) -> dict:
        # Field by field, not asdict(): that would deep-copy the attached segmenter (an ONNX Runtime session cannot be).
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "segmenter"}
        # Options left at their defaults are left out: older checkpoints, ONNX contracts and
        # decoded-image cache keys stay byte-identical, and older readers can still read new ones.
        for name, default in _OPTIONAL.items():
            if d[name] == default:
                del d[name]
        return d


_OPTIONAL = {"mask_border": 0.0, "lung_crop": False, "lung_margin": 0.1, "outside": 0.0, "smooth": 0.0, "segmenter_sha256": "",
             "equalize_lungs": False}


def lung_box(prob: np.ndarray, margin: float = 0.1, threshold: float = 0.5, min_area: float = 0.02) -> tuple[float, float, float, float]:
    """The lungs' bounding box in relative coordinates ``(top, left, bottom, right)``, widened by ``margin``.

    Only the two largest connected regions of the map count (the lungs): a stray island over a
    tube or the bowel does not stretch the box. ``margin`` is a fraction of the box's own height
    and width, added on each side; the box is clipped to the image. When the map finds (almost) no
    lung (under ``min_area`` of the image), the whole image is returned: a crop that cannot be
    trusted is not made.
    """
    mask = np.asarray(prob) >= threshold
    h, w = mask.shape
    if mask.mean() < min_area:
        return 0.0, 0.0, 1.0, 1.0
    labels, n = ndimage.label(mask)
    if n > 2:
        sizes = np.bincount(labels.ravel())[1:]
        mask = np.isin(labels, 1 + np.argsort(sizes)[-2:])
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rows[0] / h, (rows[-1] + 1) / h, cols[0] / w, (cols[-1] + 1) / w
    dy, dx = (bottom - top) * margin, (right - left) * margin
    return float(max(0.0, top - dy)), float(max(0.0, left - dx)), float(min(1.0, bottom + dy)), float(min(1.0, right + dx))


def moved_box(box: tuple[float, float, float, float], margin: float, shift: tuple[float, float],
              scale: float) -> tuple[float, float, float, float]:
    """``box`` (a `lung_box` with ``margin``) moved by ``shift`` (rows, columns) of its size, its margin times ``scale``;
    within the image."""
    top, left, bottom, right = box
    h, w = bottom - top, right - left
    cy, cx = (top + bottom) / 2 + shift[0] * h, (left + right) / 2 + shift[1] * w
    hy, hx = h / (1 + 2 * margin) * (0.5 + margin * scale), w / (1 + 2 * margin) * (0.5 + margin * scale)
    return max(0.0, cy - hy), max(0.0, cx - hx), min(1.0, cy + hy), min(1.0, cx + hx)


def box_pixels(box: tuple[float, float, float, float], shape: tuple[int, ...]) -> tuple[slice, slice]:
    """Row and column slices of an ``H x W`` image covered by the relative ``(top, left, bottom, right)`` box."""
    h, w = shape[:2]
    top, left, bottom, right = box
    r0, c0 = int(math.floor(top * h)), int(math.floor(left * w))
    return slice(r0, max(int(math.ceil(bottom * h)), r0 + 1)), slice(c0, max(int(math.ceil(right * w)), c0 + 1))


def _crop(image: np.ndarray, lungs: np.ndarray, box: tuple[float, float, float, float],
          size: int) -> tuple[np.ndarray, np.ndarray]:
    """The image cut to the relative ``box``, and the lung map over the same box at ``size x size``.

    The map is what resizing it to the image's size, cutting it and resizing the cut to ``size`` would give
    (`covidxray.resample.region_to_side`), without a map of the image's size: 1 ms instead of 23 on a 2500 px film.
    """
    rows, cols = box_pixels(box, image.shape)
    (h, w), (map_h, map_w) = image.shape[:2], np.shape(lungs)
    region = (cols.start * map_w / w, rows.start * map_h / h, cols.stop * map_w / w, rows.stop * map_h / h)
    return image[rows, cols], region_to_side(lungs, region, (rows.stop - rows.start, cols.stop - cols.start), size)


@functools.lru_cache(maxsize=8)
def _window_share(shape: tuple[int, int], k: int) -> np.ndarray:
    """The share of each pixel's k x k window that lies inside an image of ``shape`` (the same for every film: kept)."""
    share = ndimage.uniform_filter(np.ones(shape), k, mode="constant")
    share.flags.writeable = False
    return share


def max_filter(a: np.ndarray, k: int) -> np.ndarray:
    """``scipy.ndimage.maximum_filter(a, k, mode="nearest")`` for a 2-D array and odd ``k``, as k - 1 shifted maxima per
    axis: the same numbers, 4x faster at 160 px (on 128 real films the crop went from 1.24 to 1.12 ms)."""
    h, (rows, cols) = k // 2, a.shape
    padded = np.pad(a, h, mode="edge")
    across = padded[:, :cols].copy()
    for i in range(1, k):
        np.maximum(across, padded[:, i:i + cols], out=across)
    out = across[:rows].copy()
    for i in range(1, k):
        np.maximum(out, across[i:i + rows], out=out)
    return out


def _darken_outside(u8: np.ndarray, lungs: np.ndarray, strength: float) -> np.ndarray:
    """Blend the pixels outside the dilated lung map (of ``u8``'s size) toward black by ``strength`` (soft edge)."""
    size = u8.shape[0]
    k = max(3, int(round(size * 0.04)) | 1)  # dilate by ~2 % of the side: keep the pleura and the lung edge
    # a k x k max over the pixels inside the image (in float32, the map's own values: the same maxima, half the work)
    m = max_filter(lungs, k).astype(np.float64)
    # k x k mean over the pixels inside the image (the window's share of the image divides it out)
    m = ndimage.uniform_filter(m, k, mode="constant") / _window_share(m.shape, k)
    m = np.clip(m, 0, 1)
    keep = 1.0 - strength * (1.0 - m)
    return np.clip(np.round(u8 * keep), 0, 255).astype(np.uint8)


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
    blur: float = 0.0  # probability of a Gaussian blur or (as often) an unsharp-mask sharpening, per image
    window: float = 0.0  # probability of a random intensity window (a display window clipped at both ends)
    jpeg: float = 0.0  # probability of a JPEG re-compression at quality 30-90, per image
    # Probability that a *normal* film gets a softer, flatter look (blur, lower contrast): when every
    # normal of the training data comes from one crisp digital source, softness would otherwise say COVID-19.
    soften_normals: float = 0.0

    def __call__(self, x: torch.Tensor, g: torch.Generator, labels: torch.Tensor | None = None) -> torch.Tensor:
        n, _, h, w = x.shape
        u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731 - local shorthand
        if self.soften_normals and labels is not None:
            soft = (u(n) < self.soften_normals) & (labels == 0)
            x = _blur_or_sharpen(x, soft, torch.zeros(n, dtype=torch.bool), 0.6 + u(n) * 1.6)
            mean = x.mean(dim=(2, 3), keepdim=True)
            flat = torch.where(soft.view(n, 1, 1, 1), 0.55 + u(n, 1, 1, 1) * 0.35, torch.ones(n, 1, 1, 1))
            x = ((x - mean) * flat + mean).clamp(0, 1)
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
        # Acquisition: blur or sharpening (detector and processing), a display window, JPEG artefacts.
        if self.blur:
            x = _blur_or_sharpen(x, u(n) < self.blur, u(n) < 0.5, 0.5 + u(n) * 1.0)
        if self.window:
            lo, hi = u(n, 1, 1, 1) * 0.2, 0.8 + u(n, 1, 1, 1) * 0.2
            x = torch.where(u(n, 1, 1, 1) < self.window, ((x - lo) / (hi - lo)).clamp(0, 1), x)
        if self.jpeg:
            for i in torch.nonzero(u(n) < self.jpeg).flatten().tolist():
                x[i, 0] = _jpeg(x[i, 0], int(30 + 60 * float(u(1))))
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


# The training augmentations by name (`TrainConfig.augment`; "none": no augmentation).
AUGMENTS = {
    "cxr": TrainAugment(),
    # Stronger acquisition variety, so that sharpness, processing and compression cannot name a hospital.
    "acquisition": TrainAugment(resolution=(0.35, 1.0), gamma=(0.6, 1.6), contrast=0.25, noise=0.03, blur=0.5,
                                window=0.3, jpeg=0.3),
    # The cxr set, and half of the normal films made softer and flatter, as other detectors and film show them.
    "soft-normals": TrainAugment(soften_normals=0.5),
    # The same, zoomed into parts of the lung box (up to 1.6x, moved further): an answer that does not hang on the framing.
    "soft-zoom": TrainAugment(soften_normals=0.5, scale=(0.9, 1.6), translate=0.15),
    "reference": TrainAugment(rotate=10, scale=(0.9, 1.1), aspect=0.0, translate=0.05, hflip=0.5, resolution=(1.0, 1.0),
                              gamma=(1.0, 1.0), contrast=0.0, noise=0.0, erase=0.0),
}


def _blur_or_sharpen(x: torch.Tensor, chosen: torch.Tensor, sharpen: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per image of ``x`` ``(N, 1, H, W)``: unchanged, Gaussian-blurred (``sigma`` px), or unsharp-masked."""
    out = x.clone()
    for i in torch.nonzero(chosen).flatten().tolist():
        r = max(1, int(3 * float(sigma[i])))
        k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * float(sigma[i]) ** 2))
        k = k / k.sum()
        img = x[i:i + 1]
        smooth = F.conv2d(F.pad(img, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
        smooth = F.conv2d(F.pad(smooth, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
        out[i:i + 1] = (img + (img - smooth)).clamp(0, 1) if sharpen[i] else smooth
    return out


def _jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """One ``(H, W)`` image in [0, 1] through JPEG at ``quality`` and back."""
    buf = io.BytesIO()
    Image.fromarray((img.clamp(0, 1) * 255).round().byte().numpy()).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return torch.from_numpy(np.asarray(Image.open(buf), dtype=np.float32) / 255)

