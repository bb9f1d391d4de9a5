"""Running under ``torchrun``: process-group set-up, DDP wrapping, sharding and collectives.

Everything here is a no-op for a plain single process (``WORLD_SIZE`` unset or 1), so the
training engine and the CLI call these helpers unconditionally and behave exactly as before
when nobody started them with ``torchrun``.

Example:
    >>> env, device = setup("auto")          # rank 0 of 1 on a plain `python` start
    >>> env.is_main, env.world_size
    (True, 1)
"""

from __future__ import annotations

import logging
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DistEnv", "default_device", "seed_everything", "get_env", "setup", "teardown", "barrier", "main_first", "all_reduce_sum", "average_gradient", "broadcast_object",
    "wrap", "unwrap", "pad_order", "rank_seed",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when not distributed)."""

    rank: int = 0  # global rank: 0 logs, writes files and validates
    world_size: int = 1  # processes in the whole job (all nodes)
    local_rank: int = 0  # rank on this node: which GPU this process drives

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def get_env() -> DistEnv:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as set by ``torchrun``; rank 0 of 1 when unset."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    return DistEnv(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def default_device(name: str = "auto") -> torch.device:
    """``name`` as a torch device; ``"auto"`` is CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


def setup(device: str = "auto") -> tuple[DistEnv, torch.device]:
    """Join the ``torchrun`` job (once; later calls return the same answer) and pick this process's device.

    Single process: returns ``(DistEnv(), device)`` without touching ``torch.distributed``, where
    ``"auto"`` means CUDA when available. Distributed: GPU processes use ``cuda:LOCAL_RANK`` and
    NCCL, CPU processes gloo; ranks other than 0 log only errors, so one process reports.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` (or ``"cuda:N"`` for a single process).

    Returns:
        ``(env, device)``.
    """
    env = get_env()
    dev = default_device(device)
    if not env.enabled:
        return env, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        if not env.is_main:
            logging.getLogger("covidxray").setLevel(logging.ERROR)
        log.info("distributed: %d processes, backend %s", env.world_size, dist.get_backend())
    return env, dev


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if not _active():
        return
    if dist.get_backend() == "nccl":  # tell NCCL which GPU, else it guesses (and warns)
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def teardown() -> None:
    """Wait for every rank, then leave the process group (no-op when not distributed).

    Call it only on success: a rank that failed must not wait here, or the others would block in
    a collective it never joins; ``torchrun`` stops the job when a rank exits with an error.
    """
    if _active():
        barrier()  # rank 0 may still be writing the final files; nobody exits before it is done
        dist.destroy_process_group()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks (e.g. fill a disk cache once, then read it)."""
    main = get_env().is_main
    if not main:
        barrier()
    yield
    if main:
        barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum numbers over all ranks (float64); the values themselves when not distributed."""
    if not _active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def average_gradient(grad: torch.Tensor) -> torch.Tensor:
    """A gradient hook for parameters outside DDP (training-only heads): the mean of ``grad`` over all ranks."""
    grad = grad.clone()
    dist.all_reduce(grad)
    return grad / get_env().world_size


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap(model: nn.Module, env: DistEnv, device: torch.device, compiled: bool = False) -> nn.Module:
    """The module to train: DDP when distributed, then `torch.compile` when ``compiled``; ``model`` itself otherwise.

    ``model`` must already be on ``device`` with its final weights (resumed or not): DDP copies
    rank 0's parameters and buffers to the other ranks here.
    """
    if env.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compiled:
        model = torch.compile(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / `torch.compile` wrappers: its ``state_dict`` has no ``module.`` prefix."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def pad_order(order: torch.Tensor, world_size: int) -> torch.Tensor:
    """Repeat the first indices so ``len(order)`` is a multiple of ``world_size`` (as DistributedSampler does).

    With the global batch a multiple of ``world_size`` too, every step's batch then splits into
    equal per-rank slices ``batch[rank::world_size]`` and no rank ever gets an empty one.
    """
    extra = -len(order) % world_size
    return torch.cat([order, order[:extra]]) if extra else order


def rank_seed(seed: int, rank: int) -> int:
    """An independent 63-bit seed per ``(seed, rank)``, for per-rank augmentation and dropout noise."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)
