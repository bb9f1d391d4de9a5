"""Does the model answer the film, or the way the file was made? The test split, re-made several ways.

Every covid-cxr normal went through one resizing pipeline (RSNA/NIH films squashed to 224 x 224 by
their publisher), and normal films from elsewhere go through others. A model that learned the
pipeline changes its answers when the same films are re-made; one that learned the lungs does not.
Each variant re-makes every test film (decoded pixels -> the variant -> PNG bytes -> the model, with
its input gate) and reports specificity on the normals and sensitivity on the COVID-19 films at the
stored threshold, next to the films as published. The normals of the other origins (JSRT, Shenzhen,
Montgomery: every Nth with ``--every``) are included, and the largest change of each origin's
specificity against the films as published is checked against issue 19's limit (0.05).

    .venv/bin/python bench/pipeline_probe.py [--model RUN] [--name NAME]

Writes bench/results/pipeline-probe[-NAME].json and its table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import warnings

import numpy as np
from PIL import Image
from scipy import ndimage

from common import ROOT, save
from covidxray.checkpoint import default_model_path
from covidxray.imaging import load_image
from covidxray.predictor import Predictor

SHARED = ROOT.parent / "shared" / "datasets"


def _encode(a: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.round(a * 255), 0, 255).astype(np.uint8)).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _resize(a: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    return np.asarray(Image.fromarray(np.round(a * 255).astype(np.uint8)).resize(size, resample), dtype=np.float32) / 255


VARIANTS = {
    "as published": lambda a: _encode(a),
    "squashed to 224 x 224 (bilinear), JPEG 92": lambda a: _encode(_resize(a, (224, 224), Image.Resampling.BILINEAR), "JPEG", quality=92),
    "longer side to 320 (Lanczos), JPEG 92": lambda a: _encode(
        _resize(a, (round(320 * a.shape[1] / max(a.shape)), round(320 * a.shape[0] / max(a.shape))), Image.Resampling.LANCZOS),
        "JPEG", quality=92),
    "JPEG quality 40": lambda a: _encode(a, "JPEG", quality=40),
    "blurred (sigma 1 px)": lambda a: _encode(ndimage.gaussian_filter(a, 1.0)),
    "sharpened (unsharp mask)": lambda a: _encode(np.clip(a + 0.8 * (a - ndimage.gaussian_filter(a, 2.0)), 0, 1)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--name", default="", help="suffix of the result file (compare several models)")
    ap.add_argument("--every", type=int, default=2, help="take every N-th test film (default 2)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    predictor = Predictor(args.model, backend="torch")
    split = {r["path"]: r["split"] for r in csv.DictReader(open(ROOT / "splits" / "covid-cxr.csv"))}
    rows = [r for r in csv.DictReader(open(SHARED / "covid-cxr" / "manifest.csv")) if split[r["path"]] == "test"][::args.every]
    films = [(load_image(SHARED / "covid-cxr" / r["path"]), r["label"]) for r in rows]
    films += [(load_image(p), "jsrt-normal") for p in sorted((SHARED / "jsrt" / "images" / "normal").glob("*.jpg"))]
    tb = [r for r in csv.DictReader(open(SHARED / "tb-cxr" / "manifest.csv")) if r["label"] == "normal"]
    films += [(load_image(SHARED / "tb-cxr" / r["path"]), f"{r['source']}-normal") for r in tb[::args.every]]
    origins = {"normal": "covid-cxr normals", "jsrt-normal": "JSRT normals", "shenzhen-normal": "Shenzhen normals",
               "montgomery-normal": "Montgomery normals"}
    results = {}
    for name, remake in VARIANTS.items():
        answers = [(predictor.predict_bytes(remake(image), name), label) for image, label in films]
        def rate(label: str, want: str) -> float:
            got = [a for a, lab in answers if lab == label and a.answered]
            return float(np.mean([a.label == want for a in got])) if got else float("nan")
        results[name] = {**{f"specificity ({what})": rate(label, "normal") for label, what in origins.items()},
                         "sensitivity (covid-cxr COVID-19)": rate("covid", "covid"),
                         "not answered": sum(not a.answered for a, _ in answers)}
        print(name, {k: round(v, 3) for k, v in results[name].items()}, flush=True)
    cols = list(next(iter(results.values())))
    table = ["| films re-made | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    table += [f"| {name} | " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
              for name, r in results.items()]
    base = results["as published"]
    worst = {what: max(abs(r[f"specificity ({what})"] - base[f"specificity ({what})"]) for r in results.values())
             for what in origins.values()}
    table.append(f"\nModel `{predictor.name}` at its threshold {predictor.threshold:.3f}; {len(rows)} covid-cxr test films "
                 f"(every {args.every}th), JSRT's {sum(lab == 'jsrt-normal' for _, lab in films)} normals and every "
                 f"{args.every}th of tb-cxr's ({len(tb[::args.every])}). Largest change of specificity against the films as "
                 "published (issue 19's limit: 0.05): " + ", ".join(
                     f"{what} {d:.3f}{'' if d <= 0.05 else ' (over)'}" for what, d in worst.items()) + ".")
    suffix = f"-{args.name}" if args.name else ""
    save(f"pipeline-probe{suffix}", {"title": f"Same films, other files{': ' + args.name if args.name else ''}",
                                      "table": table, "results": results, "largest_specificity_change": worst,
                                      "command": "python bench/pipeline_probe.py" + (f" --model {args.model} --name {args.name}" if args.name else "")
                                                 + (f" --every {args.every}" if args.every != 2 else "")})


if __name__ == "__main__":
    main()
