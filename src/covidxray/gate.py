"""Input gate: no COVID-19 answer for what is not a frontal chest X-ray.

The classifier was trained on frontal chest films only, and it answers anything with the same
confidence: a CT slice, a lateral film, a photograph or noise. Two checks run before it:

1. `header_verdict` — what a DICOM file says about itself: a modality that is not projection
   radiography (CT, MR, US, NM, ...), a body part that is not the chest, a lateral or oblique
   view (``ViewPosition``, or ``PatientOrientation`` whose rows run front to back).
2. A learned gate on the pixels (`GateHead`), for files without trustworthy headers (PNG, JPEG,
   DICOM with missing tags): a small classifier on the lung segmenter's pooled encoder features
   (`covidxray.segment.LungNet.forward_features`, one pass shared with the lung map) plus the
   image's aspect ratio and colourfulness, over five kinds of picture (`GATE_CLASSES`). A film
   is answered when P(frontal chest X-ray) reaches the gate's threshold, chosen on validation
   films so that almost every real film passes.

`InputGate` is the one owner of the decision: the `Predictor` asks it, header first (no
segmenter pass for a file that already says what it is), then the pixels. A new rule goes here.
A refused image gets a `Verdict` with a machine-readable ``reason`` and a sentence for people.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .imaging import ImageInfo

__all__ = ["GATE_CLASSES", "REASONS", "Verdict", "InputGate", "GateHead", "header_verdict", "pixel_verdict", "extras"]

GATE_CLASSES = ("frontal", "lateral", "other_modality", "rotated", "other")
FEATURES = 464  # LungNet.forward_features width
EXTRAS = 2  # log aspect ratio, colour share

# reason -> sentence for people; the reason words are part of the API (CLI JSON/CSV, REST, database).
REASONS = {
    "wrong_modality": "not a chest radiograph but another kind of image ({detail}): covidxray answers frontal chest "
                      "X-rays only",
    "not_chest": "the file says the body part is {detail}, not the chest: covidxray answers chest X-rays only",
    "lateral_view": "a lateral (side) view ({detail}): covidxray answers frontal (PA/AP) chest X-rays only",
    "oblique_view": "an oblique view ({detail}): covidxray answers frontal (PA/AP) chest X-rays only",
    "rotated": "looks like a chest X-ray turned on its side or upside down: turn it upright and send it again",
    "not_chest_xray": "does not look like a chest X-ray ({detail}): covidxray answers frontal chest X-rays only",
}
_PIXEL_REASON = {"lateral": "lateral_view", "other_modality": "wrong_modality", "rotated": "rotated", "other": "not_chest_xray"}
_PIXEL_DETAIL = {"lateral": "judged from the pixels", "other_modality": "it looks like another kind of scan",
                 "rotated": "", "other": "a photograph, drawing, document or noise?"}
# Projection radiography, and "other"/secondary captures whose pixels may still be a chest film.
RADIOGRAPHY = {"", "CR", "DX", "DR", "RG", "OT"}
_CHEST = ("CHEST", "THORAX", "LUNG", "TORAX", "THORAC", "BRUSTKORB", "POITRINE")
_LATERAL = {"LL", "RL", "LAT", "LATERAL", "LLAT", "RLAT"}
_OBLIQUE = {"RAO", "LAO", "RPO", "LPO", "RLO", "LLO", "OBL", "OBLIQUE"}


@dataclass(frozen=True)
class Verdict:
    """Why an image gets no answer: ``reason`` (a word from `REASONS`) and ``message`` (a sentence)."""

    reason: str
    message: str
    by: str  # "header" or "pixels"
    p_frontal: float | None = None  # the pixel gate's P(frontal chest X-ray), when it ran


def _verdict(reason: str, detail: str, by: str, p_frontal: float | None = None) -> Verdict:
    return Verdict(reason, REASONS[reason].format(detail=detail).replace(" ()", ""), by, p_frontal)


def header_verdict(info: ImageInfo) -> Verdict | None:
    """A refusal when the file's own header says it is no frontal chest radiograph; None otherwise."""
    if info.modality not in RADIOGRAPHY:
        return _verdict("wrong_modality", f"DICOM Modality {info.modality}", "header")
    part = info.body_part.replace(" ", "")
    if part and not any(word in part for word in _CHEST):
        return _verdict("not_chest", info.body_part, "header")
    if info.view_position in _LATERAL:
        return _verdict("lateral_view", f"DICOM ViewPosition {info.view_position}", "header")
    if info.view_position in _OBLIQUE:
        return _verdict("oblique_view", f"DICOM ViewPosition {info.view_position}", "header")
    rows = info.patient_orientation.split("\\")[0] if info.patient_orientation else ""
    if rows[:1] in ("A", "P"):  # rows running front to back: the detector saw the patient from the side
        return _verdict("lateral_view", f"DICOM PatientOrientation {info.patient_orientation}", "header")
    return None


def extras(shape: tuple[int, ...], info: ImageInfo | None) -> np.ndarray:
    """The gate's inputs besides the encoder features: log aspect ratio (squashing hides it) and colourfulness."""
    h, w = shape[:2]
    return np.array([math.log(h / w), info.colour_share if info is not None else 0.0], dtype=np.float32)


class GateHead(nn.Module):
    """Encoder features + `extras` -> logits over `GATE_CLASSES`."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.norm = nn.BatchNorm1d(FEATURES + EXTRAS)
        self.mlp = nn.Sequential(nn.Linear(FEATURES + EXTRAS, hidden), nn.ReLU(inplace=True), nn.Dropout(0.2),
                                 nn.Linear(hidden, len(GATE_CLASSES)))

    def forward(self, feats: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(torch.cat([feats, extra], 1)))


def pixel_verdict(probs: np.ndarray, threshold: float) -> Verdict | None:
    """A refusal when P(frontal) (``probs[0]``, over `GATE_CLASSES`) is under ``threshold``; None otherwise."""
    p_frontal = float(probs[0])
    if p_frontal >= threshold:
        return None
    kind = GATE_CLASSES[1 + int(np.argmax(probs[1:]))]
    return _verdict(_PIXEL_REASON[kind], _PIXEL_DETAIL[kind], "pixels", p_frontal)


class InputGate:
    """Whether an image may be answered: the header rules (`header_verdict`), then the pixel head (`pixel_verdict`).

    Args:
        threshold: the pixel head's threshold on P(frontal) (from ``segmenter.json``); None when
            there is no trained head (the header rules still apply).
        enabled: False answers everything (research: ``--no-gate``).

    Example:
        >>> gate = InputGate(seg.gate_threshold)
        >>> gate.header(info) or gate.pixels(seg.analyse([image], [info])[0].gate)   # None: answer it
    """

    def __init__(self, threshold: float | None, enabled: bool = True):
        self.threshold, self.enabled = threshold, enabled

    @property
    def uses_pixels(self) -> bool:
        """Whether `pixels` can refuse anything (else the segmenter's gate output need not be computed)."""
        return self.enabled and self.threshold is not None

    def header(self, info: ImageInfo | None) -> Verdict | None:
        """The refusal a file's header earns (None: no header, or nothing against it)."""
        return header_verdict(info) if self.enabled and info is not None else None

    def pixels(self, probs: np.ndarray | None) -> Verdict | None:
        """The refusal the gate head's probabilities over `GATE_CLASSES` earn (None: answer, or no head)."""
        return pixel_verdict(probs, self.threshold) if self.uses_pixels and probs is not None else None
