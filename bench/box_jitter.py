"""How far the lung box moves the answer: the bundled model with its crop box moved by a few per cent.

The classifier sees the box around the lungs that the segmenter finds (widened by the model's margin). A box a few
pixels different (another segmenter, an int8 graph, a film framed a little differently) should not change the
answer. Each film of each origin's test split (at most ``--per-group`` per origin and finding, the first by path) is
classified by the PyTorch model with its own box, then with that box moved up, down, left and right by ``--shift``
of its height or width, and with the margin at half and at one and a half times the model's.

Reported per origin and finding: the median and 95th percentile over films of the largest change of P(COVID-19)
under those six boxes, the share of films whose decision at the model's threshold changes under at least one, and
the share called COVID-19 with the film's own box and with P(COVID-19) averaged over the seven boxes (averaging
over boxes at test time: a candidate remedy, seven times the classifier's work).

    python bench/box_jitter.py [--shift 0.03] [--per-group 150] [--model RUN --name box-jitter-NAME]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch
from tqdm import tqdm

from common import save
from origins import pooled_rows
from covidxray.errors import ImageError
from covidxray.imaging import read_image
from covidxray.inference import predict_probs
from covidxray.predictor import Predictor

def moves(shift: float) -> list[tuple[tuple[float, float], float]]:
    """Up, down, left, right by ``shift`` of the box's size, then half and 1.5x its margin (`Preprocess.prepare_moved`)."""
    return [((-shift, 0.0), 1.0), ((shift, 0.0), 1.0), ((0.0, -shift), 1.0), ((0.0, shift), 1.0),
            ((0.0, 0.0), 0.5), ((0.0, 0.0), 1.5)]


def film_probabilities(predictor: Predictor, path: str, shift: float) -> np.ndarray | None:
    """P(COVID-19) of one film with its own box (first) and the six moved ones; None if it cannot be read."""
    try:
        image = read_image(path)[0]
    except ImageError:
        return None
    prepared = predictor.preprocess.prepare_moved(image, moves(shift))
    return predict_probs(predictor.model, torch.from_numpy(prepared), predictor.preprocess,
                         temperature=predictor.temperature)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shift", type=float, default=0.03, help="how far each box moves, as a share of its height or width")
    ap.add_argument("--per-group", type=int, default=150, help="most films per origin and finding (test split)")
    ap.add_argument("--model", help="run folder or model.json (default: the bundled model)")
    ap.add_argument("--name", default="box-jitter", help="result file bench/results/NAME.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    predictor = Predictor(args.model, backend="torch")
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path, _, origin, _, split, _, finding in sorted(pooled_rows()):
        if split == "test" and len(groups[(origin, finding)]) < args.per_group:
            groups[(origin, finding)].append(path)
    t = predictor.threshold
    rows, table = [], ["| origin | finding | films | largest change of P(COVID-19): median / 95th pct | decision changed by "
                       "a moved box: any / shifted / other margin | median change, shifted boxes only | called COVID-19: own box → averaged "
                       "over 7 boxes |", "|---|---|---:|---:|---:|---:|---:|"]
    for (origin, finding), paths in sorted(groups.items()):
        probs = [p for p in (film_probabilities(predictor, path, args.shift)
                             for path in tqdm(paths, desc=f"{origin}/{finding}", leave=False)) if p is not None]
        p = np.stack(probs)
        change = np.abs(p[:, 1:] - p[:, :1]).max(axis=1)
        changed = (p[:, 1:] >= t) != (p[:, :1] >= t)
        flipped, by_shift, by_margin = changed.any(axis=1), changed[:, :4].any(axis=1), changed[:, 4:].any(axis=1)
        row = {"origin": origin, "finding": finding, "films": len(p), "median_change": float(np.median(change)),
               "p95_change": float(np.quantile(change, 0.95)), "flipped": float(flipped.mean()),
               "flipped_by_shift": float(by_shift.mean()), "flipped_by_margin": float(by_margin.mean()),
               "median_change_by_shift": float(np.median(np.abs(p[:, 1:5] - p[:, :1]).max(axis=1))),
               "called_covid_own_box": float((p[:, 0] >= t).mean()), "called_covid_averaged": float((p.mean(1) >= t).mean())}
        rows.append(row)
        table.append(f"| {origin} | {finding} | {row['films']} | {row['median_change']:.3f} / {row['p95_change']:.3f} | "
                     f"{row['flipped']:.1%} / {row['flipped_by_shift']:.1%} / {row['flipped_by_margin']:.1%} | "
                     f"{row['median_change_by_shift']:.3f} | {row['called_covid_own_box']:.3f} → {row['called_covid_averaged']:.3f} |")
        print(table[-1], flush=True)
    note = (f"{'Model ' + args.model if args.model else 'Bundled model'} {predictor.name}, PyTorch, threshold {t:.3f}; boxes moved by {args.shift:.0%} of their size "
            f"(up, down, left, right) and margins {predictor.preprocess.lung_margin / 2:.2f} and "
            f"{predictor.preprocess.lung_margin * 1.5:.2f} (the model's: {predictor.preprocess.lung_margin:.2f}); test "
            f"split of each origin, at most {args.per_group} films per origin and finding. COVID-19 is the positive class.")
    model = args.model.replace("../", "") if args.model else "bundled model"
    save(args.name, {"title": f"How far the lung box moves the answer: {model}", "rows": rows, "table": table + ["", note],
                        "command": f"python bench/box_jitter.py --shift {args.shift} --per-group {args.per_group}"
                                   + (f" --model {args.model} --name {args.name}" if args.model else "")})
    print(note)


if __name__ == "__main__":
    main()
