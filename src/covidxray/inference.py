"""Inference building blocks shared by training, evaluation, the audit and the `Predictor`.

* `prepare_images` decodes image files once through `Preprocess.prepare` into a uint8 tensor,
  cached on disk; `readable_images` does the same and drops (and logs) the unreadable ones.
* `predict_logits` / `predict_probs` run a model over prepared images in eval mode.
* `autocast` is the one precision switch: bf16 on GPU, a no-op on CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import __version__, distributed
from .config import settings
from .data import Sample
from .errors import ImageError
from .imaging import load_image
from .models import get_spec
from .presets import Preprocess
from .utils import atomic_write_bytes

__all__ = ["autocast", "prepare_images", "readable_images", "predict_logits", "predict_probs", "logits_and_features"]

log = logging.getLogger(__name__)


def autocast(device: torch.device):
    """bf16 autocast on GPU; a no-op on CPU, where bf16 convolutions are slower than fp32 here."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _cache_root(cfg_dir: str | os.PathLike | None) -> Path:
    return Path(cfg_dir or settings().cache or Path.home() / ".cache" / "covidxray")


def prepare_images(
    samples: Sequence[Sample], pre: Preprocess, cache_dir: str | os.PathLike | None = None, desc: str = "decoding"
) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    """Decode and prepare every image once: ``(N, size, size)`` uint8 plus ``(path, reason)`` failures.

    Unreadable images are returned as failures (and their rows are zero); callers drop or report
    them. Results are cached on disk under a key made of the files (path, size, mtime) and the
    preprocessing, so changing either decodes again. ``cache_dir=""`` turns the cache off.
    """
    def stamp(p: Path) -> list:
        st = p.stat() if p.is_file() else None
        return [str(p), st.st_size, st.st_mtime_ns] if st else [str(p)]

    key = hashlib.sha256(json.dumps([pre.to_dict(), __version__, *map(stamp, (s.path for s in samples))]).encode()).hexdigest()[:24]
    cache = _cache_root(cache_dir) / f"{key}.npz" if cache_dir != "" else None
    if cache and cache.is_file():
        try:
            with np.load(cache) as z:
                return torch.from_numpy(z["images"]), [tuple(f) for f in json.loads(str(z["failed"]))]
        except Exception:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring unreadable cache %s", cache)
    out = np.zeros((len(samples), pre.size, pre.size), dtype=np.uint8)
    failed: list[tuple[str, str]] = []

    def work(i: int) -> None:
        try:
            out[i] = pre.prepare(load_image(samples[i].path))
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
    samples: Sequence[Sample], pre: Preprocess, cache_dir: str | os.PathLike | None = None, desc: str = "decoding"
) -> tuple[list[Sample], torch.Tensor, list[tuple[str, str]]]:
    """`prepare_images`, then drop the unreadable files (each logged as a warning).

    Returns:
        ``(samples, images, failed)``: the readable samples in their order, their prepared images
        ``(N, size, size)`` uint8, and ``(path, reason)`` for each file left out.
    """
    images, failed = prepare_images(samples, pre, cache_dir, desc)
    for path, reason in failed:
        log.warning("skipping unreadable image %s: %s", path, reason)
    bad = {path for path, _ in failed}
    keep = [i for i, s in enumerate(samples) if str(s.path) not in bad]
    return [samples[i] for i in keep], images[torch.tensor(keep, dtype=torch.long)], failed


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, pre: Preprocess, batch_size: int = 128, device: torch.device | None = None,
) -> np.ndarray:
    """float32 logits ``(N, 2)`` for prepared uint8 images ``(N, S, S)``, in eval mode (the model's mode is restored)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            x = pre.to_tensor(images[start:start + batch_size]).to(device).contiguous(memory_format=torch.channels_last)
            with autocast(device):
                out.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros((0, 2), dtype=np.float32)


def predict_probs(
    model: nn.Module, images: torch.Tensor, pre: Preprocess, batch_size: int = 128, temperature: float = 1.0,
    device: torch.device | None = None,
) -> np.ndarray:
    """P(covid) for prepared uint8 images ``(N, S, S)`` after temperature scaling (see `predict_logits`)."""
    logits = torch.from_numpy(predict_logits(model, images, pre, batch_size, device))
    return torch.softmax(logits / temperature, dim=1)[:, 1].numpy()


def logits_and_features(
    model: nn.Module, arch: str, images: torch.Tensor, pre: Preprocess, batch_size: int = 128,
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N, 2)`` and pre-logit features ``(N, D)`` from one pass (the head's input, captured by a hook)."""
    head = model.get_submodule(get_spec(arch).head)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].float().flatten(1).cpu()))
    try:
        logits = predict_logits(model, images, pre, batch_size, device)
    finally:
        handle.remove()
    return logits, torch.cat(captured).numpy() if captured else np.zeros((0, 0), dtype=np.float32)

