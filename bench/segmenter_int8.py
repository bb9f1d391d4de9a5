"""Can the lung segmenter's graph run in int8? Static QDQ variants of the bundled segmenter, end to end.

    .venv/bin/python bench/segmenter_int8.py [--calibration 200] [--box subpixel]

Each variant quantises ``segmenter.onnx`` (per-channel int8 weights, asymmetric uint8 activations, MinMax on
``--calibration`` training films of the bundled split), some layers left float. Reported: the network's time per
film (batch 8, one thread), the lung masks' agreement with the float graph's (IoU of P(lung) > 0.5) and the gate's,
then the bundled model end to end on the 1,111 test films (`Predictor.predict_paths`, the shipped int8 classifier
either way): decisions unchanged at the model's threshold (the int8 parity limit is 99 %) and folder img/s.

``--box subpixel`` asks whether the lung box is what breaks parity: the box edges are placed where the map crosses
0.5 between two pixels (interpolated) instead of at whole pixels, so that a map that changes a little moves the box a
little; every run (float and int8) then uses that box, and the float segmenter's decisions with it are compared with
those with the shipped box as well.
"""

from __future__ import annotations

import argparse
import csv
import re
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from scipy import ndimage

from common import ROOT, save
import covidxray.presets as presets
from covidxray.backends import OnnxRunner
from covidxray.export import quantise
from covidxray.gate import extras
from covidxray.imaging import read_image
from covidxray.predictor import Predictor

BUNDLED = ROOT / "src" / "covidxray" / "bundled"
DATA = ROOT.parent / "shared" / "datasets" / "covid-cxr"
VARIANTS = {  # name: nodes left float (a regular expression over the graph's node names)
    "every layer int8": r"$^",
    "decoder and mask head float": r"/up\.|/head/",
    "decoder, head, stem, first block and gate float": r"/up\.|/head/|/stem/|/blocks\.0/|gate",
}


def _edges(profile: np.ndarray, first: int, last: int, threshold: float) -> tuple[float, float]:
    """Where ``profile`` crosses ``threshold`` before pixel ``first`` and after pixel ``last`` (linear between pixel
    centres), in pixels; 0 and the length at the image's border."""
    def cross(inside: float, outside: float) -> float:
        return (inside - threshold) / max(inside - outside, 1e-6)
    low = first + 0.5 - cross(profile[first], profile[first - 1]) if first > 0 else 0.0
    high = last + 0.5 + cross(profile[last], profile[last + 1]) if last + 1 < len(profile) else float(len(profile))
    return low, high


def subpixel_lung_box(prob: np.ndarray, margin: float = 0.1, threshold: float = 0.5,
                      min_area: float = 0.02) -> tuple[float, float, float, float]:
    """`covidxray.presets.lung_box` with each edge interpolated between pixels (the same two largest regions)."""
    prob = np.asarray(prob, dtype=np.float32)
    mask = prob >= threshold
    h, w = mask.shape
    if mask.mean() < min_area:
        return 0.0, 0.0, 1.0, 1.0
    labels, n = ndimage.label(mask)
    if n > 2:
        keep = np.isin(labels, 1 + np.argsort(np.bincount(labels.ravel())[1:])[-2:])
        prob, mask = np.where(mask & ~keep, 0.0, prob), keep
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    (top, bottom), (left, right) = _edges(prob.max(axis=1), rows[0], rows[-1], threshold), \
        _edges(prob.max(axis=0), cols[0], cols[-1], threshold)
    top, bottom, left, right = top / h, bottom / h, left / w, right / w
    dy, dx = (bottom - top) * margin, (right - left) * margin
    return max(0.0, top - dy), max(0.0, left - dx), min(1.0, bottom + dy), min(1.0, right + dx)


def unchanged(a: list, b: list, threshold: float) -> tuple[float, float]:
    """Share of decisions the same and the largest probability change, over films both answered."""
    both = [(u, v) for u, v in zip(a, b) if u is not None and v is not None]
    return float(np.mean([(u >= threshold) == (v >= threshold) for u, v in both])), max(abs(u - v) for u, v in both)


def network_inputs(predictor: Predictor, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    seg = predictor.segmenter
    images = [read_image(p)[0] for p in paths]
    x = seg.preprocess.to_tensor(torch.from_numpy(np.stack([seg.preprocess.prepare(im) for im in images]))).numpy()
    return x, np.stack([extras(im.shape, None) for im in images]).astype(np.float32)


def quantised(x: np.ndarray, e: np.ndarray, keep_float: str) -> bytes:
    source = BUNDLED / "segmenter.onnx"
    excluded = [n.name for n in onnx.load(str(source)).graph.node if re.search(keep_float, n.name)]
    return quantise(source.read_bytes(), {"image": x, "extras": e}, nodes_to_exclude=excluded)


def ms_per_film(runner, x: np.ndarray, e: np.ndarray) -> float:
    batches = [(torch.from_numpy(x[i:i + 8]), torch.from_numpy(e[i:i + 8])) for i in range(0, len(x), 8)]
    runner(image=batches[0][0], extras=batches[0][1])
    start = time.perf_counter()
    for image, extra in batches:
        runner(image=image, extras=extra)
    return (time.perf_counter() - start) / len(x) * 1000


def end_to_end(predictor: Predictor, files: list[Path]) -> tuple[list, float]:
    start = time.perf_counter()
    probs = [getattr(o, "probability", None) for o in predictor.predict_paths(files)]
    return probs, len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", type=int, default=200)
    parser.add_argument("--box", choices=("shipped", "subpixel"), default="shipped",
                        help="the lung box of every run: the shipped rule (whole pixels of the map) or edges interpolated")
    args = parser.parse_args()
    with open(BUNDLED / "splits.csv", newline="") as f:
        split = list(csv.DictReader(f))
    train = [DATA / r["path"] for r in split if r["split"] == "train"]
    test = [DATA / r["path"] for r in split if r["split"] == "test"]
    predictor = Predictor(None, threads=1)
    float_runner, threshold = predictor.segmenter.runner, predictor.threshold_at(None)
    x, e = network_inputs(predictor, [train[i] for i in np.random.default_rng(0).permutation(len(train))[:args.calibration]])
    tx, te = network_inputs(predictor, test[:256])
    reference = float_runner(image=torch.from_numpy(tx), extras=torch.from_numpy(te))
    float_probs, float_speed = end_to_end(predictor, test)
    box_note = ""
    if args.box == "subpixel":
        presets.lung_box = subpixel_lung_box  # Preprocess.prepare_with_box looks it up at each call
        shipped_box = float_probs
        float_probs, float_speed = end_to_end(predictor, test)
        same, largest = unchanged(shipped_box, float_probs, threshold)
        box_note = (f" Every run crops to the sub-pixel box; the float segmenter with it against the shipped box: "
                    f"{same:.2%} of decisions unchanged, largest probability change {largest:.3f}.")
    rows = []
    for name, keep_float in VARIANTS.items():
        runner = OnnxRunner(quantised(x, e, keep_float), threads=1)
        out = runner(image=torch.from_numpy(tx), extras=torch.from_numpy(te))
        a, b = reference[0][:, 0] > 0.5, out[0][:, 0] > 0.5
        iou = (a & b).sum((1, 2)) / np.maximum((a | b).sum((1, 2)), 1)
        predictor.segmenter.use_runner(runner)
        probs, speed = end_to_end(predictor, test)
        predictor.segmenter.use_runner(float_runner)
        same, largest = unchanged(float_probs, probs, threshold)
        rows.append({"variant": name, "float_ms": round(ms_per_film(float_runner, tx, te), 2),
                     "int8_ms": round(ms_per_film(runner, tx, te), 2), "mask_iou_median": round(float(np.median(iou)), 4),
                     "mask_iou_min": round(float(iou.min()), 4),
                     "gate_verdicts_same": float(np.mean(reference[1].argmax(1) == out[1].argmax(1))),
                     "answered_changed": sum((u is None) != (v is None) for u, v in zip(float_probs, probs)),
                     "decisions_unchanged": round(same, 4), "largest_probability_change": round(largest, 3),
                     "folder_img_s_float": round(float_speed, 1), "folder_img_s_int8": round(speed, 1)})
        print(rows[-1], flush=True)
    table = ["| variant | network ms/film, float → int8 | lung mask IoU, median (min) | gate's class unchanged | "
             "test films: decisions unchanged | largest probability change | folder img/s, float → int8 segmenter |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['variant']} | {r['float_ms']} → {r['int8_ms']} | {r['mask_iou_median']} ({r['mask_iou_min']}) | "
              f"{r['gate_verdicts_same']:.0%} | {r['decisions_unchanged']:.2%} | {r['largest_probability_change']} | "
              f"{r['folder_img_s_float']} → {r['folder_img_s_int8']} |" for r in rows]
    note = (f"Bundled model, {len(test)} test films, threshold {threshold:.3f}; masks and gate on the first 256; calibration "
            f"{args.calibration} training films; one thread. The int8 parity limit is 99 % of decisions unchanged; "
            + ("held by: " + ", ".join(r["variant"] for r in held) if (held := [r for r in rows if r["decisions_unchanged"] >= 0.99])
               else "no variant holds it, so the segmenter graph stays float")
            + ". A lung mask that moves by a few pixels moves the lung box, and the classifier's answer with it." + box_note)
    subpixel = args.box == "subpixel"
    save("segmenter-int8" + ("-subpixel-box" if subpixel else ""), {
        "title": "The lung segmenter in int8: variants against its float graph, end to end" + (", sub-pixel lung box" if subpixel else ""),
        "rows": rows, "table": table + ["", note],
        "command": f"python bench/segmenter_int8.py --calibration {args.calibration}" + (" --box subpixel" if subpixel else "")})


if __name__ == "__main__":
    main()
