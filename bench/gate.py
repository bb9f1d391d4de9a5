"""The input gate against its targets: what gets no answer, what still gets one, and what it costs in time.

Refused (targets: >= 95 % of lateral films, >= 99 % of everything else): the not-frontal set's
held-out patients (lateral films, CT slices), pydicom's test files of other modalities (with their
headers, and as bare PNGs so that only the pixels speak), package photographs and drawings the
gate never trained on (grey and colour), generated documents, charts and noise (an unseen seed),
frontal films turned by 90/180/270 degrees. Answered (target >= 99.5 %): every film of covid-cxr's
test split and of JSRT. Time: per-image inference of the bundled model with and without the gate,
one image at a time (decode excluded), on an otherwise idle machine.

    .venv/bin/python bench/gate.py [--model RUN (default: the bundled model)]

Writes bench/results/gate.json and the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import time
import warnings

import numpy as np
import torch
from PIL import Image

from common import ROOT, save
from covidxray.checkpoint import default_model_path
from covidxray.errors import ImageError
from covidxray.gate_training import not_frontal_split, rotate_quarter
from covidxray.imaging import read_image
from covidxray.negatives import HELD_OUT, generated, package_images, pydicom_images
from covidxray.predictor import Predictor

SHARED = ROOT.parent / "shared" / "datasets"


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _decoded(sources) -> list[tuple[str, np.ndarray, object]]:
    out = []
    for name, src in sources:
        try:
            out.append((name, *read_image(src, name=name)))
        except ImageError:
            continue
    return out


def _rate(predictor: Predictor, items, answered: bool) -> dict:
    answers = [predictor.predict_array(image, name, info) for name, image, info in items]
    hits = [a.answered == answered for a in answers]
    reasons: dict[str, int] = {}
    for a in answers:
        if not a.answered:
            reasons[a.reason] = reasons.get(a.reason, 0) + 1
    return {"n": len(answers), "rate": float(np.mean(hits)) if hits else None, "reasons": reasons,
            "misses": [a.path for a, ok in zip(answers, hits) if not ok][:20]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--timing-images", type=int, default=100)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    predictor = Predictor(args.model)
    cxr = SHARED / "covid-cxr"
    split = {r["path"]: r["split"] for r in csv.DictReader(open(ROOT / "splits" / "covid-cxr.csv"))}
    test_films = [(r["path"], cxr / r["path"]) for r in csv.DictReader(open(cxr / "manifest.csv")) if split[r["path"]] == "test"]
    jsrt = [(p.name, p) for p in sorted((SHARED / "jsrt" / "images").rglob("*.jpg"))]
    _, held = not_frontal_split(str(SHARED / "not-frontal-cxr" / "manifest.csv"), 0.4, 0)
    dicom = _decoded((n, s) for n, _, s in pydicom_images())
    photos = [(n, s) for n, _, s in package_images() if n in HELD_OUT]
    grey = [(f"{n} (grey)", _png(np.asarray(Image.open(s).convert("L")) / 255)) for n, s in photos if isinstance(s, str)]
    rng = np.random.default_rng(0)
    front = _decoded(test_films)
    groups = {
        "lateral films, held-out patients": (_decoded((p, p) for p in held["lateral"]), False, 0.95),
        "CT slices, held-out patients": (_decoded((p, p) for p in held["other_modality"]), False, 0.99),
        "pydicom other-modality files (with header)": (dicom, False, 0.99),
        "the same, pixels only (PNG)": (_decoded((n, _png(im)) for n, im, _ in dicom), False, 0.99),
        "photographs and drawings never trained on (colour and grey)": (_decoded(photos + grey), False, 0.99),
        "generated documents, charts, noise (unseen seed)": (_decoded((n, s) for n, _, s in generated(90, 777)), False, 0.99),
        "covid-cxr test films turned 90/180/270 degrees": ([(n, rotate_quarter(im, rng), i) for n, im, i in front[::3]], False, 0.99),
        "covid-cxr test split (frontal)": (front, True, 0.995),
        "JSRT (frontal; 70 % of its patients trained the gate)": (_decoded(jsrt), True, 0.995),
    }
    results = {}
    for name, (items, answered, target) in groups.items():
        r = _rate(predictor, items, answered)
        results[name] = {**r, "target": target, "answered_is_right": answered}
        print(f"{name}: {'answered' if answered else 'not answered'} {r['rate']:.4f} of {r['n']} (target {target})", flush=True)
    # Time per image, one at a time, prepared from decoded pixels: gate on vs off (the segmenter runs either way
    # when the model crops to the lungs; then the gate adds its head and the header rules only).
    sample = [(im, info) for _, im, info in front[:args.timing_images]]
    timing = {}
    for gate in (True, False):
        p = Predictor(args.model, gate=gate)
        for im, info in sample[:5]:
            p.answer("w", p.check(im, info))
        t0 = time.perf_counter()
        for im, info in sample:
            p.answer("t", p.check(im, info))
        timing["with gate" if gate else "without gate"] = 1000 * (time.perf_counter() - t0) / len(sample)
    overhead = timing["with gate"] / timing["without gate"] - 1
    print(f"per image: {timing['with gate']:.2f} ms with the gate, {timing['without gate']:.2f} ms without ({overhead:+.1%})")
    table = ["| images | should be | got it right | n | target | reasons given |", "|---|---|---:|---:|---:|---|"]
    for name, r in results.items():
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items())) or "–"
        table.append(f"| {name} | {'answered' if r['answered_is_right'] else 'not answered'} | **{r['rate']:.1%}** | {r['n']} | "
                     f"{r['target']:.1%} | {reasons} |")
    table += ["", f"Per-image inference (decode excluded, one image at a time, {torch.get_num_threads()} torch threads): "
              f"{timing['with gate']:.2f} ms with the gate, {timing['without gate']:.2f} ms without: **{overhead:+.1%}**."]
    save("gate", {"title": "Input gate: not a frontal chest X-ray, no answer", "table": table, "results": results,
                  "timing_ms": timing, "overhead": overhead, "command": "python bench/gate.py"})


if __name__ == "__main__":
    main()
