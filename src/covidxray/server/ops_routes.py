"""``GET /metrics`` for Prometheus, and the middleware that counts what the API answers.

Counted per request: the route template (``/v1/predict``, never the raw path, which could carry
anything), method and status, and the latency. From the answers themselves: each classified
upload by label, refusals by the input gate's reason, and every error body by its code. No
file name, header or query string reaches a metric.
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..telemetry import CONTENT_TYPE, Telemetry
from .middleware import supervisor_probe

__all__ = ["RequestMetrics", "metrics_router"]

_PREDICT_ROUTES = ("/v1/predict", "/v1/predict/batch")  # whose answers are counted by label
_MAX_PARSED = 8 * 2**20  # larger bodies are counted by status only (a batch with heat maps stays well below)


def metrics_router(telemetry: Telemetry) -> APIRouter:
    """``GET /metrics``: the process's counters in Prometheus' text format (no key: it holds no patient data)."""
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(telemetry.render(), media_type=CONTENT_TYPE)

    return router


class RequestMetrics:
    """Pure ASGI middleware feeding `Telemetry` (the body streams through untouched; a copy is read for counts)."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry):
        self.app, self.telemetry = app, telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or supervisor_probe(scope):
            await self.app(scope, receive, send)
            return
        start, status, body = time.perf_counter(), 0, bytearray()

        async def watching_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and len(body) < _MAX_PARSED:
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        finally:
            # Routers are nested (FastAPI includes them without copying routes), so a route's own path lacks its
            # prefixes: a route without parameters is labelled by the request's path, one with them by its template.
            matched = scope.get("route")
            route = ("unmatched" if matched is None else scope["path"] if not getattr(matched, "param_convertors", None)
                     else getattr(matched, "path", "unmatched"))
            self.telemetry.requests.labels(route, scope["method"], str(status or 500)).inc()
            self.telemetry.latency.labels(route).observe(time.perf_counter() - start)
            self._count_answers(route, status, bytes(body))

    def _count_answers(self, route: str, status: int, body: bytes) -> None:
        if not status:  # an exception: the outer middleware answers 500
            self.telemetry.errors.labels("internal_error").inc()
            return
        if status < 400 and route not in _PREDICT_ROUTES:
            return
        try:
            answer = json.loads(body)
        except ValueError:  # not JSON (a page, a file) or cut short
            return
        for item in answer.get("results", [answer]) if isinstance(answer, dict) else []:
            if isinstance(item.get("error"), dict):
                self.telemetry.errors.labels(str(item["error"].get("code", "unknown"))).inc()
            elif "label" in item:
                self.telemetry.answer(str(item["label"]), item.get("reason"))
