"""Train the lung segmenter (`covidxray.segment.LungNet`) on JSRT's lung masks, split by patient.

JSRT films are adult PA films without consolidation, so training augments hard (`_augment`):
affine jitter, gamma/contrast, blur and resolution loss, noise, and bright blurred "opacities"
painted inside the lungs, so that a white-out lung of a COVID-19 film is still called lung.
The Dice overlap on held-out patients is measured at the masks' own resolution.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save as st_save
from tqdm import tqdm

from .imaging import load_image
from .presets import Preprocess
from .segment import SEGMENTER_FORMAT, LungNet, dice
from .utils import atomic_write_bytes, atomic_write_json, read_csv_rows

__all__ = ["SegConfig", "train_segmenter"]

log = logging.getLogger(__name__)


@dataclass
class SegConfig:
    """How the segmenter is trained (stored in its JSON)."""

    data: str = ""  # JSRT manifest (path, mask, patient_id columns)
    out: str = "runs/segmenter"  # folder for segmenter.safetensors + segmenter.json
    size: int = 112  # network input side in pixels (a multiple of 16)
    epochs: int = 60
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train/val/test patients
    pretrained: bool = True  # ImageNet encoder (offline package); False: random init (tests)


def _jsrt_pairs(manifest: str | os.PathLike) -> list[dict[str, str]]:
    manifest = Path(manifest)
    rows = read_csv_rows(manifest, {"path", "mask"}, "segmentation manifest")
    base = manifest.resolve().parent
    return [{**r, "path": str(base / r["path"]), "mask": str(base / r["mask"])} for r in rows]


def _split_patients(rows: Sequence[dict[str, str]], fractions: Sequence[float], seed: int) -> dict[str, list[int]]:
    """Indices per split, grouped by patient (every image of a patient in one split)."""
    patients = sorted({r.get("patient_id") or r["path"] for r in rows})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_train, n_val = round(fractions[0] * len(patients)), round(fractions[1] * len(patients))
    split_of = {patients[j]: ("train" if k < n_train else "val" if k < n_train + n_val else "test") for k, j in enumerate(order)}
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, r in enumerate(rows):
        out[split_of[r.get("patient_id") or r["path"]]].append(i)
    return out


def _load_pair(row: dict[str, str], pre: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """Prepared uint8 image and the mask resized to the network's size (float in [0, 1])."""
    image = pre.prepare(load_image(row["path"]))
    with Image.open(row["mask"]) as m:
        mask = np.asarray(m.convert("L").resize((pre.size, pre.size), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    return image, mask


def _augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint geometric and image-only photometric augmentation of images ``x`` and masks ``y``, both ``(N, 1, S, S)`` in [0, 1]."""
    n, _, h, w = x.shape
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731 - local shorthand
    ang = (u(n) * 2 - 1) * math.radians(12)
    s = 0.8 + u(n) * 0.45
    sx, sy = s * (1 + (u(n) * 2 - 1) * 0.12), s
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([cos / sx, -sin / sy, (u(n) * 2 - 1) * 0.12], 1),
                         torch.stack([sin / sx, cos / sy, (u(n) * 2 - 1) * 0.12], 1)], 1)
    grid = F.affine_grid(theta, [n, 2, h, w], align_corners=False)
    both = F.grid_sample(torch.cat([x, y], 1), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x, y = both[:, :1], both[:, 1:]
    # Opacities: bright blurred blobs inside the lungs (consolidation, ground glass); the mask stays lung.
    blobs = torch.zeros_like(x)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    for i in torch.nonzero(u(n) < 0.6).flatten().tolist():
        for _ in range(int(u(1) * 4) + 1):
            cy, cx, r = float(u(1)) * 0.7 + 0.15, float(u(1)) * 0.7 + 0.15, 0.05 + float(u(1)) * 0.2
            blobs[i, 0] += (0.2 + 0.6 * float(u(1))) * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    x = torch.maximum(x, (x + blobs * y).clamp(0, 1))
    # Resolution loss and blur, then gamma, contrast and noise.
    r = 0.35 + float(u(1)) * 0.65
    if r < 0.95:
        x = F.interpolate(F.interpolate(x, scale_factor=r, mode="area"), size=(h, w), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1) ** (0.6 + u(n, 1, 1, 1) * 1.0)
    mean = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * (0.75 + u(n, 1, 1, 1) * 0.5) + mean
    x = x + torch.randn(x.shape, generator=g) * u(n, 1, 1, 1) * 0.04
    flip = u(n) < 0.5  # a mirrored chest is still two lungs
    x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
    return x.clamp(0, 1), y


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3))
    soft_dice = 1 - (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + soft_dice.mean()


def _evaluate(net: LungNet, pre: Preprocess, rows: Sequence[dict[str, str]], idx: Sequence[int]) -> dict[str, float]:
    """Dice per held-out image, at the mask file's own resolution (the map is up-sampled bilinearly)."""
    net.eval()
    scores = []
    with torch.no_grad():
        for i in idx:
            image = load_image(rows[i]["path"])
            prob = torch.sigmoid(net(pre.to_tensor(pre.prepare(image)[None])))
            with Image.open(rows[i]["mask"]) as m:
                target = np.asarray(m.convert("L"), dtype=np.float32) / 255
            full = F.interpolate(prob, size=target.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
            scores.append(dice(full, target))
    return {"n": len(scores), "dice_mean": float(np.mean(scores)), "dice_min": float(np.min(scores)),
            "dice_median": float(np.median(scores))}


def train_segmenter(cfg: SegConfig) -> Path:
    """Train `LungNet` on a JSRT-style manifest (image + mask per row), split by patient; returns the JSON path.

    Writes ``segmenter.safetensors`` and ``segmenter.json`` (preprocessing, split, Dice on the
    validation and test patients, config, weights hash) atomically into ``cfg.out``.
    """
    torch.manual_seed(cfg.seed)
    rows = _jsrt_pairs(cfg.data)
    parts = _split_patients(rows, cfg.fractions, cfg.seed)
    pre = Preprocess(size=cfg.size, equalize=True, mean=0.5, std=0.5)
    pairs = [_load_pair(rows[i], pre) for i in parts["train"]]
    x = torch.from_numpy(np.stack([p[0] for p in pairs])).float().unsqueeze(1) / 255
    y = torch.from_numpy(np.stack([p[1] for p in pairs])).unsqueeze(1)
    net = LungNet(pretrained=cfg.pretrained)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(x) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    for epoch in tqdm(range(cfg.epochs), desc="segmenter", unit="epoch", leave=False):
        net.train()
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            xb, yb = _augment(x[idx], y[idx], g)
            loss = _loss(net((xb - pre.mean) / pre.std), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    metrics = {split: _evaluate(net, pre, rows, parts[split]) for split in ("val", "test")}
    log.info("segmenter: validation Dice %.4f, test Dice %.4f (%.0f s)", metrics["val"]["dice_mean"],
             metrics["test"]["dice_mean"], time.perf_counter() - t0)
    out = Path(cfg.out)
    blob = st_save({k: v.detach().contiguous().clone() for k, v in net.state_dict().items()})
    meta = {
        "format": SEGMENTER_FORMAT, "weights_file": "segmenter.safetensors", "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "preprocess": pre.to_dict(), "metrics": metrics, "train_seconds": time.perf_counter() - t0,
        "config": {**asdict(cfg), "fractions": list(cfg.fractions)},
        "split": {k: [Path(rows[i]["path"]).name for i in v] for k, v in parts.items()},
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    atomic_write_bytes(out / "segmenter.safetensors", blob)
    atomic_write_json(out / "segmenter.json", meta)
    return out / "segmenter.json"
