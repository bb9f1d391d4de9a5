"""The decode-once cache of a data set's images, for training, evaluation, the audit and int8 calibration.

`prepare_images` decodes image files once through `Preprocess.prepare` into a uint8 tensor,
cached on disk; `readable_images` does the same and drops (and logs) the unreadable ones.
Serving never reads data sets, so this sits with the training data (`covidxray.data`), not with
the model-call helpers in `covidxray.inference` that the `Predictor` uses.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from . import __version__, distributed
from .config import settings
from .data import Sample
from .errors import ImageError
from .imaging import load_image
from .presets import Preprocess
from .utils import atomic_write_bytes

__all__ = ["prepare_images", "readable_images"]

log = logging.getLogger(__name__)


def _cache_root(cfg_dir: str | os.PathLike | None) -> Path:
    return Path(cfg_dir or settings().cache or Path.home() / ".cache" / "covidxray")


def prepare_images(
    samples: Sequence[Sample], pre: Preprocess, cache_dir: str | os.PathLike | None = None, desc: str = "decoding",
    views: int = 1, shift: float = 0.0,
) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Decode and prepare every image once: ``(N, size, size)`` uint8 plus ``(path, reason)`` failures.

    With ``views > 1`` (and a lung crop): ``(N, views, size, size)``, the first view at the lungs' own box, the others
    at boxes moved on the film (`Preprocess.prepare_moved`: by up to ``shift`` of the box's size, margin 0.5-1.5x), drawn from a
    generator seeded by the file's path, so the same files give the same views.

    Unreadable images are returned as failures (and their rows are zero); callers drop or report
    them. Results are cached on disk under a key made of the files (path, size, mtime) and the
    preprocessing, so changing either decodes again. ``cache_dir=""`` turns the cache off.
    """
    def stamp(p: Path) -> list:
        st = p.stat() if p.is_file() else None
        return [str(p), st.st_size, st.st_mtime_ns] if st else [str(p)]

    views_key = [[views, shift]] if views > 1 else []  # one view: the keys of caches made before views existed
    key = hashlib.sha256(json.dumps([pre.to_dict(), __version__, *views_key, *map(stamp, (s.path for s in samples))]
                                    ).encode()).hexdigest()[:24]
    cache = _cache_root(cache_dir) / f"{key}.npz" if cache_dir != "" else None
    if cache and cache.is_file():
        try:
            with np.load(cache) as z:
                return torch.from_numpy(z["images"]), [tuple(f) for f in json.loads(str(z["failed"]))]
        except Exception:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable cache %s", cache)
    out = np.zeros((len(samples), *([views] if views > 1 else []), pre.size, pre.size), dtype=np.uint8)
    failed: list[tuple[str, str]] = []

    def work(i: int) -> None:
        try:
            image = load_image(samples[i].path)
            if views == 1:
                out[i] = pre.prepare(image)
                return
            rng = np.random.default_rng(zlib.crc32(str(samples[i].path).encode()))
            out[i] = pre.prepare_moved(image, [(tuple(rng.uniform(-shift, shift, 2)), rng.uniform(0.5, 1.5))
                                               for _ in range(views - 1)])
        except ImageError as e:
            failed.append((str(samples[i].path), e.reason))

    # Pillow releases the GIL while decoding, so two threads keep both cores busy.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(tqdm(pool.map(work, range(len(samples))), total=len(samples), desc=desc, unit="img", leave=False,
                  disable=not distributed.get_env().is_main))
    if cache:
        buf = io.BytesIO()
        np.savez(buf, images=out, failed=np.array(json.dumps(sorted(failed))))
        atomic_write_bytes(cache, buf.getvalue())
    return torch.from_numpy(out), sorted(failed)


def readable_images(
    samples: Sequence[Sample], pre: Preprocess, cache_dir: str | os.PathLike | None = None, desc: str = "decoding",
    views: int = 1, shift: float = 0.0,
) -> tuple[list[Sample], torch.Tensor, list[tuple[str, str]]]:
    """`prepare_images`, then drop the unreadable files (each logged as a warning).

    Returns:
        ``(samples, images, failed)``: the readable samples in their order, their prepared images
        ``(N, size, size)`` uint8 (``(N, views, size, size)`` with views), and ``(path, reason)`` for each file left out.
    """
    images, failed = prepare_images(samples, pre, cache_dir, desc, views, shift)
    for path, reason in failed:
        log.warning("skipping unreadable image %s: %s", path, reason)
    bad = {path for path, _ in failed}
    keep = [i for i, s in enumerate(samples) if str(s.path) not in bad]
    return [samples[i] for i in keep], images[torch.tensor(keep, dtype=torch.long)], failed
