"""ASGI middleware: a request ID for every request, one access-log line, and a JSON 500 for the unexpected."""

from __future__ import annotations

import logging
import re
import time
import uuid

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .api_errors import current_request_id, error_body

__all__ = ["RequestContext", "supervisor_probe"]

log = logging.getLogger("covidxray.server")

_TAME_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # a client's own ID is echoed only if it is this tame
_PROBES = frozenset({"/healthz", "/readyz"})  # asked every few seconds (serve's workers' supervisor, load balancers): DEBUG


def supervisor_probe(scope: Scope) -> bool:
    """Whether a request is ``serve --workers``' health check: ``/healthz`` over a worker's Unix control socket (no
    client address). Not counted in ``/metrics``."""
    return scope.get("client") is None and scope.get("path") == "/healthz"


class RequestContext:
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
        request_id = supplied if _TAME_ID.fullmatch(supplied) else uuid.uuid4().hex
        token = current_request_id.set(request_id)
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
                response = JSONResponse(error_body("internal_error", f"internal server error (request {request_id})"), 500)
                await response(scope, counting_receive, send_with_id)
        finally:
            log.log(logging.DEBUG if scope["path"] in _PROBES and status == 200 else logging.INFO,
                    "request_id=%s %s %s status=%d bytes_in=%d %.1f ms", request_id, scope["method"], scope["path"],
                    status, received, 1000 * (time.perf_counter() - start))
            current_request_id.reset(token)
