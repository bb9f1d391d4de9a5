"""How the lung segmenter behaves outside JSRT: lung-area fraction on covid-cxr films and a contact sheet.

JSRT (where it learned) holds adult PA films without consolidation; covid-cxr holds COVID-19 films
(AP, portable, supine, white-out lungs, some children) and RSNA/NIH normals. For a sample of each
source x label (and every pediatric and AP-supine film) it reports the share of the image called
lung, flags implausible maps, and draws the films with their lung outline and crop box.

    .venv/bin/python bench/segmenter_check.py [--segmenter DIR (default: the bundled model)] [--per-group 40]

Writes bench/results/segmenter_check.json and docs/segmenter_contact_sheet.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from covidxray.checkpoint import default_model_path
from covidxray.imaging import load_image
from covidxray.presets import lung_box
from covidxray.segment import LungSegmenter

ROOT = Path(__file__).resolve().parents[1]
PLAUSIBLE = (0.12, 0.55)  # share of a frontal chest film covered by the lungs (JSRT: 0.20-0.40)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segmenter", default=str(default_model_path()))
    ap.add_argument("--data", default=os.environ.get("COVIDXRAY_DATA", str(ROOT.parent / "shared" / "datasets" / "covid-cxr")))
    ap.add_argument("--per-group", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "segmenter_check.json"))
    ap.add_argument("--sheet", default=str(ROOT / "docs" / "segmenter_contact_sheet.png"))
    args = ap.parse_args()
    seg = LungSegmenter(args.segmenter)
    rows = list(csv.DictReader(open(Path(args.data) / "manifest.csv")))
    rng = np.random.default_rng(0)
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[f"{r['source']}/{r['label']}"].append(r)
        if r["age_group"] == "pediatric":
            groups["pediatric (any source)"].append(r)
        if r["view"] == "AP Supine":
            groups["AP supine (ieee8023)"].append(r)
    report, shown = {}, []
    for name, members in sorted(groups.items()):
        pick = [members[i] for i in rng.permutation(len(members))[:args.per_group]]
        fractions = []
        for r in pick:
            image = load_image(Path(args.data) / r["path"])
            prob = seg(image)
            fractions.append(float((prob >= 0.5).mean()))
            if len(shown) < 48 and (len([s for s in shown if s[0] == name]) < 4):
                shown.append((name, image, prob, fractions[-1]))
        f = np.array(fractions)
        report[name] = {"n": len(f), "median": float(np.median(f)), "p05": float(np.percentile(f, 5)),
                        "p95": float(np.percentile(f, 95)),
                        "implausible": int(((f < PLAUSIBLE[0]) | (f > PLAUSIBLE[1])).sum())}
        print(f"{name:28s} n={len(f):3d} lung fraction median {np.median(f):.3f} (5-95%: {np.percentile(f, 5):.3f}-"
              f"{np.percentile(f, 95):.3f}), outside {PLAUSIBLE}: {report[name]['implausible']}")
    out = {"segmenter": seg.meta.get("weights_sha256"), "plausible_range": PLAUSIBLE, "groups": report,
           "command": "python bench/segmenter_check.py"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    cols = 8
    fig = Figure(figsize=(2 * cols, 2.2 * ((len(shown) + cols - 1) // cols)), dpi=90)
    for k, (name, image, prob, frac) in enumerate(shown):
        ax = fig.add_subplot((len(shown) + cols - 1) // cols, cols, k + 1)
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        h, w = image.shape
        ax.contour(np.linspace(0, w, prob.shape[1]), np.linspace(0, h, prob.shape[0]), prob, levels=[0.5], colors="lime",
                   linewidths=0.8)
        top, left, bottom, right = lung_box(prob, 0.1)
        ax.add_patch(__import__("matplotlib.patches", fromlist=["Rectangle"]).Rectangle(
            (left * w, top * h), (right - left) * w, (bottom - top) * h, fill=False, ec="yellow", lw=0.8, ls="--"))
        ax.set_title(f"{name}\nlung {frac:.0%}", fontsize=6)
        ax.axis("off")
    fig.suptitle("Lung segmenter on covid-cxr films (green: lung outline; yellow: crop box with 10% margin)", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.sheet)
    print(f"wrote {args.out} and {args.sheet}")


if __name__ == "__main__":
    main()
