"""Can the last layer learn "not COVID-19" from normal and diseased films of other origins, and does that travel?

    python bench/head_pool.py                  # the bundled model's features

The backbone stays as shipped (trained on covid-cxr alone); only the head is refitted, as `covidxray refit-head`
does, on the covid-cxr training films plus the *training patients* of the other origins' films (`origins.pooled_rows`
splits JSRT, Shenzhen and Montgomery 70/15/15 by patient): their normals, and with ``+ other`` their tuberculosis
and nodule films too, all as *not COVID-19*, each weighing ``w`` times a covid-cxr film. Leave one origin out at
the head: for each of JSRT, Shenzhen and Montgomery, the head is fitted without any of that origin's films and scored
on all of them, so the held-out numbers are those of an origin neither the backbone nor the head has seen. The
regularisation is chosen on validation ROC-AUC (covid-cxr's validation split with the pooled origins' validation
patients as negatives) and the threshold keeps 0.90 sensitivity on the validation COVID-19 films; the test split
chooses nothing. ``nothing held out`` is the head one would ship: scored on the test patients of every origin.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from common import ROOT, save
from head_refit import CXR, features
from origins import NORMAL_ORIGINS
from covidxray.head import C_GRID, fit_head
from covidxray.predictor import Predictor

SENSITIVITY = 0.90
KEYS = ("feats", "margin", "source", "finding", "split")


def cached_features(predictor: Predictor, model: str) -> dict:
    """`head_refit.features`, kept in runs/origins/ under the weights' hash (a minute or two to take)."""
    weights = Path(model) / "model.safetensors"
    path = ROOT / "runs" / "origins" / f"head-features-{hashlib.sha256(weights.read_bytes()).hexdigest()[:16]}.npz"
    if not path.exists():
        parts = features(predictor)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{f"{p}.{k}": v[k] for p, v in parts.items() for k in KEYS})
    z = np.load(path)
    return {p: {k: z[f"{p}.{k}"] for k in KEYS} for p in ("train", "val", "test", "unseen")}


def pool(parts: dict, split: str, origins: tuple[str, ...], other: bool) -> tuple[np.ndarray, np.ndarray]:
    """Indices into ``unseen`` of the ``split`` patients of ``origins``: normals, and other findings with ``other``."""
    u = parts["unseen"]
    keep = (u["split"] == split) & np.isin(u["source"], origins) & ((u["finding"] == "normal") | other)
    return np.flatnonzero(keep)


def fit(parts: dict, origins: tuple[str, ...], other: bool, weight: float):
    """The head fitted on covid-cxr training plus the pooled origins' training patients; its validation threshold."""
    u, tr, va = parts["unseen"], parts["train"], parts["val"]
    ti, vi = pool(parts, "train", origins, other), pool(parts, "val", origins, other)
    x = np.concatenate([tr["feats"], u["feats"][ti]])
    y = np.r_[tr["finding"] == "covid", np.zeros(len(ti), bool)]
    w = np.r_[np.ones(len(tr["feats"])), np.full(len(ti), weight)]
    vx = np.concatenate([va["feats"], u["feats"][vi]])
    vy = np.r_[va["finding"] == "covid", np.zeros(len(vi), bool)]
    refit = fit_head(x, y, vx, vy, sample_weight=w)
    t = float(np.quantile(refit.head.margin(va["feats"][va["finding"] == "covid"]), 1 - SENSITIVITY, method="lower"))
    return refit, t


def score(parts: dict, margins: dict, t: float, held: str | None) -> dict:
    """Held-out origin: every film; origins in the pool: their test patients; covid-cxr: its test split."""
    test, u = parts["test"], parts["unseen"]
    keep = np.isin(test["finding"], ("covid", "normal"))
    out = {"test_roc_auc": float(roc_auc_score(test["finding"][keep] == "covid", margins["test"][keep]))}
    for origin in CXR:
        covid = (test["source"] == origin) & (test["finding"] == "covid")
        out[f"sensitivity {origin}"] = float((margins["test"][covid] >= t).mean())
    for origin in NORMAL_ORIGINS:
        here = (u["source"] == origin) & ((u["split"] == "test") | (origin == held))
        out[f"specificity {origin}"] = float((margins["unseen"][here & (u["finding"] == "normal")] < t).mean())
        out[f"other called COVID-19 {origin}"] = float((margins["unseen"][here & (u["finding"] != "normal")] >= t).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "src" / "covidxray" / "bundled"))
    ap.add_argument("--weights", default="1,5", help="comma-separated weights of a pooled film against a covid-cxr one")
    args = ap.parse_args()
    predictor = Predictor(args.model, backend="torch", gate=False)
    parts = cached_features(predictor, args.model)
    variants = [("covid-cxr only", False, 1.0, False)] + [
        (f"+ normals{' + other' if other else ''}, w={w:g}", True, w, other)
        for w in map(float, args.weights.split(",")) for other in (False, True)]
    rows, table = {}, []
    for name, pooled, weight, other in variants:
        for held in (*NORMAL_ORIGINS, None):
            if not pooled and held is not None:  # nothing of the origins in the head: every one is held out already
                continue
            origins = tuple(o for o in NORMAL_ORIGINS if o != held) if pooled else ()
            refit, t = fit(parts, origins, other, weight)
            margins = {k: refit.head.margin(v["feats"]) for k, v in parts.items()}
            r = score(parts, margins, t, held if pooled else "all")
            r["c"] = refit.c
            rows[f"{name} | {held or 'nothing'} held out"] = {k: round(v, 4) for k, v in r.items()}
            print(name, held, {k: round(v, 3) for k, v in r.items()}, flush=True)
    keys = [k for k in next(iter(rows.values())) if k != "c"]
    table = ["| head | held out | C | " + " | ".join(keys) + " |", "|---|---|---:|" + "---:|" * len(keys)]
    for name, r in rows.items():
        head, held = name.split(" | ")
        table.append(f"| {head} | {held} | {r['c']:g} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    save("head-pool", {"title": "The head refitted with other origins' films as not COVID-19, one origin left out at a time "
                                "(bundled backbone; threshold: 0.90 sensitivity on validation COVID-19 films; held-out "
                                "origin: every film, others: their test patients; COVID-19 is the positive class)",
                       "table": table, "rows": rows, "c_grid": list(C_GRID), "command": "python bench/head_pool.py"})
    print("\n".join(table))


if __name__ == "__main__":
    main()
