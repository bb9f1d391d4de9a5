"""``POST /dicomweb/studies``: DICOMweb STOW-RS into the same spool, worker and result rows as ``covidxray listen``.

For senders that speak HTTP rather than DICOM associations (``serve --db DB --dicomweb-spool DIR``).
Each part of the ``multipart/related; type="application/dicom"`` request is checked and spooled
exactly as a C-STORE is (`covidxray.dicomnode.listener.Listener.accept`: size and disk checks,
fsync, then the answer), and the listener's worker classifies and records it; the answer is the
standard STOW-RS response: Referenced SOP Sequence for what was stored, Failed SOP Sequence with a
reason for what was not; 200 when all were stored, 202 when some, 409 when none. While the spool's
disk has less free space than the listener's minimum, an upload is refused whole with 503 (the
sender keeps it and retries), as new associations are.
"""

from __future__ import annotations

import io
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydicom import dcmread

from ..predictor import Predictor
from .api_errors import ApiError

if TYPE_CHECKING:
    from ..dicomnode import Listener

__all__ = ["dicomweb_router", "start_node"]

log = logging.getLogger(__name__)

_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_CANNOT_UNDERSTAND = 0xC000  # a part that is not a DICOM file with a SOP Instance UID


def start_node(results_db: str | os.PathLike, spool: str | os.PathLike, predictor: Predictor,
               sites: str | os.PathLike | None = None, send_to_dicomweb: str | None = None) -> Listener:
    """The listener's spool and worker without a DICOM port, on the server's already loaded model and site registry;
    with ``send_to_dicomweb`` (a DICOMweb root URL) a structured report per instance goes there by STOW-RS."""
    # Imported here: the DICOM stack (pynetdicom, highdicom) adds about a second to every `serve` start
    # (python -X importtime), and only --dicomweb-spool needs it.
    from ..dicomnode import Listener, ListenerConfig

    config = ListenerConfig(db=os.fspath(results_db), spool=os.fspath(spool), port=None,
                            sites=os.fspath(sites) if sites is not None else None, send_to_dicomweb=send_to_dicomweb)
    return Listener(config, predictor).start()


def _parts(content_type: str, body: bytes) -> list[bytes]:
    """The payloads of a multipart body (RFC 2046), split on its boundary."""
    found = _BOUNDARY.search(content_type)
    if not content_type.lower().startswith("multipart/related") or not found:
        raise ApiError(415, "unsupported_media_type", 'STOW-RS takes multipart/related; type="application/dicom"')
    delimiter = b"\r\n--" + found.group(1).encode()
    parts = []
    for chunk in (b"\r\n" + bytes(body)).split(delimiter)[1:]:
        if chunk.startswith(b"--"):  # the close delimiter
            break
        _, _, payload = chunk.partition(b"\r\n\r\n")
        parts.append(payload)
    return parts


def _sop(cls: str, uid: str, reason: int | None = None) -> dict[str, Any]:
    item = {"00081150": {"vr": "UI", "Value": [cls]}, "00081155": {"vr": "UI", "Value": [uid]}}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def _store(node: Listener, part: bytes, sender: str) -> tuple[dict[str, Any], bool]:
    """Spool one part; its Referenced or Failed SOP item and whether it was stored."""
    try:
        header = dcmread(io.BytesIO(part), stop_before_pixels=True)
        cls, uid = str(header.SOPClassUID), str(header.SOPInstanceUID)
    except Exception:  # noqa: BLE001 - anything pydicom cannot read is a part the archive cannot understand
        return _sop("", "", _CANNOT_UNDERSTAND), False
    status = node.accept(uid, lambda: part, sender, len(part))
    return (_sop(cls, uid), True) if status == 0 else (_sop(cls, uid, status), False)


def dicomweb_router(node: Callable[[], Listener | None], max_bytes: int) -> APIRouter:
    """The STOW-RS route; ``node()`` is the running spool and worker (None: STOW-RS not enabled)."""
    router = APIRouter()

    @router.post("/dicomweb/studies", include_in_schema=False)
    async def stow(request: Request) -> JSONResponse:
        running = node()
        if running is None:
            raise ApiError(404, "no_dicomweb", "STOW-RS is off: start `covidxray serve --db DB --dicomweb-spool DIR`")
        if running.guard.free_mb() < running.guard.min_free_mb:  # before reading a body that could not be kept
            log.warning("refused a STOW-RS upload from %s: low_disk_space", request.client.host if request.client else "-")
            raise ApiError(503, "low_disk_space", "the spool's disk is nearly full: nothing was stored; retry later",
                           headers={"Retry-After": "60"})  # what a STOW-RS client or proxy waits before retrying
        too_large = ApiError(413, "too_large", f"a STOW-RS request may hold at most {max_bytes // 2**20} MiB")
        if int(request.headers.get("content-length") or 0) > max_bytes:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():  # counted as it arrives: a chunked upload declares no length
            body += chunk
            if len(body) > max_bytes:
                raise too_large
        sender = request.client.host if request.client else "-"
        outcomes = [_store(running, part, sender) for part in _parts(request.headers.get("content-type", ""), body)]
        stored = [item for item, ok in outcomes if ok]
        failed = [item for item, ok in outcomes if not ok]
        answer: dict[str, Any] = {"00081199": {"vr": "SQ", "Value": stored}}
        if failed:
            answer["00081198"] = {"vr": "SQ", "Value": failed}
        status = 200 if not failed else 202 if stored else 409
        return JSONResponse(answer, status_code=status, media_type="application/dicom+json")

    return router
