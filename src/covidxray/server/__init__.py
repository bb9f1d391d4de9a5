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
one batch, the next requests queue up and become the next batch (see `covidxray.server.service.Batcher`).

Example:
    >>> import uvicorn
    >>> uvicorn.run(create_app()  # the bundled model; or create_app("runs/mine"), host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

from .app import app_from_environment, create_app, limit_malloc_arenas

__all__ = ["app_from_environment", "create_app", "limit_malloc_arenas"]
