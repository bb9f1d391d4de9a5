"""Where Grad-CAM looks: the share of each map inside the (dilated) lungs, in the outer frame, in the corners.

A network that answers from the lungs puts its evidence there; one that learned a hospital's
markers, text or film edges puts it outside. `lung_mass` is the audit's headline number (the
lungs as the network input frames them, from the lung segmenter, dilated by `DILATE` of the side
so that the pleura and the lung edge count); `border_mass` is the older proxy that needs no
segmenter. COVID-19 is the positive class throughout.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from . import CLASS_NAMES
from .explain import overlay_png

__all__ = ["BORDER", "DILATE", "border_mass", "area_shares", "lung_mass", "dilate", "gradcam_pngs", "mean_of"]

BORDER = 0.125  # the outer frame audited for Grad-CAM mass, as a fraction of each side
DILATE = 0.05  # the lung mask is widened by this fraction of the side before measuring


def dilate(masks: np.ndarray, fraction: float = DILATE) -> np.ndarray:
    """Boolean masks ``(N, S, S)`` widened by ``fraction`` of the side (a square max filter)."""
    m = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, None]
    k = max(1, int(round(masks.shape[-1] * fraction))) * 2 + 1
    return F.max_pool2d(m, k, stride=1, padding=k // 2)[:, 0].numpy() > 0.5


def lung_mass(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Share of each map's mass inside its mask ``(N, S, S)``; NaN for an all-zero map."""
    c = np.asarray(cams, dtype=np.float64)
    total = c.sum(axis=(1, 2))
    inside = (c * masks).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)


def border_mass(cams: torch.Tensor | np.ndarray, frame: float = BORDER) -> dict[str, np.ndarray]:
    """Share of each map's total mass in the outer frame and in the four corner squares.

    Args:
        cams: non-negative maps ``(N, H, W)``.
        frame: width of the frame (and side of each corner square) as a fraction of the side.

    Returns:
        ``{"border": (N,), "corners": (N,)}``; NaN for an all-zero map (no evidence to locate).
        A uniform map gives ``1 - (1 - 2 frame)^2`` and ``4 frame^2`` (see `area_shares`).
    """
    c = torch.as_tensor(np.asarray(cams, dtype=np.float32) if isinstance(cams, np.ndarray) else cams).float()
    h, w = c.shape[-2:]
    dy, dx = round(h * frame), round(w * frame)
    total = c.sum(dim=(-2, -1))
    centre = c[..., dy:h - dy, dx:w - dx].sum(dim=(-2, -1))
    corners = (c[..., :dy, :dx].sum(dim=(-2, -1)) + c[..., :dy, w - dx:].sum(dim=(-2, -1))
               + c[..., h - dy:, :dx].sum(dim=(-2, -1)) + c[..., h - dy:, w - dx:].sum(dim=(-2, -1)))
    empty = total <= 0
    safe = torch.where(empty, torch.ones_like(total), total)
    nan = torch.full_like(total, float("nan"))
    return {"border": torch.where(empty, nan, 1 - centre / safe).numpy(),
            "corners": torch.where(empty, nan, corners / safe).numpy()}


def area_shares(size: int, frame: float = BORDER) -> dict[str, float]:
    """Area share of the frame and the corners on a ``size`` x ``size`` map (what a uniform map scores)."""
    return {k: float(v[0]) for k, v in border_mass(torch.ones(1, size, size), frame).items()}


def mean_of(values: np.ndarray) -> float | None:
    """Mean over the maps that had evidence (NaN marks an empty map); None when none had."""
    return float(np.nanmean(values)) if np.isfinite(values).any() else None


def gradcam_pngs(images: torch.Tensor, cams: np.ndarray, y: np.ndarray, p: np.ndarray, mass: np.ndarray,
                  frame: float, per_row: int = 4) -> tuple[bytes, bytes]:
    """Example overlays (per class: highest frame mass, then random) and the mean map per class."""
    def png(fig: Figure) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()

    rng = np.random.default_rng(0)
    rows = []
    for c in (1, 0):
        idx = np.flatnonzero((y == c) & np.isfinite(mass))
        if not len(idx):
            continue
        top = idx[np.argsort(-mass[idx])][:per_row]
        rows += [(f"{CLASS_NAMES[c]}: highest frame mass", top), (f"{CLASS_NAMES[c]}: random", rng.permutation(idx)[:per_row])]
    fig = Figure(figsize=(2.3 * per_row, 2.5 * max(1, len(rows))))
    for r, (title, idx) in enumerate(rows):
        for k, i in enumerate(idx):
            ax = fig.add_subplot(len(rows), per_row, r * per_row + k + 1)
            ax.imshow(Image.open(io.BytesIO(overlay_png(images[i].numpy() / 255.0, cams[i]))))
            ax.set_title(f"{title if k == 0 else ''}\nP(covid)={p[i]:.2f}, frame {mass[i]:.0%}", fontsize=7, loc="left")
            ax.axis("off")
    fig.suptitle("Grad-CAM for each image's true class (COVID-19 is the positive class)", fontsize=9)
    examples = png(fig)

    fig = Figure(figsize=(7, 3.6))
    for k, c in enumerate((1, 0)):
        ax = fig.add_subplot(1, 2, k + 1)
        sel = y == c
        mean = cams[sel].mean(axis=0) if sel.any() else np.zeros(cams.shape[1:])
        ax.imshow(mean, cmap="jet", vmin=0)
        s = cams.shape[-1]
        d = round(s * frame)
        ax.add_patch(Rectangle((d - 0.5, d - 0.5), s - 2 * d, s - 2 * d, fill=False, ec="white", ls="--"))
        ax.set_title(f"mean map, {CLASS_NAMES[c]} ({int(sel.sum())} images)", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"dashed: inside of the audited {frame:.1%} frame", fontsize=8)
    return examples, png(fig)
