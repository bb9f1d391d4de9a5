"""Reports over DICOMweb: STOW-RS (PS3.18 10.5), for archives that take HTTP rather than DICOM associations.

``covidxray listen --send-to-dicomweb URL`` sends each batch's structured reports (and heat map
captures) in one ``POST URL/studies`` request, ``multipart/related; type="application/dicom"``,
one DICOM file per part, and reads the archive's answer per instance: a 200 stores all, a 202 or
409 lists what failed in Failed SOP Sequence (0008,1198). Only the standard library is used.
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Sequence

from pydicom import Dataset, dcmwrite

from ..errors import DicomNodeError

__all__ = ["DicomWeb", "stow"]

_FAILED_SOP, _REFERENCED_SOP_INSTANCE = "00081198", "00081155"


@dataclass(frozen=True)
class DicomWeb:
    """A DICOMweb service root, e.g. ``http://pacs.local:8042/dicom-web`` (STOW goes to ``ROOT/studies``)."""

    root: str

    @classmethod
    def parse(cls, text: str) -> "DicomWeb":
        if not text.startswith(("http://", "https://")):
            raise DicomNodeError(f"--send-to-dicomweb {text!r}: expected the DICOMweb root URL, "
                                 "e.g. http://127.0.0.1:8042/dicom-web")
        return cls(text.rstrip("/"))

    def __str__(self) -> str:
        return self.root


def _part10(ds: Dataset) -> bytes:
    """The data set as a DICOM file (preamble, file meta), what a STOW-RS part carries."""
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def stow(datasets: Sequence[Dataset], to: DicomWeb, timeout_s: float) -> list[int | None]:
    """POST ``datasets`` to ``to``'s ``/studies``; per data set 0x0000 (stored) or None (failed).

    Raises:
        DicomNodeError: the archive could not be reached, or answered with an error for the whole request.
    """
    boundary = uuid.uuid4().hex
    body = b"".join(b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), _part10(ds))
                    for ds in datasets) + b"--%s--\r\n" % boundary.encode()
    request = urllib.request.Request(f"{to.root}/studies", data=body, method="POST", headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
        if status not in (409,):  # 409: some or all instances refused, listed in the body
            raise DicomNodeError(f"{to}: STOW-RS answered HTTP {status}") from None
    except OSError as exc:
        raise DicomNodeError(f"{to}: cannot reach the DICOMweb service ({exc})") from None
    if status == 200:
        return [0x0000] * len(datasets)
    try:
        answer = json.loads(payload or b"{}")
        failed = {item.get(_REFERENCED_SOP_INSTANCE, {}).get("Value", [None])[0]
                  for item in answer.get(_FAILED_SOP, {}).get("Value", [])}
    except (ValueError, AttributeError):
        failed = {ds.SOPInstanceUID for ds in datasets}  # an answer we cannot read: nothing counts as stored
    return [None if ds.SOPInstanceUID in failed else 0x0000 for ds in datasets]
