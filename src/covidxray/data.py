"""Datasets: read labelled chest X-rays from a folder tree or a CSV manifest, split them, check them.

Two layouts are understood:

* the folder tree of the reference project, ``ROOT/{train,val,test}/{covid,normal}/...`` (or just
  ``ROOT/{covid,normal}/...`` with no split), class and split folder names matched
  case-insensitively with common aliases (``COVID-19``, ``Covid19``, ``NORMAL``, ``healthy``, ...);
* a CSV manifest such as ``shared/datasets/covid-cxr/manifest.csv`` with columns ``path`` and
  ``label`` and optionally ``source``, ``patient_id``, ``split`` and ``phash``; relative paths are
  resolved against the manifest's folder.

A split file is a CSV with ``path`` and ``split`` columns (paths as in the manifest); it overrides
any split the data carries. `make_splits` builds one grouped by patient and by near-duplicate
image, stratified by label x source, so no patient and no near-identical picture crosses splits.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import imagehash
import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from tqdm import tqdm

from . import CLASS_NAMES
from .errors import DataError, ImageError
from .imaging import load_image
from .utils import atomic_write_bytes, atomic_write_text, read_csv_rows

__all__ = [
    "Sample", "parse_label", "read_folder", "read_manifest", "load_samples", "data_fingerprint",
    "make_splits", "write_splits", "near_duplicate_pairs", "check_samples", "CheckResult", "show_grid",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LABEL_ALIASES = {
    "covid": 1, "covid19": 1, "covid-19": 1, "covid_19": 1, "covid 19": 1, "sars-cov-2": 1, "positive": 1, "1": 1,
    "normal": 0, "healthy": 0, "negative": 0, "no finding": 0, "no_finding": 0, "non-covid": 0, "noncovid": 0, "0": 0,
    # Another finding (tuberculosis, a nodule, ...): not COVID-19, so the negative class of the COVID-19 question.
    "other": 0,
}
SPLIT_ALIASES = {
    "train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test", "holdout": "test",
}
# Files in class folders that are never images (everything else is tried and reported if unreadable).
NOT_IMAGES = {".csv", ".txt", ".json", ".md", ".xlsx", ".xls", ".db", ".ini", ".py", ".zip"}


@dataclass(frozen=True)
class Sample:
    """One labelled X-ray. ``label`` is 1 for COVID-19 (the positive class), 0 for not COVID-19 (normal, or a
    film labelled ``other``: another finding, which is not COVID-19 either)."""

    path: Path  # absolute path of the image file
    label: int  # 1 = covid, 0 = normal
    key: str = ""  # path as written in the manifest (relative), used to join split files
    source: str = ""  # originating collection / hospital, "" when unknown
    patient_id: str = ""  # "" when the source gives none
    split: str = ""  # train / val / test, "" when unassigned
    phash: str = ""  # perceptual hash (hex) when the manifest provides it
    other: bool = False  # labelled ``other`` (another finding): label 0, but not a normal film

    @property
    def label_name(self) -> str:
        return CLASS_NAMES[self.label]  # the COVID-19 question's: a film labelled ``other`` is "normal" here


def parse_label(text: str) -> int | None:
    """Map a class name such as ``"COVID-19"`` or ``"NORMAL"`` to 1 / 0; None when unknown."""
    return LABEL_ALIASES.get(text.strip().lower())


def _files_under(folder: Path) -> list[Path]:
    # Every entry but folders: a broken symlink or a pipe where an image should be is reported by
    # `check_samples` (and skipped by training with a warning), not silently left out of the data.
    return sorted(
        p for p in folder.rglob("*")
        if not p.is_dir() and not p.name.startswith(".") and p.suffix.lower() not in NOT_IMAGES
    )


def read_folder(root: str | os.PathLike) -> list[Sample]:
    """Read ``ROOT/{split}/{class}/**`` or ``ROOT/{class}/**``; unknown folders are skipped with a warning.

    Raises:
        DataError: if the folder does not exist or holds no recognised class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    samples: list[Sample] = []

    def classes(folder: Path, split: str) -> None:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            label = parse_label(sub.name)
            if label is None:
                log.warning("%s: skipping folder %r (not a known class name)", folder, sub.name)
                continue
            for f in _files_under(sub):
                path = f.resolve() if f.exists() else f.absolute()  # a symlink loop cannot be resolved
                samples.append(Sample(path, label, key=f.relative_to(root).as_posix(), split=split))

    split_dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_ALIASES)
    if split_dirs:
        for folder in split_dirs:  # `val` and `Validation` side by side are both read
            classes(folder, SPLIT_ALIASES[folder.name.lower()])
    else:
        classes(root, "")
    if not samples:
        raise DataError(
            f"{root}: no images found. Expected ROOT/{{train,val,test}}/{{covid,normal}}/... or ROOT/{{covid,normal}}/..."
        )
    return samples


def read_manifest(csv_path: str | os.PathLike) -> list[Sample]:
    """Read a CSV manifest (``path,label[,source,patient_id,split,phash]``).

    Raises:
        DataError: naming the file and row for a missing column, an unknown label or split.
    """
    csv_path = Path(csv_path)
    base = csv_path.resolve().parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read manifest: {e}") from e
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DataError(f"{csv_path}: a manifest needs a header with at least the columns 'path' and 'label'")
    samples = []
    for i, row in enumerate(rows, start=2):
        label = parse_label(row["label"] or "")
        if label is None:
            raise DataError(f"{csv_path}, line {i}: unknown label {row['label']!r} (expected covid, normal or other)")
        split = (row.get("split") or "").strip().lower()
        if split and split not in SPLIT_ALIASES:
            raise DataError(f"{csv_path}, line {i}: unknown split {row['split']!r} (expected train, val or test)")
        p = Path(row["path"])
        samples.append(Sample(
            path=p if p.is_absolute() else base / p, label=label, key=row["path"],
            source=(row.get("source") or "").strip(), patient_id=(row.get("patient_id") or "").strip(),
            split=SPLIT_ALIASES.get(split, ""), phash=(row.get("phash") or "").strip(),
            other=row["label"].strip().lower() == "other",
        ))
    return samples


def _apply_split_file(samples: list[Sample], splits_csv: Path) -> list[Sample]:
    rows = read_csv_rows(splits_csv, {"path", "split"}, "split file")
    mapping = {}
    for i, r in enumerate(rows, start=2):
        split = SPLIT_ALIASES.get((r["split"] or "").strip().lower())
        if split is None:
            raise DataError(f"{splits_csv}, line {i}: unknown split {r['split']!r} (expected train, val or test)")
        mapping[r["path"]] = split
    missing = [s.key for s in samples if s.key not in mapping]
    if missing:
        raise DataError(
            f"{splits_csv}: {len(missing)} images of the data are not in the split file (first: {missing[0]}); "
            "make a new one with `covidxray data split`"
        )
    return [replace(s, split=mapping[s.key]) for s in samples]


def load_samples(data: str | os.PathLike, splits: str | os.PathLike | None = None) -> list[Sample]:
    """Read a dataset from a folder tree or a CSV manifest, optionally applying a split file."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: no such file or folder")
    samples = read_folder(data) if data.is_dir() else read_manifest(data)
    return _apply_split_file(samples, Path(splits)) if splits else samples


def data_fingerprint(data: str | os.PathLike, splits: str | os.PathLike | None = None) -> str:
    """SHA-256 over the manifest (or folder listing) and split file: identifies the data a model saw."""
    h = hashlib.sha256()
    data = Path(data)
    if data.is_dir():
        for s in read_folder(data):
            h.update(f"{s.key}\t{s.label}\t{s.split}\n".encode())
    else:
        h.update(data.read_bytes())
    if splits:
        h.update(Path(splits).read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Near-duplicates and splitting


def _phash_ints(samples: Sequence[Sample], compute: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """64-bit pHash of every sample as uint64 (from the manifest, else from the decoded image) and a
    mask of the samples that have one.

    Images are decoded by `load_image`, so DICOM files get a hash too and a pipe, a bomb or a
    broken file is refused with the same limits as everywhere else.
    """
    out = np.zeros(len(samples), dtype=np.uint64)
    known = np.zeros(len(samples), dtype=bool)
    for i, s in enumerate(samples):
        if s.phash:
            out[i], known[i] = np.uint64(int(s.phash, 16)), True
        elif compute:
            try:
                gray = Image.fromarray(np.round(load_image(s.path) * 255).astype(np.uint8))
            except ImageError:  # unreadable files are reported by check_samples, not here
                continue
            out[i], known[i] = np.uint64(int(str(imagehash.phash(gray)), 16)), True
    return out, known


def near_duplicate_pairs(samples: Sequence[Sample], max_distance: int = 4, chunk: int = 512) -> list[tuple[int, int, int]]:
    """Index pairs ``(i, j, distance)``, i < j, whose pHash Hamming distance is <= ``max_distance``."""
    hashes, known = _phash_ints(samples)
    # An image without a hash is nobody's near-duplicate (a placeholder hash would pair all of them).
    index = np.flatnonzero(known)
    hashes = hashes[index]
    pairs = []
    for start in range(0, len(hashes), chunk):
        block = hashes[start:start + chunk, None] ^ hashes[None, :]
        dist = np.bitwise_count(block)
        for a, b in zip(*np.nonzero(dist <= max_distance)):
            i, j = int(index[start + a]), int(index[b])
            if i < j:
                pairs.append((i, j, int(dist[a, b])))
    return pairs


def _groups(samples: Sequence[Sample], max_distance: int) -> list[list[int]]:
    """Union-find over same-patient and near-duplicate images: each group must stay in one split."""
    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    first_of_patient: dict[tuple[str, str], int] = {}
    for i, s in enumerate(samples):
        if s.patient_id:
            union(i, first_of_patient.setdefault((s.source, s.patient_id), i))
    for i, j, _ in near_duplicate_pairs(samples, max_distance):
        union(i, j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(samples)):
        groups[find(i)].append(i)
    return list(groups.values())


def make_splits(
    samples: Sequence[Sample], fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0,
    max_distance: int = 4,
) -> list[Sample]:
    """Assign train/val/test deterministically, grouped by patient and near-duplicate, stratified by label x source.

    Groups (a patient's images, near-identical pictures) are dealt, largest first, to the split
    that is furthest below its target share in the label x source cells the group belongs to, so
    each source keeps its label mix in every split.

    Returns:
        The samples with ``split`` set.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise DataError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    rng = random.Random(seed)
    cell = [(s.label, s.source) for s in samples]
    total = Counter(cell)
    have: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    groups = _groups(samples, max_distance)
    rng.shuffle(groups)
    groups.sort(key=len, reverse=True)  # stable: equal sizes keep the shuffled order
    split_of = [""] * len(samples)
    for g in groups:
        # The split furthest below its target share, summed over the label x source cells the group
        # touches (relative to each cell's size, so a cell of 6 images weighs as much as one of 4000).
        def shortfall(k: int) -> float:
            return sum((fractions[k] * total[cell[i]] - have[cell[i]][k]) / total[cell[i]] for i in g)

        k = max(range(3), key=lambda k: (shortfall(k), -k))
        for i in g:
            have[cell[i]][k] += 1
            split_of[i] = SPLITS[k]
    return [replace(s, split=split_of[i]) for i, s in enumerate(samples)]


def write_splits(path: str | os.PathLike, samples: Iterable[Sample]) -> None:
    """Write ``path,split`` rows atomically."""
    lines = ["path,split"] + [f"{s.key},{s.split}" for s in samples]
    atomic_write_text(path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Checking


@dataclass
class CheckResult:
    """What `check_samples` found. ``ok`` is False when anything is unreadable or leaks across splits."""

    counts: Counter = field(default_factory=Counter)  # (split, label_name, source) -> n
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    patient_leaks: list[tuple[str, list[str]]] = field(default_factory=list)  # (patient, splits)
    duplicate_leaks: list[tuple[str, str, int]] = field(default_factory=list)  # (path_a, path_b, distance)

    @property
    def leaks(self) -> bool:
        return bool(self.patient_leaks or self.duplicate_leaks)


def check_samples(samples: Sequence[Sample], max_distance: int = 4, read_images: bool = True) -> CheckResult:
    """Count images per split x label x source, try to read each one, and look for leakage across splits."""
    res = CheckResult(counts=Counter((s.split or "-", s.label_name, s.source or "-") for s in samples))
    if read_images:
        for s in tqdm(samples, desc="reading images", unit="img", leave=False):
            try:
                load_image(s.path)
            except ImageError as e:
                res.unreadable.append((str(s.path), e.reason))
    splits_of: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s in samples:
        if s.patient_id and s.split:
            splits_of[(s.source, s.patient_id)].add(s.split)
    res.patient_leaks = [(f"{src}/{pid}", sorted(sp)) for (src, pid), sp in sorted(splits_of.items()) if len(sp) > 1]
    if any(s.split for s in samples):
        res.duplicate_leaks = [
            (str(samples[i].key), str(samples[j].key), d)
            for i, j, d in near_duplicate_pairs(samples, max_distance)
            if samples[i].split != samples[j].split
        ]
    return res


def show_grid(samples: Sequence[Sample], out: str | os.PathLike, per_class: int = 8, seed: int = 0) -> Path:
    """Draw a labelled grid of random X-rays of each class (the reference's sample picture) to a PNG."""
    rng = random.Random(seed)
    rows = []
    for label in (1, 0):
        pool = [s for s in samples if s.label == label]
        rows.append(rng.sample(pool, min(per_class, len(pool))))
    cols = max(map(len, rows)) or 1
    fig = Figure(figsize=(2 * cols, 2.3 * len(rows)), dpi=100)
    for r, row in enumerate(rows):
        for c, s in enumerate(row):
            ax = fig.add_subplot(len(rows), cols, r * cols + c + 1)
            try:
                ax.imshow(load_image(s.path), cmap="gray", vmin=0, vmax=1)
            except ImageError as e:
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center", color="red")
                log.warning("%s", e)
            title = ("COVID-19" if s.label else "normal") + (f"\n{s.source}" if s.source else "")
            ax.set_title(title, fontsize=8, color="firebrick" if s.label else "navy")
            ax.axis("off")
    fig.suptitle("covidxray sample grid (top: COVID-19, the positive class; bottom: normal)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out
