"""`Prediction`: one film's answer, as every surface gives it (CLI, Python API, REST API, DICOM listener).

`covidxray.predictor.Predictor.decide` makes it; it lives here so that what reads answers need not load a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from .sites import NOT_ONBOARDED

__all__ = ["NOT_ANSWERED", "Prediction"]

NOT_ANSWERED = "not_answered"  # the third outcome: the input is not a frontal chest X-ray


@dataclass(frozen=True)
class Prediction:
    """One image's answer. ``probability`` is P(COVID-19); ``label`` is ``covid`` when it reaches ``threshold``.

    An image that is not a frontal chest X-ray gets no answer: ``label`` is ``not_answered``,
    ``probability`` is None and ``reason`` says why in a word (``message`` in a sentence).
    ``threshold`` is the one used: the site's when the film's site is onboarded (`covidxray.sites`),
    else the model's own, and then ``note`` says "site not onboarded".
    """

    path: str
    label: str  # "covid" (COVID-19 positive), "normal", or "not_answered"
    probability: float | None  # P(covid), after temperature scaling; None when not answered
    threshold: float
    reason: str | None = None  # why not answered: wrong_modality, lateral_view, not_chest_xray, ...
    message: str | None = None  # the reason, or a warning about an answer, for people
    unfamiliarity: float | None = None  # 0: typical of the training films ... 1: unlike any of them
    site: str | None = None  # the onboarded site whose threshold decided (None: the model's default threshold)
    site_onboarded: bool = False
    note: str | None = NOT_ONBOARDED  # "site not onboarded: ..." when no site profile applies
    # The classifier's features of the film (None: not answered, or a graph without them), for a site's own head
    # (`covidxray.sites.SiteProfile.head`, applied by `Predictor.at_site`); never in `to_dict`.
    features: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def answered(self) -> bool:
        return self.label != NOT_ANSWERED

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "features"}
