"""Errors the API answers with: ``{"error": {"code", "message", "request_id"}}`` and an HTTP status."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from fastapi.responses import JSONResponse

from ..errors import ImageError

__all__ = ["ApiError", "error_body", "error_response", "image_error", "current_request_id"]

# The current request's ID, set by `covidxray.server.middleware.RequestContext`; "-" outside a request.
current_request_id: ContextVar[str] = ContextVar("covidxray_request_id", default="-")


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": current_request_id.get()}}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err.code, err.message), status_code=err.status, headers=err.headers)


def image_error(exc: ImageError) -> ApiError:
    """415 for bytes that are no image format at all, 422 for an image that cannot be used."""
    if exc.code == "not_an_image":
        return ApiError(415, "unsupported_media_type", str(exc))
    return ApiError(422, "unreadable_image", str(exc))
