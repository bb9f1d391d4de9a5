"""Calibration: temperature scaling (and a logit shift) fitted on the validation split, then the operating threshold.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017) divides
the logits by one scalar ``T > 0`` chosen to minimise the negative log-likelihood (NLL) of the
validation labels. It never changes the ranking of cases (ROC-AUC is the same, and every threshold
on the old probabilities has an equivalent on the new ones), but it makes P(COVID-19) mean what
it says: of the cases given 0.8, about 80% should be COVID-19. Label smoothing, class-balanced
sampling and the weight average used in training all distort raw softmax confidences, which is
why the fit is worth doing after every run.

Temperature alone cannot move probabilities that are biased towards one class (label smoothing,
class-balanced sampling and augmentation of one class do that: a run's Youden threshold near 0.7 says
so). With ``shift=True`` a logit shift is fitted with the temperature (Platt scaling, ``sigmoid((d + s) /
T)`` of the logit difference ``d``); it is folded into the classifier's bias (`fold_logit_shift`), so
that every consumer keeps computing ``softmax(logits / T)`` and the exported graphs carry it.

The threshold is chosen after the temperature, on the calibrated validation probabilities, so
that the stored threshold and the stored temperature belong together. COVID-19 is the positive
class throughout.

Example:
    >>> cal = calibrate(y_val, logits_val)                 # fit T, Youden's J threshold
    >>> cal.temperature, cal.ece_before, cal.ece_after
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from scipy.optimize import minimize, minimize_scalar
from sklearn.calibration import calibration_curve

from .errors import DataError
from .metrics import choose_threshold
from .models import fold_logit_shift, logit_shift

__all__ = [
    "ECE_BINS", "SENSITIVITY_TARGETS", "Calibration", "reliability", "expected_calibration_error", "covid_probability",
    "nll", "fit_temperature", "fit_temperature_and_shift", "shifted", "per_origin_threshold", "calibrate",
    "calibrate_model",
]

log = logging.getLogger(__name__)

ECE_BINS = 15  # equal-width bins of P(COVID-19) for the calibration error, as in Guo et al. 2017
SENSITIVITY_TARGETS = (0.90, 0.95, 0.98)  # screening-style operating points recorded for every run
MIN_ORIGIN_FILMS = 20  # COVID-19 films an origin needs in validation to get its own sensitivity target
T_BOUNDS = (0.05, 20.0)  # the search range; a fit at a bound means the validation set is separable or useless


def reliability(y_true: ArrayLike, prob: ArrayLike, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Reliability-diagram data and expected calibration error (ECE) of P(COVID-19), equal-width bins.

    Calibration is judged on P(COVID-19) itself (not on the confidence of the predicted class):
    among cases given P(COVID-19) near 0.8, about 80% should be COVID-19.

    Args:
        y_true: labels, 1 = COVID-19, 0 = normal.
        prob: predicted P(COVID-19) per case, in [0, 1].
        n_bins: equal-width bins over [0, 1].

    Returns:
        ``{"n_bins", "mean_probability", "fraction_covid", "count", "ece"}``: per non-empty bin the
        mean predicted P(COVID-19), the observed share of COVID-19 cases and the number of cases;
        ``ece`` is the case-weighted mean of ``|fraction_covid - mean_probability|`` over bins.
    """
    y, p = np.asarray(y_true).ravel().astype(int), np.asarray(prob, dtype=float).ravel()
    if y.size == 0 or y.shape != p.shape:
        raise ValueError(f"y_true and prob must be non-empty and equally long, got {y.size} and {p.size}")
    fraction, mean_prob = calibration_curve(y, p, n_bins=n_bins, strategy="uniform", pos_label=1)
    # Cases per bin, binned exactly as calibration_curve bins them (same edges, same searchsorted).
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    count = np.bincount(np.searchsorted(edges[1:-1], p), minlength=n_bins)
    count = count[count > 0]
    ece = float(np.sum(count / y.size * np.abs(fraction - mean_prob)))
    return {"n_bins": n_bins, "mean_probability": mean_prob.tolist(), "fraction_covid": fraction.tolist(),
            "count": count.tolist(), "ece": ece}


def expected_calibration_error(y_true: ArrayLike, prob: ArrayLike, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of P(COVID-19) over ``n_bins`` equal-width bins (see `reliability`)."""
    return reliability(y_true, prob, n_bins)["ece"]


def _check(logits: ArrayLike, y: ArrayLike | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    z = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    if z.ndim != 2 or z.shape[1] != 2 or not torch.isfinite(z).all():
        raise ValueError(f"logits must be finite with shape (N, 2) (normal, covid), got {tuple(z.shape)}")
    if y is None:
        return z, None
    t = torch.as_tensor(np.asarray(y)).long().ravel()
    if t.numel() != z.shape[0] or not bool(((t == 0) | (t == 1)).all()):
        raise ValueError("y must hold one 0 (normal) / 1 (COVID-19) label per row of logits")
    return z, t


def covid_probability(logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """P(COVID-19) = softmax(logits / temperature)[:, 1] for logits ``(N, 2)``, as float32.

    The same float32 operations as `covidxray.inference.predict_probs` (what the Predictor serves):
    thresholds are chosen among these values, so a validation case lying exactly on the threshold
    must get bit-for-bit the same probability in serving.
    """
    z, _ = _check(logits)
    return torch.softmax(z.float() / temperature, dim=1)[:, 1].numpy()


def nll(logits: ArrayLike, y: ArrayLike, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits / temperature)``."""
    z, t = _check(logits, y)
    return float(F.cross_entropy(z / temperature, t))


def fit_temperature(logits: ArrayLike, y: ArrayLike) -> float:
    """The temperature minimising validation NLL (1-D bounded search over log T).

    Args:
        logits: validation logits ``(N, 2)``, columns normal and COVID-19.
        y: validation labels, 1 = COVID-19, 0 = normal.

    Returns:
        T in ``T_BOUNDS``; T < 1 sharpens over-cautious probabilities, T > 1 softens over-confident ones.
    """
    z, t = _check(logits, y)
    # NLL is smooth and unimodal in log T for fixed logits, so a bounded scalar search is exact
    # enough and, unlike an LBFGS step size, needs no tuning.
    res = minimize_scalar(lambda u: float(F.cross_entropy(z * np.exp(-u), t)),
                          bounds=tuple(np.log(T_BOUNDS)), method="bounded", options={"xatol": 1e-5})
    temperature = float(np.exp(res.x))
    if not T_BOUNDS[0] * 1.01 < temperature < T_BOUNDS[1] / 1.01:
        log.warning("temperature %.3g is at the edge of the search range: the validation set may be perfectly "
                    "separated or too small to calibrate on", temperature)
    return temperature


def _shift(z: torch.Tensor, shift: float) -> torch.Tensor:
    return z + logit_shift(shift, z)


def shifted(logits: ArrayLike, shift: float) -> np.ndarray:
    """``logits`` ``(N, 2)`` with the COVID-19 minus normal difference raised by ``shift`` (half on each column,
    as `covidxray.models.fold_logit_shift` moves the classifier's bias)."""
    return _shift(_check(logits)[0], shift).numpy()


def fit_temperature_and_shift(logits: ArrayLike, y: ArrayLike) -> tuple[float, float]:
    """The temperature and logit shift minimising validation NLL of ``sigmoid((d + shift) / T)`` (Platt scaling)."""
    z, t = _check(logits, y)
    start = np.log(fit_temperature(z, t.numpy()))

    def loss(w: np.ndarray) -> float:
        return float(F.cross_entropy(_shift(z, w[1]) * np.exp(-w[0]), t))

    res = minimize(loss, np.array([start, 0.0]), method="L-BFGS-B", bounds=[tuple(np.log(T_BOUNDS)), (-20.0, 20.0)])
    return float(np.exp(res.x[0])), float(res.x[1])


@dataclass(frozen=True)
class Calibration:
    """Temperature and threshold fitted on validation data, with the evidence for them."""

    temperature: float
    threshold: float
    threshold_rule: str  # how the threshold was chosen, in words
    n: int  # validation images used
    ece_before: float  # ECE of P(COVID-19) at temperature 1
    ece_after: float  # ECE at `temperature`
    nll_before: float
    nll_after: float
    sensitivity_thresholds: dict[str, float] = field(default_factory=dict)  # "0.95" -> highest threshold reaching it
    ece_by_source: dict[str, float] = field(default_factory=dict)  # per origin of the validation films, at `temperature`
    shift: float = 0.0  # logit shift fitted with the temperature (0: temperature scaling alone), for the classifier's bias

    def to_meta(self) -> dict[str, Any]:
        """The ``model.json`` fields this calibration sets."""
        return {
            "temperature": self.temperature, "threshold": self.threshold, "threshold_rule": self.threshold_rule,
            "sensitivity_thresholds": self.sensitivity_thresholds,
            "calibration": {
                "method": ("temperature scaling and a logit shift (Platt scaling, validation NLL; the shift is in the "
                           "classifier's bias)" if self.shift else "temperature scaling (validation NLL)"),
                "logit_shift": self.shift, "split": "val", "n": self.n, "bins": ECE_BINS,
                "ece_before": self.ece_before, "ece_after": self.ece_after,
                "nll_before": self.nll_before, "nll_after": self.nll_after, "ece_by_source": self.ece_by_source,
            },
        }


def per_origin_threshold(y: np.ndarray, p: np.ndarray, sources: Sequence[str], target_sensitivity: float) -> tuple[float, str]:
    """The highest threshold at which *every* COVID-19 origin of the validation films reaches ``target_sensitivity``.

    An origin with fewer than `MIN_ORIGIN_FILMS` COVID-19 films gets no target of its own (too few to estimate one);
    all COVID-19 films together must reach it too. Every specificity falls as the threshold falls, so the highest
    qualifying threshold is also the one with the best worst-origin specificity.

    Returns:
        ``(threshold, what each origin needed, in words)``.
    """
    src, pos = np.asarray(sources), y == 1

    def needs(where: np.ndarray) -> float:  # the highest threshold that flags enough of these COVID-19 films
        flagged = np.sort(p[where & pos])[::-1]
        return float(flagged[int(np.ceil(target_sensitivity * len(flagged))) - 1])

    needed = {"all COVID-19 films": needs(np.ones_like(pos))}
    for name in sorted(set(src[pos].tolist())):
        if (src[pos] == name).sum() >= MIN_ORIGIN_FILMS:
            needed[name] = needs(src == name)
    return min(needed.values()), ", ".join(f"{n} {t:.3f}" for n, t in needed.items())


def calibrate(
    y: ArrayLike, logits: ArrayLike, target_sensitivity: float | None = None, threshold: float | None = None,
    temperature: float | None = None, sources: Sequence[str] | None = None, shift: bool = False, pooled: bool = False,
) -> Calibration:
    """Fit the temperature (unless given) and then choose the threshold, both on validation data.

    Args:
        y: validation labels, 1 = COVID-19, 0 = normal (both classes needed).
        logits: validation logits ``(N, 2)`` at temperature 1.
        target_sensitivity: choose the highest threshold whose validation sensitivity reaches this;
            None: maximise Youden's J.
        threshold: use this threshold as it is (overrides ``target_sensitivity``).
        temperature: keep this temperature instead of fitting one.
        sources: the origin of each validation film: with ``target_sensitivity``, every COVID-19 origin must reach
            it (`per_origin_threshold`), not just the pooled films; the ECE is also reported per origin.
        pooled: with ``target_sensitivity``, the COVID-19 films together reach it (an origin with few validation
            films can otherwise drag the threshold down for every site).
        shift: also fit a logit shift (with the temperature, unless ``temperature`` is given); every number
            after it (threshold, ECE and NLL after) is on the shifted logits, which the caller must make the
            model's own (`covidxray.models.fold_logit_shift`).

    Returns:
        The `Calibration`; ``to_meta()`` gives the checkpoint fields.
    """
    z, t = _check(logits, y)
    labels = t.numpy()
    if np.unique(labels).size < 2:
        raise DataError("calibration needs COVID-19 and normal cases in the validation split; it has one class")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    fitted, fitted_shift, raw = temperature is None, 0.0, covid_probability(z, 1.0)
    if shift and fitted:
        temperature, fitted_shift = fit_temperature_and_shift(z, labels)
    elif fitted:
        temperature = fit_temperature(z, labels)
    z_before, z = z, _shift(z, fitted_shift)
    p = covid_probability(z, temperature)
    shift_note = f", logit shift {fitted_shift:+.3f}" if fitted_shift else ""
    where = (f"on the validation split ({len(p)} images), temperature-scaled probabilities "
             f"(T={temperature:.3f}, {'fitted' if fitted else 'kept'}{shift_note})")
    if threshold is not None:
        rule = f"fixed at {threshold:g} by the user (T={temperature:.3f} {'fitted on' if fitted else 'kept for'} the validation split)"
    elif target_sensitivity and sources is not None and not pooled:
        threshold, needed = per_origin_threshold(labels, p, sources, target_sensitivity)
        rule = (f"sensitivity >= {target_sensitivity} on every COVID-19 origin {where}; the highest such threshold, "
                f"so the best specificity on every normal origin (each origin's own threshold: {needed})")
    else:
        threshold = choose_threshold(labels, p, target_sensitivity)
        name = f"sensitivity >= {target_sensitivity} on the COVID-19 films together" if target_sensitivity else "Youden's J"
        rule = f"{name} {where}"
    by_source = {}
    if sources is not None:
        src = np.asarray(sources)
        by_source = {n: expected_calibration_error(labels[src == n], p[src == n]) for n in sorted(set(src.tolist()))}
    return Calibration(
        temperature=temperature, threshold=float(threshold), threshold_rule=rule, n=len(p),
        ece_before=expected_calibration_error(labels, raw), ece_after=expected_calibration_error(labels, p),
        nll_before=nll(z_before, labels, 1.0), nll_after=nll(z, labels, temperature),
        sensitivity_thresholds={f"{s:.2f}": choose_threshold(labels, p, s) for s in SENSITIVITY_TARGETS},
        ece_by_source=by_source, shift=fitted_shift,
    )


def calibrate_model(model: torch.nn.Module, arch: str, y: ArrayLike, logits: np.ndarray, relogit: Callable[[], np.ndarray],
                    shift: bool, **options: Any) -> tuple[Calibration, np.ndarray]:
    """`calibrate` a model on its validation ``logits``; with ``shift``, fold the fitted logit shift into its bias.

    ``relogit()`` gives the validation logits of ``model`` as it is now. After the shift is folded in
    (`covidxray.models.fold_logit_shift`) the threshold is chosen again on them, so that it is bit for bit a
    probability the served model gives (a validation film on the threshold stays on it).

    Returns:
        The `Calibration` and the validation logits it describes (the changed model's).
    """
    first = calibrate(y, logits, shift=shift, **options)
    if not first.shift:
        return first, logits
    fold_logit_shift(model, arch, first.shift)
    logits = relogit()
    final = calibrate(y, logits, **{**options, "temperature": first.temperature})
    return replace(final, shift=first.shift, threshold_rule=first.threshold_rule, ece_before=first.ece_before,
                   nll_before=first.nll_before), logits
