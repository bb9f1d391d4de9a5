"""Backends: a network behind one call, run by PyTorch or by ONNX Runtime.

A `Runner` takes the network's named inputs (float32 tensors) and returns its outputs as float32
NumPy arrays, without gradients. `TorchRunner` wraps a PyTorch forward function; `OnnxRunner` an
exported graph (`covidxray.export`), whose bytes are checked against the hash its contract records
before a session is made. The `Predictor` (classifier) and the `LungSegmenter` (lung map and gate)
each hold one and never ask which: the exported graphs take and give the same names and shapes.

Example:
    >>> runner = OnnxRunner.load(folder / "segmenter.onnx", contract["segmenter_onnx"]["sha256"], "model.onnx.json")
    >>> lungs, gate = runner(image=x, extras=extra)
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .utils import read_verified, usable_cores

__all__ = ["Runner", "TorchRunner", "OnnxRunner", "CascadeRunner", "ThreadPlan", "near_thresholds", "onnx_file",
           "thread_plan"]


@dataclass(frozen=True)
class ThreadPlan:
    """How many threads each part of inference gets; `thread_plan` is the one place that decides it."""

    intra_op: int  # ONNX Runtime intra-op threads of every session (and torch's, when set): per network call
    decoders: int  # threads that read and decode files ahead of the networks (`Predictor.predict_paths`, the REST API)
    lanes: int = 1  # network calls that may run at once, each on ``intra_op`` threads (batches in flight)


def thread_plan(cores: int | None = None, intra_op: int | None = None, backend: str = "onnx") -> ThreadPlan:
    """The thread plan of `covidxray predict`, `serve` and `listen` on a machine with ``cores`` cores.

    ONNX Runtime: every network call on one thread (``intra_op = 1``) and ``lanes = cores`` calls at once
    (`Predictor.predict_paths` keeps that many batches going, the REST API's segmenter and classifier run side by
    side). A call spread over every core waits at each operator for its slowest thread, and on a busy machine a
    decoder often is that thread; side-by-side calls never wait for each other. Measured on 2 cores (idle, bundled
    model, 128 JPEGs): 7.4 ms of CPU per film instead of 9.5-10, 235-243 films/s instead of 172-184; one film alone
    takes 8.3 ms instead of 7.6. PyTorch (``backend="torch"``): one call at a time on every core, its own pool's way.
    Decoding runs beside the networks in ``decoders`` threads (Pillow, pydicom's codecs and NumPy release the GIL):
    two on 2 cores, half the cores on larger machines. ONNX Runtime's threads do not spin (`OnnxRunner`), so a
    decoder that wakes up finds a core. ``intra_op`` overrides the threads per call (``--threads``; it sets
    torch's threads too), and the lanes become ``cores // intra_op``.

    Processes: the Python parts around the networks (HTTP and form parsing, DICOM association handling, crops,
    answers) take turns at one interpreter lock, which kept one ``serve`` process at about 1.4 of 2 cores. So
    ``serve`` runs ``--workers`` processes (2 from two cores on), each with this plan, and ``listen`` receives in its
    own process and classifies in a child process that runs this plan (`covidxray.dicomnode.classifier`).
    """
    cores = max(1, cores or usable_cores())
    decoders = max(2, cores // 2)
    if backend != "onnx":
        return ThreadPlan(intra_op=max(1, intra_op or cores), decoders=decoders)
    intra_op = max(1, intra_op or 1)
    return ThreadPlan(intra_op=intra_op, decoders=decoders, lanes=max(1, cores // intra_op))


class Runner(ABC):
    """One network as a function: named float32 tensors in, float32 arrays out (in the network's output order)."""

    kind: str  # "torch" or "onnx": what `Predictor.backend` reports

    @abstractmethod
    def __call__(self, **inputs: torch.Tensor) -> list[np.ndarray]:
        """Run the network once on a batch; ``inputs`` by the graph's input names (``image``, ``extras``)."""


class TorchRunner(Runner):
    """A PyTorch forward function as a `Runner`; the inputs are moved to ``device`` and no gradients are kept.

    Args:
        forward: takes the inputs by name, returns a tensor or a tuple of tensors (the module in eval mode).
        device: where the network lives.
    """

    kind = "torch"

    def __init__(self, forward: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], device: torch.device):
        self.forward, self.device = forward, device

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> list[np.ndarray]:
        out = self.forward(**{name: x.to(self.device) for name, x in inputs.items()})
        return [t.float().cpu().numpy() for t in (out if isinstance(out, tuple) else (out,))]


class OnnxRunner(Runner):
    """An ONNX graph (bytes) in an ONNX Runtime CPU session as a `Runner`.

    Args:
        blob: the graph; check it first (`load` does).
        threads: intra-op threads (None: ONNX Runtime's default).
    """

    kind = "onnx"

    def __init__(self, blob: bytes, threads: int | None = None):
        import onnxruntime as ort  # heavy and only needed for the ONNX backend

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        # ONNX Runtime's threads spin for a while after each run; the lung crop, familiarity and decoding that
        # follow in PyTorch/NumPy then fight them for the cores (measured: 51 -> 19 ms per image end to end on 2 cores).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])

    @classmethod
    def load(cls, path: str | os.PathLike, sha256: str | None, recorded_in: str, threads: int | None = None) -> "OnnxRunner":
        """The graph in ``path``, if its SHA-256 is ``sha256`` as ``recorded_in`` (its contract) says; else `CheckpointError`."""
        return cls(read_verified(path, sha256, "the exported graph's bytes", recorded_in), threads)

    def __call__(self, **inputs: torch.Tensor) -> list[np.ndarray]:
        return self.session.run(None, {name: x.numpy() for name, x in inputs.items()})


def near_thresholds(probs: np.ndarray, band: float, thresholds: Iterable[float]) -> np.ndarray:
    """Which of the P(covid) ``probs`` lie closer than ``band`` to one of ``thresholds``: the films a `CascadeRunner`
    scores again with the float graph (the one rule, for serving and for `export --int8`'s choice of band)."""
    near = np.zeros(len(probs), dtype=bool)
    for t in thresholds:
        near |= np.abs(np.asarray(probs, dtype=np.float64) - t) < band
    return near


class CascadeRunner(Runner):
    """The int8 classifier graph on every film, the float one again on the films it puts near a decision.

    A film whose int8 P(covid) (``softmax(logits / temperature)[:, 1]``) lies within ``band`` of a threshold in
    play (`near_thresholds`) gets the float graph's logits and features instead, so its answer, unfamiliarity
    included, is the float graph's; the others keep the int8 graph's. Decisions then change only where int8
    moved a probability by more than ``band``; `covidxray.export` picks the band that keeps the parity limits.

    Args:
        fast: the int8 graph; exact: the float graph of the same weights (both ``image`` -> logits, features).
        band: the re-check band, in probability.
        temperature: the model's temperature.
        thresholds: the thresholds in play (the model's; `watch` adds sites').
    """

    kind = "onnx"

    def __init__(self, fast: Runner, exact: Runner, band: float, temperature: float, thresholds: Iterable[float]):
        self.fast, self.exact, self.band, self.temperature = fast, exact, float(band), float(temperature)
        self.thresholds: frozenset[float] = frozenset()
        self.heads: tuple[tuple[np.ndarray, float, float], ...] = ()
        self.watch(thresholds)
        self.scored = self.rechecked = 0  # films, since loading
        self._count = threading.Lock()  # calls run side by side (the thread plan's lanes)

    def watch(self, thresholds: Iterable[float], heads: Iterable[tuple[np.ndarray, float, float]] = ()) -> None:
        """Re-check films near these thresholds too, and films whose P(covid) under one of ``heads`` (sites' own:
        weight, bias, threshold, on the features) lies near its threshold (a new set replaces the old one whole:
        safe beside a running call)."""
        self.thresholds = self.thresholds | frozenset(float(t) for t in thresholds)
        known = {(w.tobytes(), b, t) for w, b, t in self.heads}
        self.heads = self.heads + tuple(h for h in heads if (h[0].tobytes(), h[1], h[2]) not in known)

    def __call__(self, **inputs: torch.Tensor) -> list[np.ndarray]:
        out = self.fast(**inputs)
        logits = out[0].astype(np.float64) / self.temperature
        probs = 1.0 / (1.0 + np.exp(logits[:, 0] - logits[:, 1]))  # softmax(...)[:, 1]
        near = near_thresholds(probs, self.band, self.thresholds)
        for weight, bias, threshold in self.heads if len(out) > 1 else ():
            near |= near_thresholds(1.0 / (1.0 + np.exp(-(out[1].astype(np.float64) @ weight + bias))), self.band, [threshold])
        near = np.flatnonzero(near)
        with self._count:
            self.scored, self.rechecked = self.scored + len(probs), self.rechecked + len(near)
        if len(near):
            index = torch.from_numpy(near)
            for mine, exact in zip(out, self.exact(**{name: x[index] for name, x in inputs.items()})):
                mine[near] = exact
        return out


def onnx_file(path: str | os.PathLike) -> Path | None:
    """The ONNX file for a run folder (int8 first, the fastest), ``model.json`` or ``.onnx`` path; None when there is none."""
    path = Path(path)
    if path.suffix == ".onnx":
        candidates = [path]
    elif path.is_dir():
        candidates = [path / "model.int8.onnx", path / "model.onnx"]
    else:
        candidates = [path.with_suffix(".onnx")]
    return next((c for c in candidates if c.is_file()), None)
