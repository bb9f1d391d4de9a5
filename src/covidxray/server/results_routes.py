"""``GET /v1/results``: what ``covidxray listen`` recorded, for the web page's results list (``serve --db``)."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Query
from fastapi.responses import Response

from .. import DISCLAIMER
from ..errors import ResultsError
from ..results import ResultsStore
from .api_errors import ApiError
from .schemas import ERRORS, ResultsOut

__all__ = ["results_router"]

MAX_ROWS = 1000  # per request: the page shows recent studies, not the archive


def results_router(store: ResultsStore | None) -> APIRouter:
    """The results routes; with no store (``serve`` without ``--db``) each answers a JSON 404 saying so."""
    router = APIRouter()

    def opened() -> ResultsStore:
        if store is None:
            raise ApiError(404, "no_results_database", "this server has no results database: start it with "
                                                       "`covidxray serve --db PATH` (the file `covidxray listen --db PATH` writes)")
        return store

    @router.get("/results", response_model=ResultsOut, responses={k: ERRORS[k] for k in (400, 404)})
    async def results(
        since: str | None = Query(None, description="received at or after: ISO date/time or an age such as 24h"),
        limit: int = Query(100, ge=1, le=MAX_ROWS, description="newest N instances"),
    ) -> dict[str, Any]:
        """Instances the DICOM listener classified, newest first: UIDs, times, label or reason, P(COVID-19). No patient data."""
        db = opened()

        def read() -> list[dict[str, Any]]:
            rows = db.recent(since=since, limit=limit)
            with_map = db.has_heatmaps(r.sop_instance_uid for r in rows)
            return [{**r.to_dict(), "heatmap": r.sop_instance_uid in with_map} for r in rows]

        try:
            rows = await anyio.to_thread.run_sync(read)
        except ResultsError as exc:  # a bad --since
            raise ApiError(400, "invalid_request", str(exc)) from None
        return {"results": rows, "disclaimer": DISCLAIMER}

    # The UID travels in the query string, which the access log leaves out (the path is logged).
    @router.get("/results/heatmap", response_class=Response,
                responses={200: {"content": {"image/png": {}}, "description": "Grad-CAM overlay"}, 404: ERRORS[404]})
    async def heatmap(sop_instance_uid: str = Query(..., max_length=64, description="the instance's SOP Instance UID")) -> Response:
        """The Grad-CAM overlay PNG the listener stored for an instance (``listen --heatmaps``)."""
        png = await anyio.to_thread.run_sync(opened().heatmap, sop_instance_uid)
        if png is None:
            raise ApiError(404, "no_heatmap", f"no heat map stored for instance {sop_instance_uid} "
                                              "(the listener stores them with --heatmaps)")
        return Response(png, media_type="image/png")

    return router
