"""The int8 classifier's parity check (`covidxray.export`): PyTorch vs the int8 graph served with its float re-check.

The int8 graph answers through a `covidxray.backends.CascadeRunner`: films whose int8 P(covid) lies within a band
of a threshold in play are scored again by the float graph. `int8_parity` scores the run's test split and each
source's validation films with PyTorch, the int8 graph and the float graph, then takes the narrowest band of
`RECHECK_BANDS` at which the cascade keeps at least `INT8_MIN_AGREEMENT` of PyTorch's decisions and loses at most
`INT8_MAX_AUC_DROP` of its ROC-AUC on each.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from .backends import near_thresholds
from .cache import readable_images
from .errors import DataError
from .predictor import Predictor

__all__ = ["int8_parity", "failures", "same_decision", "INT8_MAX_AUC_DROP", "INT8_MIN_AGREEMENT", "RECHECK_BANDS", "FLOAT_ONNX"]

INT8_MAX_AUC_DROP = 0.002
INT8_MIN_AGREEMENT = 0.99
FLOAT_ONNX = "model.onnx"  # the float graph an int8 one re-checks with, written beside it
# Bands (in P(covid)) around each threshold within which the float graph scores an int8-scored film again.
RECHECK_BANDS = (0.0, 0.02, 0.03, 0.05, 0.08, 0.10, 0.12, 0.15)
# A film whose PyTorch P(covid) is this close to the threshold is a tie that float rounding alone decides (float ONNX
# and PyTorch differ by ~1e-6): it counts as kept. A threshold chosen on validation sits exactly on one of its films.
TIE = 1e-5


def int8_parity(predictor: Predictor, quantised: bytes, samples: list, float_graph: bytes,
                min_band: float = 0.0) -> dict[str, Any]:
    """PyTorch vs the int8 graph served with its float re-check (`near_thresholds` of the stored threshold, then
    ``float_graph``), at the narrowest of `RECHECK_BANDS` that keeps the limits (else the widest, ``recheck``):
    ROC-AUC of each, the share of equal decisions and of films re-checked on the run's test split, and the same
    on the validation films of each source (``val_sources``; ROC-AUC None where a source gives one class only).
    ``int8_only`` holds the int8 graph's own numbers. Bands below ``min_band`` are not tried (for origins the
    run's data does not hold)."""
    import onnxruntime as ort  # the int8 path only

    test = [s for s in samples if s.split == "test"]
    if not test:
        raise DataError("the int8 check needs the run's test split; it has none")
    sessions = [ort.InferenceSession(b, providers=["CPUExecutionProvider"]) for b in (quantised, float_graph)]
    val = [s for s in samples if s.split == "val"]
    groups = {"test split": test, **{src: [s for s in val if s.source == src] for src in sorted({s.source for s in val})}}
    scores = {name: _scores(predictor, sessions, group, f"int8 check, {name}") for name, group in groups.items()}
    bands = [b for b in RECHECK_BANDS if b >= min_band] or [max(RECHECK_BANDS)]
    for band in bands:
        results = {name: _compare(*scored, band, predictor.threshold) for name, scored in scores.items()}
        if not failures(results):
            break
    out = results.pop("test split")
    out["test_images"] = out.pop("images")
    n_val = sum(r["images"] for r in results.values())
    return {**out, "val_sources": results, "recheck": {
        "band": band, "float_onnx": FLOAT_ONNX, "float_onnx_sha256": hashlib.sha256(float_graph).hexdigest(),
        "share_test": out["rechecked"], "share_val": sum(r["rechecked"] * r["images"] for r in results.values()) / max(n_val, 1)}}


def failures(results: dict[str, dict[str, Any]]) -> list[str]:
    """The names of the results outside the parity limits."""
    return [name for name, r in results.items()
            if r["agreement"] < INT8_MIN_AGREEMENT or (r["roc_auc_drop"] or 0.0) > INT8_MAX_AUC_DROP]


def _scores(predictor: Predictor, sessions: list, samples: list, desc: str) -> tuple[np.ndarray, ...]:
    """Labels, then P(covid) from PyTorch and from each ONNX session (int8, float), of ``samples``."""
    kept, images, _ = readable_images(samples, predictor.preprocess, desc=desc)
    x = predictor.preprocess.to_tensor(images).numpy()
    probs = [np.concatenate([session.run(["logits"], {"image": x[i:i + 64]})[0] for i in range(0, len(x), 64)])
             for session in sessions]
    return (np.array([s.label for s in kept]), predictor.predict_prepared(images),
            *(torch.softmax(torch.from_numpy(p) / predictor.temperature, dim=1)[:, 1].numpy() for p in probs))


def same_decision(reference: np.ndarray, served: np.ndarray, t: float) -> np.ndarray:
    """Per film: does ``served`` decide as ``reference`` does at threshold ``t`` (a film within `TIE` of it: yes)?"""
    return ((reference >= t) == (served >= t)) | (np.abs(reference - t) < TIE)


def _compare(y: np.ndarray, p_torch: np.ndarray, p_int8: np.ndarray, p_float: np.ndarray, band: float,
             t: float) -> dict[str, Any]:
    """PyTorch vs the cascade (int8, float within ``band`` of ``t``) at threshold ``t``."""
    near = near_thresholds(p_int8, band, [t])
    p_served = np.where(near, p_float, p_int8)
    auc = [float(roc_auc_score(y, p)) if len(set(y)) == 2 else None for p in (p_torch, p_served, p_int8)]
    agree = [float(same_decision(p_torch, p, t).mean()) for p in (p_served, p_int8)]
    return {"images": len(y), "roc_auc_torch": auc[0], "roc_auc_int8": auc[1],
            "roc_auc_drop": None if auc[0] is None else auc[0] - auc[1], "agreement": agree[0],
            "rechecked": float(near.mean()), "int8_only": {"roc_auc": auc[2], "agreement": agree[1]}}
