"""DICOM decoding time by film size, and one film end to end: the product against the float64 path it replaced.

    .venv/bin/python bench/dicom_decode.py [--repeats 5]

CR films (12 bits stored in 16, uncompressed) made from a real X-ray of the shared data set at 512, 2048
and 3000 px, each plain and with what most CR exports carry (RescaleSlope/Intercept, WindowCenter/Width).
Both paths decode at full resolution, as `Predictor` does by default (``reduced_decode`` is opt-in), and
must give the same numbers bit for bit; the bench stops if they do not. One thread (OMP_NUM_THREADS=1), milliseconds per film,
the best of ``--repeats`` runs of ``--films`` decodes: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from common import ROOT, save  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
import dicoms  # noqa: E402  (the tests' DICOM builders)

from covidxray import imaging  # noqa: E402
from covidxray.imaging import read_image  # noqa: E402
from covidxray.predictor import Predictor  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "covid-cxr"
CR_TAGS = {"RescaleSlope": 1, "RescaleIntercept": 0, "WindowCenter": 2048, "WindowWidth": 4096}


def film(side: int, tags: dict) -> bytes:
    """A 12-bit CR file of a shared X-ray, resized to ``side`` px."""
    return dicoms.to_bytes(dicoms.cr(dicoms.xray_pixels(dicoms.xray_files(DATA / "manifest.csv", 1)[0], side), **tags))


def float64_path(pixels: np.ndarray, transform, label: str) -> np.ndarray:
    """Before: both LUTs and the min-max scaling in float64 over every pixel (what `min_max_of` replaced)."""
    values = np.asarray(transform(pixels), dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"{label}: non-finite")
    low, high = values.min(), values.max()
    return ((values - low) / (high - low)).astype(np.float32)


@contextmanager
def before():
    """The product with its DICOM scaling swapped for the float64 path."""
    saved, imaging.min_max_of = imaging.min_max_of, float64_path
    try:
        yield
    finally:
        imaging.min_max_of = saved


def best_ms(fn, repeats: int, films: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(films):
            fn()
        times.append((time.perf_counter() - start) / films * 1000)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--films", type=int, default=3, help="decodes per timed run")
    args = parser.parse_args()
    predictor, rows = Predictor(None, threads=1), []
    for px in (512, 2048, 3000):
        for kind, tags in (("plain", {}), ("rescale + window", CR_TAGS)):
            data = film(px, tags)
            with before():
                old_image, old_answer = read_image(data)[0], predictor.predict_bytes(data)
                old = [best_ms(lambda: read_image(data), args.repeats, args.films),
                       best_ms(lambda: predictor.predict_bytes(data), args.repeats, args.films)]
            if not np.array_equal(read_image(data)[0], old_image) or predictor.predict_bytes(data) != old_answer:
                raise SystemExit(f"{px} px {kind}: the two paths differ")
            now = [best_ms(lambda: read_image(data), args.repeats, args.films),
                   best_ms(lambda: predictor.predict_bytes(data), args.repeats, args.films)]
            rows.append({"side": px, "tags": kind, "decode_before_ms": round(old[0], 1), "decode_now_ms": round(now[0], 1),
                         "predict_before_ms": round(old[1], 1), "predict_now_ms": round(now[1], 1), "identical": True})
            print(rows[-1], flush=True)
    table = ["| film | tags | decode: float64 path ms | decode: now ms | one film end to end: before ms | now ms | "
             "same numbers and answer |", "|---|---|---:|---:|---:|---:|---|"]
    table += [f"| {r['side']} px CR | {r['tags']} | {r['decode_before_ms']} | {r['decode_now_ms']} | "
              f"{r['predict_before_ms']} | {r['predict_now_ms']} | yes |" for r in rows]
    note = (f"One thread, milliseconds per film (best of {args.repeats} runs of {args.films}): decode is file bytes to a "
            "float32 image at full resolution (`read_image`); end to end is `Predictor.predict_bytes` on the bundled model "
            "(decode, gate, lung crop, classifier). Now: the LUTs and the scaling through a table over the stored values "
            "(`covidxray.pixels.min_max_of`); before: in float64 over every pixel.")
    save("dicom-decode", {"title": "DICOM decoding by film size: a table over the stored values against float64 over "
                                   "every pixel", "rows": rows, "table": table + ["", note],
                          "command": f"python bench/dicom_decode.py --repeats {args.repeats}"})


if __name__ == "__main__":
    main()
