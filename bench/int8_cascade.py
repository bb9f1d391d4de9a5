"""The int8 graph with its float re-check near the threshold (what `export --int8` now ships) against PyTorch, and
its speed beside the float graph's.

`covidxray export RUN --int8` writes ``model.int8.onnx`` and ``model.onnx`` beside it, with the band it chose;
`Predictor` then serves the int8 graph and scores again in float each film whose int8 P(covid) lies within the
band of a threshold in play (`covidxray.backends.CascadeRunner`). This scores that cascade on the run's test split
and on the validation films of every shared origin (bench/origins.py; ROC-AUC only where an origin gives both
classes), and times both Predictors on the real test films, batch 32, in turn (one thread, median of the passes):

    .venv/bin/python bench/int8_cascade.py --model FOLDER_WITH_BOTH_GRAPHS [--passes 5]

Writes bench/results/int8-cascade.json and its table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from common import ROOT, save
from covidxray.backends import CascadeRunner, near_thresholds
from covidxray.cache import readable_images
from covidxray.checkpoint import resolve_data
from covidxray.data import load_samples
from covidxray.int8_check import INT8_MAX_AUC_DROP, INT8_MIN_AGREEMENT, RECHECK_BANDS, same_decision
from covidxray.predictor import Predictor
from origins import pooled_rows, write_manifest


def _agreement(reference: np.ndarray, served: np.ndarray, y: np.ndarray, t: float) -> dict:
    same = same_decision(reference, served, t)  # a film on the threshold is a tie, as in the export's check
    drop = float(roc_auc_score(y, reference) - roc_auc_score(y, served)) if len(set(y)) == 2 else None
    return {"images": len(y), "agreement": float(same.mean()), "flipped": int((~same).sum()), "roc_auc_drop": drop}


def _score(preds: dict[str, Predictor], samples: list) -> dict[str, np.ndarray]:
    kept, images, _ = readable_images(samples, preds["torch"].preprocess, desc="decoding")
    out = {"y": np.array([s.label for s in kept]), "source": np.array([s.source for s in kept]), "images": images}
    for name, pred in preds.items():
        before = pred.runner.rechecked if isinstance(pred.runner, CascadeRunner) else 0
        out[name] = pred.predict_prepared(images, batch_size=32)
        if isinstance(pred.runner, CascadeRunner):
            out["rechecked"] = (pred.runner.rechecked - before) / max(len(kept), 1)
    return out


def _speed(preds: dict[str, Predictor], images: torch.Tensor, passes: int) -> dict[str, float]:
    """Images per second over every film in batches of 32, the Predictors timed in turn (same load for each)."""
    times: dict[str, list[float]] = {k: [] for k in preds}
    for k, p in preds.items():
        p.predict_prepared(images[:64], batch_size=32)  # warm-up
    for _ in range(passes):
        for k, p in preds.items():
            t = time.perf_counter()
            p.predict_prepared(images, batch_size=32)
            times[k].append(time.perf_counter() - t)
    return {k: len(images) / float(np.median(v)) for k, v in times.items()}


def _passes(result: dict) -> bool:
    return all(c["agreement"] >= INT8_MIN_AGREEMENT and (c["roc_auc_drop"] or 0.0) <= INT8_MAX_AUC_DROP
               for c in [result["test"], *result["origins"].values()])


def _at_band(band: float, test: dict, val: dict, t: float) -> dict:
    """The cascade at ``band`` (`near_thresholds` of the model's threshold) from the int8 and float probabilities."""
    def served(films: dict, mask: np.ndarray | slice = slice(None)) -> tuple[np.ndarray, float]:
        near = near_thresholds(films["int8"][mask], band, [t])
        return np.where(near, films["float"][mask], films["int8"][mask]), float(near.mean())

    out = {}
    for name, films in (("test", test), ("val_pooled", val)):
        p, share = served(films)
        out[name] = {**_agreement(films["torch"], p, films["y"], t), "rechecked": share}
    out["origins"] = {o: _agreement(val["torch"][m], served(val, m)[0], val["y"][m], t)
                      for o in sorted(set(val["source"])) for m in [val["source"] == o]}
    out["passes"] = _passes(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a folder with model.int8.onnx (exported with its re-check band) and model.onnx")
    ap.add_argument("--passes", type=int, default=5)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    preds = {"torch": Predictor(args.model, backend="torch", gate=False, threads=1),
             "float": Predictor(f"{args.model}/model.onnx", backend="onnx", gate=False, threads=1),
             "cascade": Predictor(args.model, backend="auto", gate=False, threads=1)}
    cascade = preds["cascade"]
    if not isinstance(cascade.runner, CascadeRunner):
        raise SystemExit(f"{args.model}: its int8 graph has no re-check band; export it again with --int8")
    preds["int8"] = Predictor(args.model, backend="auto", gate=False, threads=1)
    preds["int8"].runner = preds["int8"].runner.fast  # the int8 graph alone, for the sweep over bands
    t, band = cascade.threshold, cascade.runner.band
    samples = load_samples(*resolve_data(args.model, cascade.meta))
    test = _score(preds, [s for s in samples if s.split == "test"])
    val_rows = [r for r in pooled_rows() if r[4] == "val"]
    val = _score(preds, load_samples(write_manifest(val_rows, ROOT / "runs" / "origins" / "int8-val.csv")))
    result = {"band": band, "threshold": t, "test": {**_agreement(test["torch"], test["cascade"], test["y"], t),
                                                     "rechecked": test["rechecked"]},
              "val_pooled": {**_agreement(val["torch"], val["cascade"], val["y"], t), "rechecked": val["rechecked"]},
              "origins": {o: _agreement(val["torch"][val["source"] == o], val["cascade"][val["source"] == o],
                                        val["y"][val["source"] == o], t) for o in sorted(set(val["source"]))}}
    result["passes"] = _passes(result)
    result["bands"] = {str(b): _at_band(b, test, val, t) for b in RECHECK_BANDS}
    # Also timed: the narrowest band that holds on every shared origin, where it is not the exported one.
    every = next((float(b) for b, r in result["bands"].items() if r["passes"]), None)
    timed = {k: preds[k] for k in ("float", "cascade")}
    if every is not None and every != band:
        timed[f"cascade at {every}"] = Predictor(args.model, backend="auto", gate=False, threads=1)
        timed[f"cascade at {every}"].runner.band = every
    load = os.getloadavg()[0]
    speed = _speed(timed, test["images"], args.passes)
    result["speed"] = {**speed, "ratio": speed["cascade"] / speed["float"], "load_1min_before": load,
                       "load_1min_after": os.getloadavg()[0], "band_every_origin": every}
    worst = min(result["origins"].items(), key=lambda kv: kv[1]["agreement"])
    table = ["| band | films re-checked (test / val) | test: decisions unchanged | test ROC-AUC drop | every origin's val: "
             "unchanged | worst origin (flipped/films) | img/s batch 32, float → cascade | within limits |",
             "|---:|---:|---:|---:|---:|---|---:|---|",
             f"| {band} | {result['test']['rechecked']:.1%} / {result['val_pooled']['rechecked']:.1%} | "
             f"{result['test']['agreement']:.2%} | {result['test']['roc_auc_drop']:+.4f} | {result['val_pooled']['agreement']:.2%} | "
             f"{worst[0]} {worst[1]['agreement']:.2%} ({worst[1]['flipped']}/{worst[1]['images']}) | "
             f"{speed['float']:.0f} → {speed['cascade']:.0f} ({result['speed']['ratio']:.2f}×) | {'yes' if result['passes'] else 'no'} |",
             "", f"Against PyTorch at the stored threshold {t:.4f}; limits ROC-AUC drop ≤ {INT8_MAX_AUC_DROP}, ≥ "
             f"{INT8_MIN_AGREEMENT:.0%} of decisions unchanged. Speed: both Predictors (classifier and familiarity), "
             f"one thread, over the {len(test['y'])} real test films in batches of 32, timed in turn, median of "
             f"{args.passes} passes (1-minute load average in the JSON). Model {cascade.name}."]
    table += [f"At band {k.split()[-1]}, the narrowest that holds on every shared origin: {v:.0f} img/s "
              f"({v / speed['float']:.2f}× float), timed in the same passes." for k, v in speed.items() if k.startswith("cascade at")]
    table += ["", "The same at each band of the export's grid (the cascade's probabilities from the int8 and float ones):", "",
              "| band | re-checked (test / every origin's val) | test unchanged | every origin's val unchanged | "
              "worst origin (flipped/films) | within limits |", "|---:|---:|---:|---:|---|---|"]
    for b, r in result["bands"].items():
        worst = min(r["origins"].items(), key=lambda kv: kv[1]["agreement"])
        table.append(f"| {b} | {r['test']['rechecked']:.1%} / {r['val_pooled']['rechecked']:.1%} | {r['test']['agreement']:.2%} | "
                     f"{r['val_pooled']['agreement']:.2%} | {worst[0]} {worst[1]['agreement']:.2%} "
                     f"({worst[1]['flipped']}/{worst[1]['images']}) | {'yes' if r['passes'] else 'no'} |")
    print("\n".join(table), flush=True)
    save("int8-cascade", {"title": "int8 with the float re-check near the threshold (export --int8's graph)",
                          "table": table, "results": result,
                          "command": f"python bench/int8_cascade.py --model {args.model} --passes {args.passes}"})


if __name__ == "__main__":
    main()
