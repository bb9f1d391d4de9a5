"""Where the listener's classifying runs: in a process of its own, or beside the receiving (a model already loaded).

``covidxray listen`` loads the model in a child process and sends it each batch. In one process, pynetdicom's
association threads and the decode, crop and answer steps (Python) take turns at one interpreter lock, and the
listener used about 1.2 of 2 cores; with the model in its own process the receiving no longer waits for it
(`bench/listener.py`). Batches cross as ``(sop_instance_uid, spooled path, received_at)`` tuples one way and
`Classified` rows the other, over multiprocessing's pipes between this program's own two processes (no file is
ever unpickled). The child is started with ``spawn`` (no threads or ONNX Runtime sessions copied by fork),
ignores Ctrl-C (the listener stops it after the batch in hand), exits when its parent is gone, and is
started again when it dies: that batch fails, goes back to the queue and is classified by the new one.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..predictor import Predictor
from ..sites import SiteMatcher, SiteRegistry
from ..utils import LOG_FORMAT
from .worker import Classified, classify_batch

__all__ = ["Loaded", "Classifier", "load"]

log = logging.getLogger(__name__)

Items = Sequence[tuple[str, Path, str]]


@dataclass
class Loaded:
    """A model ready for the listener: its sites, and the PyTorch weights for heat maps when they are made."""

    predictor: Predictor
    sites: SiteMatcher
    explainer: Predictor | None
    registry: str  # the site registry's folder, for the log

    def describe(self) -> tuple[str, list[str], str]:
        """The model's name, the onboarded sites' names and the registry's folder, for the listener's log."""
        return self.predictor.name, [p.name for p in self.sites.profiles], self.registry

    def classify(self, items: Items) -> list[Classified]:
        return classify_batch(self.predictor, items, explainer=self.explainer, sites=self.sites)


def load(predictor: Predictor | None, model: str | None, backend: str, threads: int | None, sites: str | None,
         heatmaps: bool) -> Loaded:
    """The model (``predictor``, or loaded from ``model``), the onboarded sites checked against its weights (a profile
    for other weights raises `CheckpointError`) and, with ``heatmaps``, the PyTorch model Grad-CAM needs."""
    if predictor is None:
        predictor = Predictor(model, backend=backend, threads=threads)
    registry = SiteRegistry(sites)
    matcher = SiteMatcher(registry.all(predictor.meta.get("weights_sha256")))
    predictor.watch_sites(matcher.profiles)  # int8: films near them re-checked in float
    explainer = None
    if heatmaps:  # Grad-CAM needs gradients: the PyTorch weights beside an ONNX graph
        explainer = predictor if predictor.model is not None else Predictor(model, backend="torch", threads=threads)
    return Loaded(predictor, matcher, explainer, str(registry.folder))


_HERE: Loaded | None = None  # in the child process: what `_load_here` loaded


def _load_here(parent: int, level: int, *args) -> tuple[str, list[str], str]:
    global _HERE
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), name="covidxray-parent-watch", daemon=True).start()
    logging.basicConfig(level=level, format=LOG_FORMAT)
    _HERE = load(None, *args)
    return _HERE.describe()


def _exit_with(parent: int) -> None:
    """Exit once the listener is gone (killed: nothing else tells a pool's worker, whose pipe it holds both ends of)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _classify_here(items: Items) -> list[Classified]:
    assert _HERE is not None, "the classifier process classifies only after loading"
    return _HERE.classify(items)


class Classifier:
    """Classifies batches of spooled instances: `submit` returns a future of their `Classified` rows.

    Args:
        predictor: an already loaded model, used in this process (tests, benchmarks, the REST API's STOW-RS);
            None loads ``model`` in a child process.
        model, backend, threads, sites, heatmaps: as in `load`.
    """

    def __init__(self, predictor: Predictor | None, model: str | None, backend: str, threads: int | None,
                 sites: str | None, heatmaps: bool):
        self._args = (model, backend, threads, sites, heatmaps)
        self._pool: ProcessPoolExecutor | None = None
        self.here = load(predictor, *self._args) if predictor is not None else None
        self.name, self.sites, self.registry = self.here.describe() if self.here is not None else self._start()

    def _start(self) -> tuple[str, list[str], str]:
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:  # a model that cannot be loaded raises here, in the caller's process, with its own message
            return self._pool.submit(_load_here, os.getpid(), logging.getLogger().getEffectiveLevel(),
                                     *self._args).result()
        except BaseException:
            self._pool.shutdown(cancel_futures=True)
            raise

    def submit(self, items: Items) -> Future:
        if self.here is not None:
            done: Future = Future()
            try:
                done.set_result(self.here.classify(items))
            except Exception as exc:  # noqa: BLE001 - handed to the caller as a process pool would
                done.set_exception(exc)
            return done
        assert self._pool is not None
        try:
            return self._pool.submit(_classify_here, items)
        except BrokenProcessPool:  # it died (killed, out of memory) with an earlier batch: a new one takes this
            log.error("the classifier process died; starting a new one")
            self._pool.shutdown(wait=False)
            self._start()
            return self._pool.submit(_classify_here, items)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
