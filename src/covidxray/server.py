"""REST API and web page: ``covidxray serve`` classifies uploaded chest X-rays over HTTP.

Endpoints (COVID-19 is the positive class):

- ``POST /v1/predict`` — one image (multipart field ``file``; PNG, JPEG, BMP, TIFF, GIF or DICOM,
  recognised by content). ``?explain=true`` adds a Grad-CAM overlay (``heatmap_png``, base64 PNG),
  ``?preview=true`` a grey rendering of the decoded image (``preview_png``; browsers cannot show DICOM).
- ``POST /v1/predict/batch`` — several images (field ``files``): one result or error per file, in order.
- ``GET /v1/model`` — the model card as JSON. ``GET /healthz`` (process up), ``GET /readyz`` (model
  loaded), ``GET /`` (the web page), ``GET /docs`` (OpenAPI).

Errors are JSON ``{"error": {"code", "message", "request_id"}}`` and bad input is always a 4xx:
413 too large, 415 not an image, 422 corrupt or unusable image, 400 malformed request, 401 no or
wrong API key. Uploads stay in memory (never written to disk) and are refused as soon as they pass
the size limit; logs carry only the request ID, method, path, status, bytes and time, never a
file name or DICOM tag, because both can hold patient data.

Concurrent requests are decoded in worker threads and classified together: while the model runs
one batch, the next requests queue up and become the next batch (see `_Batcher`).

Example:
    >>> import uvicorn
    >>> uvicorn.run(create_app("models/default"), host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import logging
import os
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager, suppress
from contextvars import ContextVar
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import anyio
import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import CLASS_NAMES, POSITIVE_CLASS, __version__
from .errors import CheckpointError, CovidXrayError, ImageError
from .imaging import load_image, sniff_format
from .predictor import Predictor, default_model_path

__all__ = ["DISCLAIMER", "create_app", "limit_malloc_arenas"]

log = logging.getLogger(__name__)

DISCLAIMER = "Research software, not a medical device: this answer is not a diagnosis."
WEB_DIR = Path(__file__).with_name("web")
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
PREVIEW_SIDE = 1024  # longest side of returned PNGs: a 3000 px DICOM would otherwise be megabytes of base64
_PART_OVERHEAD = 16 * 1024  # multipart boundary and headers around each file, for the Content-Length check
_FIELD_LIMIT = 64 * 1024  # other form fields are ignored, but not read without bound
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # a client's own ID is echoed only if it is this tame
_request_id: ContextVar[str] = ContextVar("covidxray_request_id", default="-")
# The page may load nothing but its own files (no CDN); results are data: URLs, the picked file a blob: URL.
_PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
             "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# ---------------------------------------------------------------------------------------------- response models


class ModelRef(BaseModel):
    """Which model answered."""

    name: str = Field(description="architecture @ input size")
    version: str | None = Field(description="covidxray version that trained the model")
    sha256: str = Field(description="SHA-256 of the weights file")
    backend: str = Field(description="torch or onnx")


class PredictionOut(BaseModel):
    """One X-ray's answer."""

    filename: str
    label: str = Field(description="'covid' (COVID-19 positive) or 'normal' (negative)")
    probability: float = Field(description="P(COVID-19)")
    threshold: float = Field(description="label is 'covid' when probability >= threshold")
    positive_class: str = POSITIVE_CLASS
    model: ModelRef
    timing_ms: float = Field(description="server time for this image: decode, queue, model")
    heatmap_png: str | None = Field(None, description="base64 PNG: Grad-CAM overlay (explain=true)")
    preview_png: str | None = Field(None, description="base64 PNG: the decoded X-ray in grey (preview=true)")
    disclaimer: str = DISCLAIMER


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str | None = None


class ErrorOut(BaseModel):
    error: ErrorDetail


class BatchItemError(BaseModel):
    filename: str
    status: int = Field(description="the HTTP status this file alone would have got")
    error: ErrorDetail


class BatchOut(BaseModel):
    results: list[PredictionOut | BatchItemError] = Field(description="one entry per file, in upload order")
    disclaimer: str = DISCLAIMER


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text} for code, text in (
        (400, "malformed request or no file"), (401, "missing or wrong API key"), (413, "upload too large"),
        (415, "not an image or DICOM file"), (422, "corrupt or unusable image"), (503, "model not ready"),
        (504, "inference took longer than the timeout"),
    )
}


def _upload_body(field: str, many: bool) -> dict[str, Any]:
    """OpenAPI request body for uploads that the endpoint reads itself (see `_read_files`)."""
    item = {"type": "string", "format": "binary"}
    schema = {"type": "array", "items": item} if many else item
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": [field], "properties": {field: schema}}}}}}


# ---------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": _request_id.get()}}


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(_error_body(err.code, err.message), status_code=err.status, headers=err.headers)


def _image_error(exc: ImageError, data: bytes) -> ApiError:
    """415 for bytes that are no image format at all, 422 for an image that cannot be used."""
    if data and sniff_format(data[:132]) is None:
        return ApiError(415, "unsupported_media_type", str(exc))
    return ApiError(422, "unreadable_image", str(exc))


# ---------------------------------------------------------------------------------------------- uploads


class _Upload:
    """One uploaded file, in memory."""

    __slots__ = ("name", "data")

    def __init__(self, name: str, data: bytes):
        self.name, self.data = name, data


def _display_name(raw: bytes | None) -> str:
    """The client's file name, reduced to a short printable base name for messages."""
    name = (raw or b"").decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable())[:120]
    return name or "upload"


class _MultipartReader:
    """Callbacks for python-multipart's streaming parser that keep the files of one field in memory.

    Starlette's own form parsing spools files over 1 MiB to a temporary file on disk, and an X-ray
    upload must never touch the disk; here every byte is counted as it arrives and the upload is
    refused (413, naming the file) the moment one file passes the limit.
    """

    def __init__(self, field: str, max_files: int, max_bytes: int):
        self.field, self.max_files, self.max_bytes = field, max_files, max_bytes
        self.files: list[_Upload] = []
        self._headers: dict[bytes, bytes] = {}
        self._header = [b"", b""]
        self._chunks: list[bytes] = []
        self._size = 0
        self._keep = False
        self._name = ""

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self._begin, "on_header_field": self._header_field, "on_header_value": self._header_value,
                "on_header_end": self._header_end, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        self._headers, self._chunks, self._size = {}, [], 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header[0] += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._header[1] += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header[0].strip().lower()] = self._header[1].strip()
        self._header = [b"", b""]

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._keep = options.get(b"name", b"").decode("utf-8", "replace") == self.field
        self._name = _display_name(options.get(b"filename"))
        if self._keep and len(self.files) >= self.max_files:
            raise ApiError(413, "too_many_files", f"at most {self.max_files} files per request")

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._keep:
            if self._size > self.max_bytes:
                raise ApiError(413, "file_too_large", f"{self._name}: file is larger than the upload limit "
                                                      f"of {_mib(self.max_bytes)} MiB")
            self._chunks.append(data[start:end])
        elif self._size > _FIELD_LIMIT:
            raise ApiError(413, "field_too_large", f"form field is larger than {_FIELD_LIMIT // 1024} KiB")

    def _end(self) -> None:
        if self._keep:
            self.files.append(_Upload(self._name, b"".join(self._chunks)))


def _mib(n: int) -> str:
    return f"{n / 2**20:g}"


async def _read_files(request: Request, field: str, max_files: int, max_bytes: int) -> list[_Upload]:
    """The files in multipart field ``field``, streamed into memory with every limit enforced while reading.

    Raises:
        ApiError: 400 not multipart or no such field; 413 a file, the field count or the declared
            Content-Length is over the limit (the latter before any byte of the body is read).
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(400, "missing_file", f"send the image as multipart/form-data, in field '{field}'")
    limit = max_files * (max_bytes + _PART_OVERHEAD)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "request_too_large", f"the upload ({int(declared) / 2**20:.1f} MiB) is larger than the limit "
                                                 f"of {_mib(max_bytes)} MiB per file")
    reader = _MultipartReader(field, max_files, max_bytes)
    parser = MultipartParser(params[b"boundary"], reader.callbacks())
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:  # a lying or absent Content-Length
                raise ApiError(413, "request_too_large", f"the upload is larger than the limit of {_mib(max_bytes)} MiB per file")
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, "bad_multipart", f"malformed multipart/form-data body: {exc}") from None
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client closed the connection during the upload") from None
    if not reader.files:
        raise ApiError(400, "missing_file", f"no file in the upload: send the image in multipart field '{field}'")
    return reader.files


# ---------------------------------------------------------------------------------------------- inference


class _Batcher:
    """Classify the prepared images of concurrent requests together, in one model call per batch.

    There is no waiting window: the worker takes everything queued (up to ``max_batch``) as soon as
    the model is free. A lone request runs at once; under load, requests pile up while one batch
    runs and form the next: one thread hand-off and one model call for N images instead of N, and
    with more than one intra-op thread the cores are busier on a batch than on a single image.
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int):
        self._run, self._max_batch = run, max_batch
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[float]]] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="covidxray-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, prepared: np.ndarray) -> float:
        """P(covid) for one prepared uint8 image ``(S, S)``."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((prepared, future))
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
                probs = await anyio.to_thread.run_sync(self._run, np.stack([image for image, _ in batch]))
            except Exception as exc:  # handed to each waiting request, which answers 500 for it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for (_, future), prob in zip(batch, probs, strict=True):
                    if not future.done():
                        future.set_result(float(prob))


class _Service:
    """The loaded model and everything that calls it; one per app.

    Args:
        model: run folder, ``model.json`` or ``.onnx`` file; also where the explainer and the
            evaluation reports are looked up.
        backend: ``auto``, ``torch`` or ``onnx`` (see `Predictor`).
        predictor: an already loaded predictor (then ``model`` only locates reports and weights).
        timeout_s: the most one image may take, from upload read to answer.
        max_batch: images per model call.
        threads: intra-op threads of the model (None: the library's default).
    """

    def __init__(self, model: Path | None, backend: str, predictor: Predictor | None, timeout_s: float, max_batch: int,
                 threads: int | None = None):
        self.model_path, self.backend, self.predictor, self.threads = model, backend, predictor, threads
        self.timeout_s, self.max_batch = timeout_s, max_batch
        self.batcher: _Batcher | None = None
        # Grad-CAM registers a hook on the model: a forward of another thread would run through it.
        self._model_lock = threading.Lock()
        self._explainer: tuple[Predictor, threading.Lock] | None = None
        self._explainer_init = threading.Lock()
        # Decoding beyond the core count only makes every request slower; queued ones wait their turn.
        self._decoders = anyio.CapacityLimiter(max(2, os.cpu_count() or 1))

    @property
    def ready(self) -> bool:
        return self.predictor is not None and self.batcher is not None

    async def start(self) -> None:
        if self.predictor is None:
            path, backend, threads = self.model_path, self.backend, self.threads
            self.predictor = await anyio.to_thread.run_sync(lambda: Predictor(path, backend=backend, threads=threads))
        self.batcher = _Batcher(self._classify_batch, self.max_batch)
        self.batcher.start()
        log.info("model %s (%s backend) ready", self.predictor.name, self.predictor.backend)

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
            self.batcher = None

    def model_ref(self) -> dict[str, Any]:
        p = self._loaded()
        return {"name": p.name, "version": p.meta.get("covidxray_version"), "sha256": p.meta.get("weights_sha256", ""),
                "backend": p.backend}

    def card(self) -> dict[str, Any]:
        """The model card as JSON: what the model is, how it decides, and how well it did."""
        p = self._loaded()
        meta = p.meta
        metrics: dict[str, Any] = {"val_auc": meta.get("val_auc"), "epoch": meta.get("epoch")}
        run_dir = self._run_dir()
        for split in ("val", "test"):
            report = run_dir / f"eval-{split}" / "report.json" if run_dir else None
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

    async def classify(self, upload: _Upload, explain: bool = False, preview: bool = False) -> dict[str, Any]:
        """Answer for one upload; raises `ApiError` for bad input, timeouts and an unready model."""
        predictor = self._loaded()
        start = time.perf_counter()
        try:
            with anyio.fail_after(self.timeout_s):
                image, prepared = await self._in_thread(self._decode, upload)
                prob = await self.batcher.submit(prepared)
                extra = await self._in_thread(self._pictures, image, explain, preview) if explain or preview else {}
        except TimeoutError:
            raise ApiError(504, "timeout", f"{upload.name}: no answer within {self.timeout_s:g} s; try again later") from None
        answer = predictor._answer(upload.name, prob)  # the one rule for label vs threshold
        return {"filename": upload.name, "label": answer.label, "probability": answer.probability,
                "threshold": answer.threshold, "positive_class": POSITIVE_CLASS, "model": self.model_ref(),
                "timing_ms": round(1000 * (time.perf_counter() - start), 2), **extra, "disclaimer": DISCLAIMER}

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        # Abandoned on timeout: the request answers at once, the thread finishes in the background.
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._decoders, abandon_on_cancel=True)

    def _decode(self, upload: _Upload) -> tuple[np.ndarray, np.ndarray]:
        try:
            image = load_image(upload.data, name=upload.name)
        except ImageError as exc:
            raise _image_error(exc, upload.data) from None
        return image, self._loaded().preprocess.prepare(image)

    def _classify_batch(self, prepared: np.ndarray) -> np.ndarray:
        with self._model_lock:
            return self._loaded().predict_prepared(torch.from_numpy(prepared), batch_size=len(prepared))

    def _pictures(self, image: np.ndarray, explain: bool, preview: bool) -> dict[str, str]:
        from .explain import explain as grad_cam, overlay_png

        out = {}
        small = _fit(image)
        if explain:
            predictor, lock = self._explain_model()
            with lock:
                _, cam = grad_cam(predictor, image)
            out["heatmap_png"] = base64.b64encode(overlay_png(small, _fit(cam, small.shape))).decode("ascii")
        if preview:
            buf = io.BytesIO()
            Image.fromarray((small * 255).round().astype(np.uint8)).save(buf, format="PNG")
            out["preview_png"] = base64.b64encode(buf.getvalue()).decode("ascii")
        return out

    def _explain_model(self) -> tuple[Predictor, threading.Lock]:
        """The torch model for Grad-CAM: the serving model itself, or (ONNX) the torch weights beside it, loaded once."""
        predictor = self._loaded()
        if predictor.model is not None:
            return predictor, self._model_lock
        with self._explainer_init:
            if self._explainer is None:
                path = self.model_path
                if path is None:
                    raise ApiError(503, "explain_unavailable", "Grad-CAM needs the PyTorch weights and the server "
                                                               "was started without a model path")
                if path.suffix == ".onnx":
                    path = path.with_suffix(".json")
                try:
                    self._explainer = (Predictor(path, backend="torch"), threading.Lock())
                except CovidXrayError as exc:
                    raise ApiError(503, "explain_unavailable", f"Grad-CAM needs the PyTorch weights: {exc}") from None
                log.info("loaded the PyTorch model for Grad-CAM")
        return self._explainer

    def _loaded(self) -> Predictor:
        if not self.ready:
            raise ApiError(503, "not_ready", "the model is not loaded yet; retry when /readyz answers 200")
        return self.predictor

    def _run_dir(self) -> Path | None:
        if self.model_path is None:
            return None
        return self.model_path if self.model_path.is_dir() else self.model_path.parent


def _fit(a: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------- middleware


class _RequestContext:
    """Request ID, one access-log line per request, and a JSON 500 for anything unexpected.

    Pure ASGI rather than ``BaseHTTPMiddleware``, so the request body still streams through. The
    log line holds no file name, query string or header: only what cannot carry patient data.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = Headers(scope=scope).get("x-request-id", "")
        request_id = supplied if _REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
        token = _request_id.set(request_id)
        start, status, received = time.perf_counter(), 0, 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                headers["X-Content-Type-Options"] = "nosniff"
            await send(message)

        try:
            await self.app(scope, counting_receive, send_with_id)
        except Exception:
            log.exception("request_id=%s unexpected error", request_id)
            if not status:  # otherwise the response is already on its way and can only be cut
                response = JSONResponse(_error_body("internal_error", f"internal server error (request {request_id})"), 500)
                await response(scope, counting_receive, send_with_id)
        finally:
            log.info("request_id=%s %s %s status=%d bytes_in=%d %.1f ms", request_id, scope["method"], scope["path"],
                     status, received, 1000 * (time.perf_counter() - start))
            _request_id.reset(token)


# ---------------------------------------------------------------------------------------------- app


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for the rest of the process; call it before any thread starts.

    glibc gives threads their own arenas (up to 8 per core) and memory freed in one is rarely
    returned: with images decoded in worker threads, the server's memory crept up by 10-20 % a
    minute under load, and stayed flat with two arenas (``bench/load.py``). This is what
    ``MALLOC_ARENA_MAX=2`` in the environment does. Returns False where libc is not glibc.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-8, arenas))  # -8: M_ARENA_MAX in glibc's malloc.h



def create_app(
    model: str | os.PathLike | None = None,
    *,
    max_upload_bytes: int | None = None,
    api_key: str | None = None,
    predictor: Predictor | None = None,
    backend: str = "auto",
    timeout_s: float = 30.0,
    cors_origins: Sequence[str] = (),
    max_batch: int = 8,
    max_batch_files: int = 16,
    threads: int | None = None,
) -> FastAPI:
    """The covidxray web service as a FastAPI app (serve it with uvicorn).

    Args:
        model: run folder, ``model.json`` or ``.onnx`` file; None uses `default_model_path`.
        max_upload_bytes: largest accepted file; None reads ``$COVIDXRAY_MAX_UPLOAD_MB``, else 20 MiB.
        api_key: when set, ``/v1/*`` needs it in ``X-API-Key`` or ``Authorization: Bearer``; None
            reads ``$COVIDXRAY_API_KEY`` (unset or empty: no key needed).
        predictor: an already loaded `Predictor` to serve; otherwise ``model`` is loaded at start-up
            (the app's lifespan: ``/readyz`` answers 503 until then).
        backend: ``auto`` (ONNX when ``model.onnx`` exists), ``torch`` or ``onnx``.
        timeout_s: per-image limit on decode + inference; past it the answer is 504.
        cors_origins: origins allowed to call the API from a browser; empty (the default) adds no
            CORS headers at all.
        max_batch: most images per model call (see `_Batcher`). On a CPU the gain per image levels off
            around 8, while ONNX Runtime keeps memory for the largest batch it has run (about 15 MB
            per image for the bundled model), so larger batches buy memory, not speed.
        max_batch_files: most files in one ``/v1/predict/batch`` request.
        threads: intra-op threads when the app loads the model (None: torch's or ONNX Runtime's default).

    Returns:
        The app. The model is loaded when the app starts, not here.
    """
    if max_upload_bytes is None:
        env = os.environ.get("COVIDXRAY_MAX_UPLOAD_MB")
        max_upload_bytes = int(float(env) * 2**20) if env else DEFAULT_MAX_UPLOAD_BYTES
    if api_key is None:
        api_key = os.environ.get("COVIDXRAY_API_KEY")
    api_key = api_key or None  # an empty key means no key, not a key that nobody can send
    path = Path(model) if model else (default_model_path() if predictor is None else None)
    service = _Service(path, backend, predictor, timeout_s, max_batch, threads)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="covidxray", version=__version__, lifespan=lifespan,
        description="COVID-19 detection on chest X-rays; COVID-19 is the positive class. " + DISCLAIMER,
    )
    app.state.service = service

    def require_key(request: Request) -> None:
        if api_key is None:
            return
        supplied = request.headers.get("x-api-key", "")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not supplied and scheme.lower() == "bearer":
            supplied = token.strip()
        # Constant-time comparison, so response timing does not reveal how much of a guess was right.
        if not supplied or not hmac.compare_digest(supplied.encode(), api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API key: send it as the X-API-Key header "
                                                "or as Authorization: Bearer KEY", headers={"WWW-Authenticate": "Bearer"})

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], responses={401: _ERRORS[401]})

    @api.post("/predict", response_model=PredictionOut, response_model_exclude_none=True,
              openapi_extra=_upload_body("file", many=False), responses={k: _ERRORS[k] for k in (400, 413, 415, 422, 503, 504)})
    async def predict(
        request: Request,
        explain: bool = Query(False, description="add a Grad-CAM overlay (heatmap_png)"),
        preview: bool = Query(False, description="add the decoded image as a grey PNG (preview_png)"),
    ) -> dict[str, Any]:
        """Classify one chest X-ray (multipart field ``file``) as COVID-19 positive or negative."""
        service._loaded()  # 503 before reading an upload that could not be classified anyway
        upload, = await _read_files(request, "file", 1, max_upload_bytes)
        return await service.classify(upload, explain=explain, preview=preview)

    @api.post("/predict/batch", response_model=BatchOut, response_model_exclude_none=True,
              openapi_extra=_upload_body("files", many=True), responses={k: _ERRORS[k] for k in (400, 413, 503)})
    async def predict_batch(request: Request) -> dict[str, Any]:
        """Classify several X-rays (multipart field ``files``); one result or error per file, in order."""
        service._loaded()
        uploads = await _read_files(request, "files", max_batch_files, max_upload_bytes)

        async def one(upload: _Upload) -> dict[str, Any]:
            try:
                return await service.classify(upload)
            except ApiError as err:  # this file's problem, not the others'
                return {"filename": upload.name, "status": err.status, "error": _error_body(err.code, err.message)["error"]}

        return {"results": list(await asyncio.gather(*(one(u) for u in uploads))), "disclaimer": DISCLAIMER}

    @api.get("/model")
    async def model_card() -> dict[str, Any]:
        """The model card: architecture, input size, threshold, temperature, metrics, classes."""
        return service.card()

    app.include_router(api)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        if not service.ready:
            return JSONResponse(_error_body("not_ready", "the model is not loaded"), status_code=503)
        return JSONResponse({"status": "ready", "model": service.model_ref()})

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Content-Security-Policy": _PAGE_CSP})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(CovidXrayError)
    async def covidxray_error(request: Request, exc: CovidXrayError) -> JSONResponse:
        status = 503 if isinstance(exc, CheckpointError) else 422 if isinstance(exc, ImageError) else 400
        return _error_response(ApiError(status, type(exc).__name__, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(ApiError(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return _error_response(ApiError(400, "invalid_request", where or "invalid request"))

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "X-Request-ID"], expose_headers=["X-Request-ID"])
    app.add_middleware(_RequestContext)  # added last, so it is the outermost: every response gets the ID
    return app
