"""``POST /v1/predict``, ``POST /v1/predict/batch`` and ``GET /v1/model``: the model's routes."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query, Request

from .. import DISCLAIMER
from .api_errors import ApiError, error_body
from .schemas import ERRORS, BatchOut, PredictionOut, upload_body
from .service import Service
from .uploads import Upload, read_files

__all__ = ["predict_router"]

SITE_HELP = ("the onboarded site the film comes from (`covidxray site add`): its threshold decides; without it the "
             "model's default threshold applies and the answer says 'site not onboarded'")


def predict_router(service: Service, max_upload_bytes: int, max_batch_files: int) -> APIRouter:
    """The routes that classify uploads and describe the model, answered by ``service``.

    Args:
        service: the app's loaded model.
        max_upload_bytes: largest accepted file (413 past it, while reading).
        max_batch_files: most files in one ``/predict/batch`` request.
    """
    router = APIRouter()

    @router.post("/predict", response_model=PredictionOut, response_model_exclude_none=True,
                 openapi_extra=upload_body("file", many=False),
                 responses={k: ERRORS[k] for k in (400, 409, 413, 415, 422, 503, 504)})
    async def predict(
        request: Request,
        explain: bool = Query(False, description="add a Grad-CAM overlay (heatmap_png)"),
        preview: bool = Query(False, description="add the decoded image as a grey PNG (preview_png)"),
        site: str | None = Query(None, description=SITE_HELP),
        filename: str | None = Query(None, description="the film's name in the answer, for a raw request body"),
    ) -> dict[str, Any]:
        """Classify one chest X-ray (multipart field ``file``, or the raw body as image/png, image/jpeg,
        application/dicom or application/octet-stream) as COVID-19 positive or negative."""
        service.loaded()  # 503 before reading an upload that could not be classified anyway
        profile = service.site(site)  # an unknown site is refused before the upload is read
        upload, = await read_files(request, "file", 1, max_upload_bytes, name=filename)
        return await service.classify(upload, explain=explain, preview=preview, site=profile)

    @router.post("/predict/batch", response_model=BatchOut, response_model_exclude_none=True,
                 openapi_extra=upload_body("files", many=True), responses={k: ERRORS[k] for k in (400, 409, 413, 503)})
    async def predict_batch(request: Request, site: str | None = Query(None, description=SITE_HELP)) -> dict[str, Any]:
        """Classify several X-rays (multipart field ``files``); one result or error per file, in order."""
        service.loaded()
        profile = service.site(site)
        uploads = await read_files(request, "files", max_batch_files, max_upload_bytes)

        async def one(upload: Upload) -> dict[str, Any]:
            try:
                return await service.classify(upload, site=profile)
            except ApiError as err:  # this file's problem, not the others'
                return {"filename": upload.name, "status": err.status, "error": error_body(err.code, err.message)["error"]}

        return {"results": list(await asyncio.gather(*(one(u) for u in uploads))), "disclaimer": DISCLAIMER}

    @router.get("/model")
    async def model_card() -> dict[str, Any]:
        """The model card: architecture, input size, threshold, temperature, metrics, classes."""
        return service.card()

    return router
