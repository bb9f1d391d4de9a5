"""Train the input gate's head (`covidxray.gate.GateHead`) on the lung segmenter's encoder features.

Kinds of picture (`GATE_CLASSES`) and where they come from:

* ``frontal`` — covid-cxr (its committed split) and JSRT (the segmenter's patient split);
* ``lateral`` and ``other_modality`` — the shared not-frontal set's lateral films and CT slices,
  split by patient (`GateConfig.nf_test` of the patients are kept for testing), and the medical
  samples of `covidxray.negatives` (pydicom's CT/MR/US/NM files, scikit-image's phantom, fundus,
  microscopy);
* ``rotated`` — frontal films turned by 90, 180 or 270 degrees;
* ``other`` — photographs, drawings, documents, charts, noise and gradients (`covidxray.negatives`).

Training images are augmented (crop, small rotation, flip, gamma, blur, noise), rare kinds more
often. The threshold on P(frontal) is the `GateConfig.keep` quantile of the validation films'
P(frontal): that share of real films is expected to pass. The segmenter itself is not changed:
the head goes to ``gate.safetensors`` beside it and its settings and test results into the
``gate`` section of ``segmenter.json``.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save
from scipy import ndimage
from tqdm import tqdm

from .data import load_samples
from .errors import ImageError
from .gate import GATE_CLASSES, GateHead, extras
from .imaging import ImageInfo, read_image
from .negatives import all_items
from .segment import LungSegmenter
from .utils import atomic_write_bytes, atomic_write_json

__all__ = ["GateConfig", "train_gate", "not_frontal_split", "rotate_quarter"]

log = logging.getLogger(__name__)


@dataclass
class GateConfig:
    """Where the gate's pictures come from and how the head is trained."""

    segmenter: str  # folder with segmenter.json (the gate is added there)
    covid_cxr: str  # manifest.csv of the main data set
    splits: str  # its split file
    jsrt: str  # JSRT manifest.csv
    not_frontal: str  # not-frontal-cxr manifest.csv
    nf_test: float = 0.4  # share of not-frontal patients kept for testing
    frontal_limit: int = 2500  # frontal training films used (a random subset; thousands suffice)
    epochs: int = 60
    hidden: int = 64
    keep: float = 0.998  # share of validation films that must pass the threshold
    seed: int = 0


def _augment(image: np.ndarray, rng: np.random.Generator, small_turns: bool = True) -> np.ndarray:
    """Random crop (60-100 % of each side), small rotation, flip, gamma, blur and noise of a float image."""
    h, w = image.shape
    ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out = image[top:top + ch, left:left + cw]
    if small_turns and rng.random() < 0.5:
        out = ndimage.rotate(out, rng.uniform(-10, 10), reshape=False, order=1, mode="constant", cval=0.0)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out = np.clip(out, 0, 1) ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.3:
        out = ndimage.gaussian_filter(out, rng.uniform(0.5, 2.0))
    if rng.random() < 0.3:
        out = out + rng.normal(0, rng.uniform(0.01, 0.05), out.shape)
    return np.ascontiguousarray(np.clip(out, 0, 1), dtype=np.float32)


def rotate_quarter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` turned by 90, 180 or 270 degrees (drawn from ``rng``): a ``rotated`` picture for the gate."""
    return np.ascontiguousarray(np.rot90(image, int(rng.integers(1, 4))))


def not_frontal_split(path: str, test: float, seed: int) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Not-frontal files per kind (``lateral``, ``other_modality``), split by patient into train and test."""
    base = Path(path).resolve().parent
    rows = list(csv.DictReader(open(path, newline="")))
    patients = sorted({r["patient_id"] for r in rows})
    test_ids = set(np.random.default_rng(seed).permutation(patients)[:round(test * len(patients))])
    train: dict[str, list[str]] = {"lateral": [], "other_modality": []}
    held: dict[str, list[str]] = {"lateral": [], "other_modality": []}
    for r in rows:
        kind = "lateral" if r["kind"] == "lateral" else "other_modality"
        (held if r["patient_id"] in test_ids else train)[kind].append(str(base / r["path"]))
    return train, held


class _Featurizer:
    """Encoder features + extras of decoded images, in batches, through the segmenter's own preprocessing."""

    def __init__(self, seg: LungSegmenter):
        self.seg = seg

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray], infos: list[ImageInfo | None]) -> tuple[np.ndarray, np.ndarray]:
        feats = []
        for start in range(0, len(images), 64):
            chunk = images[start:start + 64]
            x = self.seg.preprocess.to_tensor(torch.from_numpy(np.stack([self.seg.preprocess.prepare(im) for im in chunk])))
            feats.append(self.seg.net.encode(x)[2].numpy())  # the decoder (lung map) is not needed here
        extra = np.stack([extras(im.shape, info) for im, info in zip(images, infos)])
        return np.concatenate(feats), extra


def _decode(sources: Iterable[str | bytes]) -> list[tuple[np.ndarray, ImageInfo]]:
    out = []
    for src in sources:
        try:
            out.append(read_image(src))
        except ImageError as e:  # pydicom's test files include broken ones on purpose
            log.debug("gate: skipping %s", e)
    return out


def _features(featurize: _Featurizer, decoded: list[tuple[np.ndarray, ImageInfo]], copies: int, rng: np.random.Generator,
              transform=None) -> tuple[np.ndarray, np.ndarray]:
    """Features of ``copies`` versions of every image: the first plain (or ``transform``-ed), the rest augmented."""
    images, infos = [], []
    for image, info in decoded:
        for c in range(copies):
            im = transform(image, rng) if transform else image
            images.append(im if c == 0 else _augment(im, rng))
            infos.append(info)
    return featurize(images, infos)


def train_gate(cfg: GateConfig) -> dict:
    """Fit the gate head and its threshold; write gate.safetensors and the gate section of segmenter.json."""
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    seg = LungSegmenter(cfg.segmenter)
    featurize = _Featurizer(seg)
    t0 = time.perf_counter()
    cxr = load_samples(cfg.covid_cxr, cfg.splits)
    jsrt_split = seg.meta["split"]
    jsrt_base = Path(cfg.jsrt).resolve().parent
    jsrt = {row["path"]: row for row in csv.DictReader(open(cfg.jsrt, newline=""))}

    def frontal(split: str, limit: int | None = None) -> list[str]:
        paths = [str(s.path) for s in cxr if s.split == split]
        if limit and len(paths) > limit:
            paths = list(rng.choice(paths, limit, replace=False))
        return paths + [str(jsrt_base / p) for p in jsrt if Path(p).name in set(jsrt_split[split])]

    nf_train, nf_test = not_frontal_split(cfg.not_frontal, cfg.nf_test, cfg.seed)
    train_neg, test_neg = list(all_items(held_out=False, seed=cfg.seed)), list(all_items(held_out=True, seed=cfg.seed))
    sets: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {k: [] for k in GATE_CLASSES}
    log.info("gate: decoding and featurising training pictures")
    front = _decode(tqdm(frontal("train", cfg.frontal_limit), desc="gate frontal", leave=False))
    sets["frontal"].append(_features(featurize, front, 2, rng))
    sets["rotated"].append(_features(featurize, [front[i] for i in rng.permutation(len(front))[:600]], 2, rng, rotate_quarter))
    for kind in ("lateral", "other_modality"):
        sets[kind].append(_features(featurize, _decode(nf_train[kind]), 25, rng))
    for kind in ("other", "other_modality"):
        sets[kind].append(_features(featurize, _decode(src for _, k, src in train_neg if k == kind), 8, rng))
    x = {k: (np.concatenate([f for f, _ in v]), np.concatenate([e for _, e in v])) for k, v in sets.items()}
    feats = torch.from_numpy(np.concatenate([f for f, _ in x.values()])).float()
    extra = torch.from_numpy(np.concatenate([e for _, e in x.values()])).float()
    y = torch.cat([torch.full((len(x[k][0]),), i) for i, k in enumerate(GATE_CLASSES)])
    counts = Counter(y.tolist())
    log.info("gate: training on %s", {GATE_CLASSES[k]: n for k, n in sorted(counts.items())})
    head = GateHead(cfg.hidden)
    weight = torch.tensor([len(y) / (len(GATE_CLASSES) * counts[i]) for i in range(len(GATE_CLASSES))], dtype=torch.float32)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-3)
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        head.train()
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), 256):
            idx = order[start:start + 256]
            loss = F.cross_entropy(head(feats[idx], extra[idx]), y[idx], weight=weight, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()

    def p_frontal(decoded: list[tuple[np.ndarray, ImageInfo]], transform=None) -> np.ndarray:
        if not decoded:
            return np.zeros(0)
        f, e = _features(featurize, decoded, 1, rng, transform)
        with torch.no_grad():
            return torch.softmax(head(torch.from_numpy(f).float(), torch.from_numpy(e).float()), 1)[:, 0].numpy()

    val = p_frontal(_decode(frontal("val")))
    threshold = float(min(0.5, np.quantile(val, 1 - cfg.keep)))
    test_front = _decode(frontal("test"))
    groups = {
        "frontal films, covid-cxr test split + JSRT test patients (answered)": (p_frontal(test_front), True),
        "the same films turned 90/180/270 degrees (refused)": (p_frontal(test_front[:300], rotate_quarter), False),
        "lateral films, held-out patients (refused)": (p_frontal(_decode(nf_test["lateral"])), False),
        "CT slices, held-out patients (refused)": (p_frontal(_decode(nf_test["other_modality"])), False),
        "held-out package images and generated pictures (refused)": (p_frontal(_decode(s for _, _, s in test_neg)), False),
    }
    metrics = {name: {"n": int(len(p)), "rate": float(((p >= threshold) if answered else (p < threshold)).mean()) if len(p) else None}
               for name, (p, answered) in groups.items()}
    for name, m in metrics.items():
        log.info("gate: %s: %s of %d", name, f"{m['rate']:.3f}" if m["rate"] is not None else "n/a", m["n"])
    blob = st_save({k: v.detach().contiguous().clone() for k, v in head.state_dict().items()})
    gate = {"weights_file": "gate.safetensors", "sha256": hashlib.sha256(blob).hexdigest(), "classes": list(GATE_CLASSES),
            "hidden": cfg.hidden, "threshold": threshold, "threshold_rule": f"{cfg.keep:.1%} of validation films pass",
            "train_counts": {GATE_CLASSES[k]: n for k, n in sorted(counts.items())}, "test": metrics,
            "config": asdict(cfg), "train_seconds": time.perf_counter() - t0}
    folder = Path(cfg.segmenter) if Path(cfg.segmenter).is_dir() else Path(cfg.segmenter).parent
    atomic_write_bytes(folder / "gate.safetensors", blob)
    atomic_write_json(folder / "segmenter.json", {**seg.meta, "gate": gate})
    return gate
