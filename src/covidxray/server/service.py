"""The loaded model and everything that calls it: decoding in threads, batching, Grad-CAM, previews.

Concurrent requests are decoded in worker threads (the thread plan's decoders) and go through the
networks together: the segmenter and input gate in one batch (the lung crops made in the same thread), then the
classifier in another; while a network runs one batch, the next requests queue up and become its next batch (see
`Batcher`). The two networks run side by side, each call on one core, as many at once as
`covidxray.backends.thread_plan` has lanes (ONNX Runtime: one per core); under PyTorch they take turns, each on
every core.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable, Sequence

import anyio
import numpy as np
import torch
from PIL import Image

from .. import CLASS_NAMES, DISCLAIMER, POSITIVE_CLASS, __version__
from ..checkpoint import run_dir
from ..errors import CheckpointError, CovidXrayError, DataError, ImageError
from ..explain import explain as grad_cam, overlay_png
from ..gate import Verdict
from ..backends import thread_plan
from ..predictor import Predictor
from ..sites import SiteProfile, SiteRegistry
from .api_errors import ApiError, image_error
from .uploads import Upload

__all__ = ["Batcher", "Service", "fit_preview", "PREVIEW_SIDE"]

log = logging.getLogger(__name__)

PREVIEW_SIDE = 1024  # longest side of returned PNGs: a 3000 px DICOM would otherwise be megabytes of base64


class Batcher:
    """Classify the prepared images of concurrent requests together, in one model call per batch.

    There is no waiting window: the worker takes everything queued (up to ``max_batch``) as soon as
    the model is free. A lone request runs at once; under load, requests pile up while one batch
    runs and form the next: one thread hand-off and one model call for N images instead of N, and
    with more than one intra-op thread the cores are busier on a batch than on a single image.
    """

    def __init__(self, run: Callable[[Any], Sequence[Any]], max_batch: int,
                 collate: Callable[[list[Any]], Any] = np.stack):
        self._run, self._max_batch, self._collate = run, max_batch, collate
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="covidxray-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, item: Any) -> Any:
        """The result for one item: `Service`'s classifier takes a prepared uint8 image ``(S, S)`` (P(covid) and
        unfamiliarity), its gate a decoded image and its `ImageInfo` (the verdict and the lung map)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(image, future) for image, future in batch if not future.done()]  # skip timed-out callers
            if not batch:
                continue
            try:
                results = await anyio.to_thread.run_sync(self._run, self._collate([item for item, _ in batch]))
            except Exception as exc:  # handed to each waiting request, which answers 500 for it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)


class Service:
    """The loaded model and everything that calls it; one per app.

    Args:
        model: run folder, ``model.json`` or ``.onnx`` file; also where the explainer and the
            evaluation reports are looked up.
        backend: ``auto``, ``torch`` or ``onnx`` (see `Predictor`).
        predictor: an already loaded predictor (then ``model`` only locates reports and weights).
        timeout_s: the most one image may take, from upload read to answer.
        max_batch: images per model call.
        threads: intra-op threads of the model (None: the library's default).
        sites: the site registry that the ``site`` parameter names profiles in (None: the default one).
    """

    def __init__(self, model: Path | None, backend: str, predictor: Predictor | None, timeout_s: float, max_batch: int,
                 threads: int | None = None, sites: SiteRegistry | None = None):
        self.model_path, self.backend, self.predictor, self.threads = model, backend, predictor, threads
        self.sites = sites or SiteRegistry()
        self.timeout_s, self.max_batch = timeout_s, max_batch
        self.batcher: Batcher | None = None  # the classifier
        self.gate_batcher: Batcher | None = None  # the segmenter and the input gate
        # As many network calls at once as the thread plan has lanes (set when the model loads). PyTorch has one:
        # Grad-CAM registers a hook on its model, and a forward of another thread would run through it.
        self._networks = threading.BoundedSemaphore(1)
        self._explainer: tuple[Predictor, threading.Lock] | None = None
        self._explainer_init = threading.Lock()
        # Decoding beyond the thread plan's decoders only makes every request slower; queued ones wait their turn.
        self._decoders = anyio.CapacityLimiter(thread_plan().decoders)

    @property
    def ready(self) -> bool:
        return self.predictor is not None and self.batcher is not None

    async def start(self) -> None:
        if self.predictor is None:
            path, backend, threads = self.model_path, self.backend, self.threads
            self.predictor = await anyio.to_thread.run_sync(lambda: Predictor(path, backend=backend, threads=threads))
        self._networks = threading.BoundedSemaphore(self.predictor.threads.lanes)
        self.batcher = Batcher(self._classify_batch, self.max_batch)
        self.gate_batcher = Batcher(self._gate_batch, self.max_batch, collate=list)
        self.batcher.start()
        self.gate_batcher.start()
        log.info("model %s (%s backend) ready", self.predictor.name, self.predictor.backend)

    async def stop(self) -> None:
        for batcher in (self.batcher, self.gate_batcher):
            if batcher is not None:
                await batcher.stop()
        self.batcher = self.gate_batcher = None

    def model_ref(self) -> dict[str, Any]:
        p = self.loaded()
        return {"name": p.name, "version": p.meta.get("covidxray_version"), "sha256": p.meta.get("weights_sha256", ""),
                "backend": p.backend}

    def card(self) -> dict[str, Any]:
        """The model card as JSON: what the model is, how it decides, and how well it did."""
        p = self.loaded()
        meta = p.meta
        metrics: dict[str, Any] = {"val_auc": meta.get("val_auc"), "epoch": meta.get("epoch")}
        folder = run_dir(self.model_path) if self.model_path is not None else None
        for split in ("val", "test"):
            report = folder / f"eval-{split}" / "report.json" if folder else None
            if report is not None and report.is_file():
                data = json.loads(report.read_text())
                metrics[split] = {"n": data.get("n"), **{k: v.get("value") for k, v in data.get("metrics", {}).items()}}
        return {
            **self.model_ref(), "arch": meta["arch"], "input_size": p.preprocess.size, "preprocess": meta["preprocess"],
            "threshold": p.threshold, "threshold_rule": meta.get("threshold_rule"), "temperature": p.temperature,
            "class_names": list(meta.get("class_names", CLASS_NAMES)),
            "positive_class": meta.get("positive_class", POSITIVE_CLASS),
            "metrics": metrics, "data_fingerprint": meta.get("data_fingerprint"), "server_version": __version__,
            "disclaimer": DISCLAIMER,
        }

    def site(self, name: str | None) -> SiteProfile | None:
        """The onboarded site called ``name`` (None: none named); `ApiError` 400 for an unknown one, 409 for a
        profile made for other weights."""
        if not name:
            return None
        if name not in self.sites.names():
            raise ApiError(400, "unknown_site", f"no onboarded site {name!r} (onboarded: "
                                                f"{', '.join(self.sites.names()) or 'none'}); onboard it with "
                                                f"`covidxray site add {name} --normals DIR`")
        try:
            profile = self.sites.get(name, self.loaded().meta.get("weights_sha256"))
            self.loaded().watch_sites([profile])  # before its film is classified: an int8 graph re-checks near it
        except CheckpointError:
            raise ApiError(409, "site_for_other_model", f"site {name!r} was onboarded for another model's weights; "
                                                        "onboard it again for this one") from None
        except DataError as e:  # the server's registry is broken, not the request: the log names the file
            log.error("site %r: %s", name, e)
            raise ApiError(500, "broken_site_profile", f"the profile of site {name!r} cannot be used; the server's "
                                                       "log says why") from None
        return profile

    async def classify(self, upload: Upload, explain: bool = False, preview: bool = False,
                       site: SiteProfile | None = None) -> dict[str, Any]:
        """Answer for one upload at ``site``'s threshold (None: the model's, "site not onboarded"); raises `ApiError`
        for bad input, timeouts and an unready model."""
        predictor = self.loaded()
        start = time.perf_counter()
        try:
            with anyio.fail_after(self.timeout_s):
                image, checked = await self._check(upload)
                if isinstance(checked, Verdict):  # not a frontal chest X-ray: no answer, and nothing to explain
                    answer = predictor.refuse(upload.name, checked, site=site)
                    explain = False
                else:
                    prob, unfamiliar, features = await self.batcher.submit(checked)
                    answer = predictor.decide(upload.name, prob, unfamiliar, site, features)
                extra = await self._in_thread(self._pictures, image, explain, preview) if explain or preview else {}
        except TimeoutError:
            raise ApiError(504, "timeout", f"{upload.name}: no answer within {self.timeout_s:g} s; try again later") from None
        return {"filename": upload.name, **{k: v for k, v in answer.to_dict().items() if k != "path"},
                "positive_class": POSITIVE_CLASS, "model": self.model_ref(),
                "timing_ms": round(1000 * (time.perf_counter() - start), 2), **extra, "disclaimer": DISCLAIMER}

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        # Abandoned on timeout: the request answers at once, the thread finishes in the background.
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._decoders, abandon_on_cancel=True)

    async def _check(self, upload: Upload) -> tuple[np.ndarray, np.ndarray | Verdict]:
        """The decoded image, and its network input or the input gate's refusal (`Predictor.check`, the gate batched)."""
        image, info = await self._in_thread(self._decode, upload)
        return image, await self.gate_batcher.submit((image, info))

    def _decode(self, upload: Upload) -> tuple[np.ndarray, Any]:
        try:
            return self.loaded().read(upload.data, name=upload.name)
        except ImageError as exc:
            raise image_error(exc) from None

    def _gate_batch(self, items: list[tuple[np.ndarray, Any]]) -> list[np.ndarray | Verdict]:
        """The input gate's refusal or the network input of each decoded image (one segmenter call, then the crops in
        the same thread: a hop less per request than cropping in a decoder's)."""
        with self._networks:
            return self.loaded().check_many([image for image, _ in items], [info for _, info in items])

    def _classify_batch(self, prepared: np.ndarray) -> list[tuple[float, float | None, np.ndarray | None]]:
        """``(P(covid), unfamiliarity, features)`` per prepared image, from one model call."""
        with self._networks:
            probs, unfamiliar, feats = self.loaded().score(torch.from_numpy(prepared), batch_size=len(prepared))
        return [(float(p), None if unfamiliar is None else float(unfamiliar[k]), None if feats is None else feats[k])
                for k, p in enumerate(probs)]

    def _pictures(self, image: np.ndarray, explain: bool, preview: bool) -> dict[str, str]:
        out = {}
        small = fit_preview(image)
        if explain:
            predictor, lock = self._explain_model()
            with lock:
                _, cam = grad_cam(predictor, image)
            out["heatmap_png"] = base64.b64encode(overlay_png(small, fit_preview(cam, small.shape))).decode("ascii")
        if preview:
            buf = io.BytesIO()
            Image.fromarray((small * 255).round().astype(np.uint8)).save(buf, format="PNG")
            out["preview_png"] = base64.b64encode(buf.getvalue()).decode("ascii")
        return out

    def _explain_model(self) -> tuple[Predictor, threading.Lock | threading.Semaphore]:
        """The torch model for Grad-CAM: the serving model itself, or (ONNX) the torch weights beside it, loaded once."""
        predictor = self.loaded()
        if predictor.model is not None:
            return predictor, self._networks
        with self._explainer_init:
            if self._explainer is None:
                path = predictor.folder  # the serving graph's folder holds the PyTorch weights too
                try:
                    self._explainer = (Predictor(path, backend="torch"), threading.Lock())
                except CovidXrayError as exc:
                    raise ApiError(503, "explain_unavailable", f"Grad-CAM needs the PyTorch weights: {exc}") from None
                log.info("loaded the PyTorch model for Grad-CAM")
        return self._explainer

    def loaded(self) -> Predictor:
        """The loaded predictor; `ApiError` 503 while the app is still starting (or has stopped)."""
        if not self.ready:
            raise ApiError(503, "not_ready", "the model is not loaded yet; retry when /readyz answers 200")
        return self.predictor


def fit_preview(a: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``a`` (float ``H x W``) resized to ``shape``, or shrunk to at most `PREVIEW_SIDE` px on its longest side."""
    h, w = a.shape
    if shape is None:
        scale = PREVIEW_SIDE / max(h, w)
        if scale >= 1:
            return a
        shape = (max(1, round(h * scale)), max(1, round(w * scale)))
    if shape == a.shape:
        return a
    resized = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32)).resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized), 0, 1)
