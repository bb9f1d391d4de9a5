"""`create_app`: the FastAPI app behind ``covidxray serve`` (routes, key check, error handlers, CORS)."""

from __future__ import annotations

import hmac
import json
import logging
import os
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import DISCLAIMER, __version__
from ..config import settings
from ..errors import CheckpointError, CovidXrayError, ImageError
from ..predictor import Predictor, default_model_path
from ..results import ResultsStore, open_results
from ..sites import SiteRegistry
from ..telemetry import Telemetry
from ..utils import LOG_FORMAT
from .api_errors import ApiError, error_body, error_response
from .dicomweb_routes import dicomweb_router, start_node
from .middleware import RequestContext
from .ops_routes import RequestMetrics, metrics_router
from .predict_routes import predict_router
from .results_routes import results_router
from .schemas import ERRORS
from .service import Service

__all__ = ["create_app", "app_from_environment", "limit_malloc_arenas", "DEFAULT_MAX_UPLOAD_BYTES", "WEB_DIR"]

WEB_DIR = Path(str(resources.files("covidxray") / "web"))  # package data, installed with the wheel
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
# The page may load nothing but its own files (no CDN); results are data: URLs, the picked file a blob: URL.
_PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
             "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def app_from_environment() -> FastAPI:
    """`create_app` as ``$COVIDXRAY_SERVE_APP`` (`covidxray.config.for_workers`) says, logging as the ``serve`` that started it: the factory each of
    ``serve --workers N``'s processes calls (uvicorn starts them; each loads the model before it takes requests)."""
    config = json.loads(settings().serve_app or "{}")
    logging.basicConfig(level=config["log_level"], format=LOG_FORMAT)
    limit_malloc_arenas()
    return create_app(**config["app"])


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
    max_batch: int = 4,
    max_batch_files: int = 16,
    threads: int | None = None,
    results_db: str | os.PathLike | None = None,
    dicomweb_spool: str | os.PathLike | None = None,
    dicomweb_send_to: str | None = None,
    sites: str | os.PathLike | None = None,
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
        max_batch: most images per model call (`covidxray.server.service.Batcher`). 4, not 8: the segmenter's and
            classifier's lanes then run at once, not in turn (`bench/load.py --max-batch`, 2 idle cores, 8 clients:
            120 against 111 requests/s, p99 93 against 107 ms; ONNX Runtime keeps ~15 MB per image of its largest batch).
        max_batch_files: most files in one ``/v1/predict/batch`` request.
        threads: intra-op threads when the app loads the model (None: torch's or ONNX Runtime's default).
        results_db: the results database ``covidxray listen`` writes (path or URL), for ``GET /v1/results``
            and the page's results list; None: those answer 404 ``no_results_database``.
        dicomweb_spool: with ``results_db``, accept DICOMweb STOW-RS at ``/dicomweb/studies`` into this spool,
            classified and recorded as ``covidxray listen`` does (`covidxray.server.dicomweb_routes`).
        dicomweb_send_to: with ``dicomweb_spool``, a DICOMweb root URL that gets a structured report per
            received instance by STOW-RS (as ``listen --send-to-dicomweb``).
        sites: the site registry folder (`covidxray.sites`) that the ``site`` parameter and STOW-RS use;
            None: ``$COVIDXRAY_SITES``, else the per-user default.

    Returns:
        The app. The model is loaded when the app starts, not here.
    """
    if max_upload_bytes is None:
        mib = settings().max_upload_mb
        max_upload_bytes = int(mib * 2**20) if mib else DEFAULT_MAX_UPLOAD_BYTES
    if api_key is None:
        api_key = settings().api_key
    api_key = api_key or None  # an empty key means no key, not a key that nobody can send
    path = Path(model) if model else (default_model_path() if predictor is None else None)
    service = Service(path, backend, predictor, timeout_s, max_batch, threads, SiteRegistry(sites))
    store = open_results(results_db) if results_db is not None else None  # a bad file fails here, before serving
    app = FastAPI(
        title="covidxray", version=__version__, lifespan=_lifespan(service, store, results_db, dicomweb_spool, dicomweb_send_to),
        description="COVID-19 detection on chest X-rays; COVID-19 is the positive class. " + DISCLAIMER,
    )
    app.state.service = service
    app.state.telemetry = telemetry = Telemetry(settings().metrics_dir)
    app.include_router(metrics_router(telemetry))
    key = Depends(_key_check(api_key))
    api = APIRouter(prefix="/v1", dependencies=[key], responses={401: ERRORS[401]})
    api.include_router(predict_router(service, max_upload_bytes, max_batch_files))
    api.include_router(results_router(store))
    app.include_router(api)
    app.include_router(dicomweb_router(lambda: getattr(app.state, "dicom_node", None), 64 * max_upload_bytes),
                       dependencies=[key])
    _add_page_routes(app, service)
    _add_error_handlers(app)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "X-Request-ID"], expose_headers=["X-Request-ID"])
    app.add_middleware(RequestMetrics, telemetry=telemetry)
    app.add_middleware(RequestContext)  # added last, so it is the outermost: every response gets the ID
    return app


def _lifespan(service: Service, store: ResultsStore | None, results_db: str | os.PathLike | None,
              dicomweb_spool: str | os.PathLike | None,
              dicomweb_send_to: str | None) -> Callable[[FastAPI], AsyncIterator[None]]:
    """Load the model when the app starts; stop the batcher and close the results database when it stops."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        node = (start_node(results_db, dicomweb_spool, service.predictor, service.sites.folder, dicomweb_send_to)
                if dicomweb_spool and results_db else None)
        app.state.dicom_node = node
        try:
            yield
        finally:
            if node is not None:
                node.stop()
            await service.stop()
            if store is not None:
                store.close()

    return lifespan


def _key_check(api_key: str | None) -> Callable[[Request], None]:
    """The ``/v1`` dependency that asks for ``api_key`` (in ``X-API-Key`` or ``Authorization: Bearer``); None: no key."""

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

    return require_key


def _add_page_routes(app: FastAPI, service: Service) -> None:
    """``/healthz``, ``/readyz``, the web page and its static files (outside ``/v1``: no key needed)."""

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        if not service.ready:
            return JSONResponse(error_body("not_ready", "the model is not loaded"), status_code=503)
        return JSONResponse({"status": "ready", "model": service.model_ref()})

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Content-Security-Policy": _PAGE_CSP})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, answered as ``{"error": {code, message, request_id}}``."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(CovidXrayError)
    async def covidxray_error(request: Request, exc: CovidXrayError) -> JSONResponse:
        status = 503 if isinstance(exc, CheckpointError) else 422 if isinstance(exc, ImageError) else 400
        return error_response(ApiError(status, type(exc).__name__, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(ApiError(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return error_response(ApiError(400, "invalid_request", where or "invalid request"))
