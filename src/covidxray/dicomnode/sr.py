"""Answering back to the PACS: a DICOM Structured Report per instance (and a Secondary Capture of the heat map).

The report is an Enhanced SR (made with highdicom) in the study of the film it is about, so a PACS
or viewer files and shows it next to that film. Its content tree:

    CONTAINER  Diagnostic imaging report (LOINC 18748-4)
      CODE     covidxray answer = COVID-19 positive / negative (model output), not answered, or not readable
      NUM      P(COVID-19)                    (when answered)
      NUM      Decision threshold             (positive at or above; the site's when onboarded)
      TEXT     Site = the onboarded site whose threshold (and own head, if it has one) decided, or "site not onboarded: ..."
      NUM      Unfamiliarity                  (when the model gives one)
      TEXT     Reason                         (when not answered or not readable)
      TEXT     Algorithm Name (DCM 111001) = model architecture@input size
      TEXT     Algorithm Version (DCM 111003) = covidxray version and weights SHA-256
      TEXT     Comment (DCM 121106) = the not-a-diagnosis statement
      IMAGE    Source (SCT 260753009) = the classified instance

Codes of covidxray's own are in the private coding scheme ``99COVIDXRAY``. The SR's (and the
heat map's) instance UIDs are derived from the source instance's UID, so a film sent twice gets
the same report, which a PACS stores once. The patient and study attributes are copied from the
film's header by highdicom: they go back to the PACS they came from and nowhere else.
"""

from __future__ import annotations

import io
import os
import re
import time
from dataclasses import dataclass
from typing import Sequence

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, Association

from .. import DISCLAIMER, __version__
from ..errors import DicomNodeError
from ..results import ResultRow
from ..sites import NOT_ONBOARDED

__all__ = ["Destination", "build_report", "build_heatmap_capture", "send_datasets", "REPORT_SERIES_NUMBER"]

SCHEME = "99COVIDXRAY"  # private coding scheme designators start with 99
REPORT_SERIES_NUMBER, HEATMAP_SERIES_NUMBER = 9900, 9901  # after the acquisition series in a viewer's list
ANSWER = Code("answer", SCHEME, "covidxray answer")
ANSWERS = {
    "covid": Code("covid", SCHEME, "COVID-19 positive (model output)"),
    "normal": Code("normal", SCHEME, "COVID-19 negative (model output)"),
    "not_answered": Code("not_answered", SCHEME, "Not answered: not a frontal chest X-ray"),
    "error": Code("error", SCHEME, "Not answered: the image could not be read"),
}
PROBABILITY = Code("probability", SCHEME, "P(COVID-19)")
THRESHOLD = Code("threshold", SCHEME, "Decision threshold")
UNFAMILIARITY = Code("unfamiliarity", SCHEME, "Unfamiliarity")
REASON = Code("reason", SCHEME, "Reason")
SITE = Code("site", SCHEME, "Site")
NO_UNITS = Code("1", "UCUM", "no units")
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # printable ASCII without backslash, at most 16


@dataclass(frozen=True)
class Destination:
    """A DICOM node to send to: ``AE@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """``ORTHANC@pacs.local:4242`` -> Destination; raises `DicomNodeError` naming what is wrong."""
        ae, at, address = text.partition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and host and port.isdigit() and 0 < int(port) < 65536):
            raise DicomNodeError(f"--send-to {text!r}: expected AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242")
        check_ae_title(ae.strip(), "--send-to")
        return cls(ae.strip(), host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def check_ae_title(title: str, what: str) -> str:
    """``title`` if it is a valid AE title (1-16 printable ASCII characters, no backslash), else `DicomNodeError`."""
    if not _AE_TITLE.fullmatch(title) or not title.strip():
        raise DicomNodeError(f"{what}: {title!r} is not an AE title (1-16 printable ASCII characters, no backslash)")
    return title


def _derived_uid(kind: str, source_uid: str) -> str:
    return generate_uid(entropy_srcs=["covidxray", kind, source_uid])


def build_report(header: Dataset, row: ResultRow) -> Dataset:
    """The Enhanced SR for one classified instance (see the module docstring for its content).

    Args:
        header: the instance's DICOM header (pixel data not needed): patient, study and UIDs.
        row: what covidxray recorded for it.

    Returns:
        The SR data set, explicit VR little endian, in the instance's study.
    """
    items: list[Dataset] = [hd.sr.CodeContentItem(ANSWER, ANSWERS[row.label], relationship_type="CONTAINS")]
    numbers = ((PROBABILITY, row.probability), (THRESHOLD, row.threshold), (UNFAMILIARITY, row.unfamiliarity))
    items += [hd.sr.NumContentItem(name, float(value), NO_UNITS, relationship_type="CONTAINS")
              for name, value in numbers if value is not None]
    how = ("P(COVID-19) from the site's own head (refitted on its normal films), decided at the site's own threshold"
           if row.site_decision == "head" else "decided at the site's own threshold")
    site = f"{row.site}: {how} {row.threshold:.4f}" if row.site and row.threshold is not None else row.site or NOT_ONBOARDED
    items.append(hd.sr.TextContentItem(SITE, site[:1024], relationship_type="CONTAINS"))
    if row.reason:
        text = f"{row.reason}: {row.message}" if row.message else row.reason
        items.append(hd.sr.TextContentItem(REASON, text[:1024], relationship_type="CONTAINS"))
    items += [
        hd.sr.TextContentItem(Code("111001", "DCM", "Algorithm Name"), f"covidxray {row.model or ''}".strip(),
                              relationship_type="CONTAINS"),
        hd.sr.TextContentItem(Code("111003", "DCM", "Algorithm Version"),
                              f"covidxray {__version__}; weights sha256 {row.weights_sha256 or 'unknown'}",
                              relationship_type="CONTAINS"),
        hd.sr.TextContentItem(Code("121106", "DCM", "Comment"), DISCLAIMER, relationship_type="CONTAINS"),
        hd.sr.ImageContentItem(Code("260753009", "SCT", "Source"), header.SOPClassUID, header.SOPInstanceUID,
                               relationship_type="CONTAINS"),
    ]
    root = hd.sr.ContainerContentItem(Code("18748-4", "LN", "Diagnostic imaging report"))
    root.ContentSequence = items
    return hd.sr.EnhancedSR(
        evidence=[header], content=root, series_instance_uid=_derived_uid("sr-series", header.StudyInstanceUID),
        series_number=REPORT_SERIES_NUMBER, sop_instance_uid=_derived_uid("sr", header.SOPInstanceUID),
        instance_number=1, manufacturer="covidxray", is_complete=True, series_description="covidxray result (research)",
    )


def build_heatmap_capture(header: Dataset, overlay_png: bytes) -> Dataset:
    """A Secondary Capture (RGB) of the Grad-CAM overlay, in the instance's study, for viewers that show no SR."""
    with Image.open(io.BytesIO(overlay_png)) as img:
        pixels = np.asarray(img.convert("RGB"))
    # The overlay keeps the film's geometry, so its orientation; a frontal chest film is displayed L\\F when unsaid.
    given = tuple(header.get("PatientOrientation") or ())
    return hd.sc.SCImage.from_ref_dataset(
        header, pixels, "RGB", 8, "PATIENT", patient_orientation=given if len(given) == 2 else ("L", "F"),
        series_instance_uid=_derived_uid("sc-series", header.StudyInstanceUID), series_number=HEATMAP_SERIES_NUMBER,
        sop_instance_uid=_derived_uid("sc", header.SOPInstanceUID), instance_number=1, manufacturer="covidxray", transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description="covidxray Grad-CAM heat map (research)",
    )


def send_datasets(datasets: Sequence[Dataset], to: Destination, calling_ae: str, timeout_s: float = 30) -> list[int]:
    """C-STORE ``datasets`` to ``to`` over one association; returns each one's DIMSE status (0 is success).

    Each (SOP class, transfer syntax) pair among the data sets is proposed as its own presentation
    context, and explicit and implicit VR little endian for every SOP class as well. A data set is
    sent in its own transfer syntax (nothing is transcoded).

    Raises:
        DicomNodeError: the association could not be established (refused, nothing listening, a timeout).
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))) for ds in datasets}
    contexts |= {(sop_class, syntax) for sop_class, _ in contexts for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)}
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(to.host, to.port, ae_title=to.ae_title)
    if not assoc.is_established:
        raise DicomNodeError(f"{to}: the association was refused or not answered")
    statuses = []
    try:
        for ds in datasets:
            status = c_store(assoc, ds)
            statuses.append(int(status.Status) if "Status" in status else -1)  # -1: no answer (aborted, timed out)
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def c_store(assoc: Association, dataset: Dataset | str | os.PathLike) -> Dataset:
    """``assoc.send_c_store(dataset)`` (a data set or a DICOM file), once the association's reactor thread is parked.

    pynetdicom (3.0) pauses its reactor around a C-STORE, lest the reactor take the response off the queue before
    ``send_c_store`` does, but it then waits only for a flag that the reactor sets just before its checkpoint and
    clears just after it: a reactor that has just passed the checkpoint passes for paused, may take the response and
    drop it, and the C-STORE waits out its DIMSE timeout and aborts the association (rare, and more so on an idle
    machine: `bench/c_store_race.py`). So the checkpoint is closed first, and the C-STORE waits until the
    reactor is blocked on it (``send_c_store`` opens it again when it is done). An association that is gone by then
    (aborted by the peer) gets no C-STORE and no status: an empty data set, as ``send_c_store`` answers an abort.
    """
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    # Event.wait() registers the blocked thread in its Condition's waiters (CPython); a reactor that has stopped
    # (an aborted association) never will.
    while not checkpoint._cond._waiters and assoc.is_established and assoc.is_alive():
        time.sleep(0.0002)
    if not (assoc.is_established and assoc.is_alive()):
        checkpoint.set()
        return Dataset()
    return assoc.send_c_store(dataset)
