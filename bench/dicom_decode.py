"""DICOM decoding time by film size: the product's `read_image` against the full-film float64 path it replaced.

    .venv/bin/python bench/dicom_decode.py [--repeats 5]

CR films (12 bits stored in 16, uncompressed) made from a real X-ray of the shared data set at 512, 2048
and 3000 px, each plain and with what most CR exports carry (RescaleSlope/Intercept, WindowCenter/Width).
Both paths decode at full resolution, as `Predictor` does by default (``reduced_decode`` is opt-in), and
must give the same numbers bit for bit; the bench stops if they do not. One thread (OMP_NUM_THREADS=1), milliseconds per film,
the best of ``--repeats`` runs of ``--films`` decodes: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402

from common import ROOT, save  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
import dicoms  # noqa: E402  (the tests' DICOM builders)

from covidxray.imaging import read_image  # noqa: E402

DATA = ROOT.parent / "shared" / "datasets" / "covid-cxr"
CR_TAGS = {"RescaleSlope": 1, "RescaleIntercept": 0, "WindowCenter": 2048, "WindowWidth": 4096}


def film(side: int, tags: dict) -> bytes:
    """A 12-bit CR file of a shared X-ray, resized to ``side`` px."""
    return dicoms.to_bytes(dicoms.cr(dicoms.xray_pixels(dicoms.xray_files(DATA / "manifest.csv", 1)[0], side), **tags))


def full_film(data: bytes) -> np.ndarray:
    """Before: both LUTs and the min-max scaling in float64 over every pixel."""
    ds = pydicom.dcmread(io.BytesIO(data))
    values = np.asarray(apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, index=0), dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("non-finite")
    low, high = values.min(), values.max()
    return ((values - low) / (high - low)).astype(np.float32)


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
    rows = []
    for px in (512, 2048, 3000):
        for kind, tags in (("plain", {}), ("rescale + window", CR_TAGS)):
            data = film(px, tags)
            product, before = read_image(data)[0], full_film(data)
            if not np.array_equal(product, before):
                raise SystemExit(f"{px} px {kind}: the two paths differ (max {np.abs(product - before).max():.3g})")
            now = best_ms(lambda: read_image(data), args.repeats, args.films)
            old = best_ms(lambda: full_film(data), args.repeats, args.films)
            rows.append({"side": px, "tags": kind, "before_ms": round(old, 1),
                         "now_ms": round(now, 1), "speed_up": round(old / now, 2), "identical": True})
            print(rows[-1], flush=True)
    table = ["| film | tags | full-film float64 path ms | now ms | speed-up | same numbers |",
             "|---|---|---:|---:|---:|---|"]
    table += [f"| {r['side']} px CR | {r['tags']} | {r['before_ms']} | "
              f"{r['now_ms']} | {r['speed_up']}x | bit for bit |" for r in rows]
    note = (f"One thread, milliseconds per film, file bytes to a float32 image at full resolution (best of {args.repeats} "
            f"runs of {args.films}). Now: the LUTs and the scaling through a table over the stored values "
            "(`covidxray.pixels.min_max_of`); before: in float64 over every pixel.")
    save("dicom-decode", {"title": "DICOM decoding by film size: a table over the stored values against float64 over "
                                   "every pixel", "rows": rows, "table": table + ["", note],
                          "command": f"python bench/dicom_decode.py --repeats {args.repeats}"})


if __name__ == "__main__":
    main()
