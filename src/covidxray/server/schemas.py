"""The API's response models (they make the OpenAPI document at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from .. import DISCLAIMER, POSITIVE_CLASS
from .uploads import RAW_TYPES

__all__ = ["ModelRef", "PredictionOut", "ErrorDetail", "ErrorOut", "BatchItemError", "BatchOut", "ResultOut", "ResultsOut",
           "ERRORS", "upload_body"]


class ModelRef(BaseModel):
    """Which model answered."""

    name: str = Field(description="architecture @ input size")
    version: str | None = Field(description="covidxray version that trained the model")
    sha256: str = Field(description="SHA-256 of the weights file")
    backend: str = Field(description="torch or onnx")


class PredictionOut(BaseModel):
    """One X-ray's answer."""

    filename: str
    label: str = Field(description="'covid' (COVID-19 positive), 'normal' (negative), or 'not_answered' (not a frontal "
                                   "chest X-ray; see reason)")
    probability: float | None = Field(None, description="P(COVID-19); absent when not answered")
    threshold: float = Field(description="label is 'covid' when probability >= threshold (the site's when onboarded)")
    reason: str | None = Field(None, description="why not answered: wrong_modality, not_chest, lateral_view, oblique_view, "
                                                 "rotated or not_chest_xray")
    message: str | None = Field(None, description="the reason not to answer, or a warning about the answer, in words")
    unfamiliarity: float | None = Field(None, description="0..1: share of validation films closer to the training films "
                                                          "than this one (above 0.99: a warning)")
    site: str | None = Field(None, description="the onboarded site whose threshold decided; null: none")
    site_onboarded: bool = Field(False, description="false: the model's default threshold applied (see note)")
    note: str | None = Field(None, description="'site not onboarded: ...' when no site profile applied; which site's own "
                                             "head gave P(COVID-19) when its site has one")
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


class ResultOut(BaseModel):
    """One instance the DICOM listener classified (see `covidxray.results.ResultRow`); no patient data."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    received_at: str = Field(description="ISO 8601, UTC")
    classified_at: str = Field(description="ISO 8601, UTC")
    label: str = Field(description="'covid' (COVID-19 positive), 'normal', 'not_answered' or 'error' (see reason)")
    reason: str | None = Field(None, description="why not answered or not readable, in a word")
    message: str | None = None
    probability: float | None = Field(None, description="P(COVID-19); null when not answered")
    threshold: float | None = None
    model: str | None = None
    weights_sha256: str | None = None
    unfamiliarity: float | None = None
    report_status: str | None = Field(None, description="the structured report sent back: sent, failed: ..., or null")
    site: str | None = Field(None, description="the onboarded site whose threshold decided; null: site not onboarded")
    site_decision: str | None = Field(None, description="'head': the site's own head gave P(COVID-19); 'threshold': "
                                                        "the model's P(COVID-19) at the site's threshold; null: no site")
    heatmap: bool = Field(description="a Grad-CAM overlay is at /v1/results/heatmap?sop_instance_uid=...")


class ResultsOut(BaseModel):
    results: list[ResultOut] = Field(description="newest first")
    disclaimer: str = DISCLAIMER


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text} for code, text in (
        (400, "malformed request, no file or an unknown site"), (401, "missing or wrong API key"),
        (404, "not found or not configured"), (409, "the site was onboarded for another model"),
        (413, "upload too large"),
        (415, "not an image or DICOM file"), (422, "corrupt or unusable image"), (503, "model not ready"),
        (504, "inference took longer than the timeout"),
    )
}


def upload_body(field: str, many: bool) -> dict[str, Any]:
    """OpenAPI request body for uploads that the endpoint reads itself (see `covidxray.server.uploads.read_files`)."""
    item = {"type": "string", "format": "binary"}
    schema = {"type": "array", "items": item} if many else item
    content = {"multipart/form-data": {"schema": {"type": "object", "required": [field], "properties": {field: schema}}}}
    if not many:  # one file may also be the whole body (`covidxray.server.uploads.RAW_TYPES`)
        content |= {t.decode(): {"schema": item} for t in RAW_TYPES}
    return {"requestBody": {"required": True, "content": content}}
