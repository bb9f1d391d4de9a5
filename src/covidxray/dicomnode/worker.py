"""From spooled files to result rows: headers, one batched model call, heat maps when asked.

`classify_batch` is the pure part (files in, rows out) that the listener's worker thread calls; `take` makes
the batches from its queue. The threads, queues and the database live in `covidxray.dicomnode.listener`.
"""

from __future__ import annotations

import logging
import queue
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
from PIL import Image
from pydicom import Dataset

from ..errors import ImageError
from ..explain import explain, overlay_png
from ..imaging import load_image
from ..predictor import Prediction, Predictor
from ..results import ResultRow, utc_now
from ..sites import SiteMatcher, SiteProfile, site_decision

__all__ = ["Classified", "InFlight", "classify_batch", "take", "error_reason", "read_header", "site_of", "HEATMAP_SIDE"]

log = logging.getLogger(__name__)

HEATMAP_SIDE = 512  # longest side of a stored heat map PNG (about 0.3 MB; the list shows it small)
# The results database's word for each `ImageError.code` it keeps apart; every other code is ``undecodable``.
# (The database predates the codes: its words stay as they were written.)
_ERROR_REASONS = {
    "no_pixel_data": "no_pixel_data",
    "unsupported_compression": "unsupported_syntax",
    "blank": "blank_image",
    "absurd_size": "bad_size",
    "too_large": "bad_size",
    "non_finite": "bad_values",
}


@dataclass
class Classified:
    """One spooled file's outcome: the row to record and what answering back needs."""

    path: Path
    row: ResultRow
    header: Dataset | None  # None when the file is not readable DICOM at all (no report can refer to it)
    heatmap_png: bytes | None = field(default=None, repr=False)


@dataclass
class InFlight:
    """A batch taken from the queue: its instances by SOP Instance UID, those sent to the classifier, and its future."""

    batch: list[tuple[str, Path, str]]
    unique: dict[str, tuple[str, Path, str]]
    fresh: list[tuple[str, Path, str]]
    future: Future | None
    start: float


def take(items: queue.Queue, limit: int | None = None, block: bool = True) -> list | None:
    """The next item (waiting for it, unless not ``block``: then [] when none is queued) and whatever else is
    queued, up to ``limit``; None once told to stop.

    No waiting window: under load, what queued while the last batch ran is the next batch.
    """
    try:
        first = items.get(block)
    except queue.Empty:
        return []
    if first is None:
        return None
    batch = [first]
    while limit is None or len(batch) < limit:
        try:
            item = items.get_nowait()
        except queue.Empty:
            break
        if item is None:
            items.put(None)  # stop after this batch
            break
        batch.append(item)
    return batch


def error_reason(exc: ImageError) -> str:
    """A machine word for why an instance could not be read (``undecodable`` when nothing more specific fits)."""
    return _ERROR_REASONS.get(exc.code, "undecodable")


def read_header(path: Path) -> Dataset | None:
    """The DICOM header without pixel data (None when the file is not DICOM pydicom can parse)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - any parse failure: the row then says why the pixels could not be read
        return None


def _uid(header: Dataset | None, keyword: str) -> str:
    value = header.get(keyword, "") if header is not None else ""
    return str(value).strip() if value else ""


def site_of(header: Dataset | None, sites: SiteMatcher | None) -> SiteProfile | None:
    """The onboarded site of a film: by its InstitutionName, StationName, or the calling AE title its spooled file's
    meta header keeps (Source Application Entity Title); None when no site matches."""
    if header is None or sites is None:
        return None
    meta = getattr(header, "file_meta", None)
    return sites.match(institution=_uid(header, "InstitutionName"), station=_uid(header, "StationName"),
                       calling_ae=_uid(meta, "SourceApplicationEntityTitle") if meta is not None else None)


def classify_batch(
    predictor: Predictor, items: Sequence[tuple[str, Path, str]], explainer: Predictor | None = None,
    sites: SiteMatcher | None = None,
) -> list[Classified]:
    """Classify spooled instances in batched model calls: one per lane of the thread plan, side by side.

    Args:
        predictor: the model.
        items: ``(sop_instance_uid, spooled path, received_at)`` per instance.
        explainer: a PyTorch `Predictor` of the same model: also compute the Grad-CAM overlay of each answered
            instance with it (one backward pass each: several times the cost of its share of the batched forward pass).
        sites: the onboarded sites; a film that matches one (`site_of`) is decided at its threshold, any other
            at the model's, its row's ``site`` empty (site not onboarded).

    Returns:
        One `Classified` per item, in order. Unreadable files are rows with label ``error`` and a
        reason; answers that are not answers (the input gate) are rows with label ``not_answered``.
    """
    lanes = predictor.threads.lanes
    outcomes = predictor.predict_paths([path for _, path, _ in items], batch_size=max(1, -(-len(items) // lanes)))
    meta = {"model": predictor.name, "weights_sha256": predictor.meta.get("weights_sha256")}
    done = []
    # Each header is read as its film's answer comes: the lanes still at work meanwhile (the generator runs them).
    for (sop_uid, path, received_at), outcome in zip(items, outcomes, strict=True):
        header = read_header(path)
        base = {"sop_instance_uid": sop_uid, "study_instance_uid": _uid(header, "StudyInstanceUID"),
                "series_instance_uid": _uid(header, "SeriesInstanceUID"), "modality": _uid(header, "Modality"),
                "received_at": received_at, "classified_at": utc_now(), **meta}
        png, site = None, site_of(header, sites)
        if isinstance(outcome, ImageError):
            row = ResultRow(**base, label="error", reason=error_reason(outcome), message=outcome.reason,
                            threshold=predictor.threshold_at(site), site=site.name if site is not None else None,
                            site_decision=site_decision(site, answered=False))
        else:
            row = ResultRow(**base, **_answer(predictor.at_site(outcome, site)), site_decision=site_decision(site, outcome.answered))
            if explainer is not None and outcome.answered:
                png = _heatmap(explainer, path)
        done.append(Classified(path, row, header, png))
    return done


def _answer(p: Prediction) -> dict:
    return {"label": p.label, "reason": p.reason, "message": p.message, "probability": p.probability,
            "threshold": p.threshold, "unfamiliarity": p.unfamiliarity, "site": p.site}


def _heatmap(predictor: Predictor, path: Path) -> bytes | None:
    """The Grad-CAM overlay PNG of one file, at most `HEATMAP_SIDE` px (None if it cannot be made)."""
    try:
        image = load_image(path)
        _, cam = explain(predictor, image)
    except ImageError:  # the file changed under us: the row is recorded, without a heat map
        return None
    scale = HEATMAP_SIDE / max(image.shape)
    if scale < 1:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image, cam = (np.asarray(Image.fromarray(a).resize(size, Image.Resampling.BILINEAR)) for a in (image, cam))
    return overlay_png(np.clip(image, 0, 1), np.clip(cam, 0, 1))
