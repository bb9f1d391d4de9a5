"""``covidxray data {split,check,show}``: make a split file, check a data set, draw a sample grid."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``data`` command and its actions to the top-level subparsers."""
    data = sub.add_parser("data", help="split, check and show datasets").add_subparsers(
        dest="data_command", required=True, metavar="ACTION")
    s = data.add_parser("split", help="make a patient-grouped, label x source stratified train/val/test split file")
    s.add_argument("data", help="folder tree or CSV manifest")
    s.add_argument("--out", required=True, help="split CSV to write (path,split)")
    s.add_argument("--fractions", default="0.7,0.15,0.15", help="train,val,test shares (default 0.7,0.15,0.15)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dup-distance", type=int, default=4, help="pHash distance under which images are kept together")
    s.set_defaults(func=cmd_data_split)
    c = data.add_parser("check", help="count images, find unreadable files and leakage across splits")
    c.add_argument("data")
    c.add_argument("--splits", help="split CSV to apply")
    c.add_argument("--dup-distance", type=int, default=4, help="pHash distance counted as a near-duplicate (default 4)")
    c.add_argument("--allow-leaks", action="store_true", help="exit 0 even when leakage is found")
    c.add_argument("--no-read", action="store_true", help="skip decoding every image")
    c.set_defaults(func=cmd_data_check)
    sh = data.add_parser("show", help="draw a labelled sample grid to a PNG")
    sh.add_argument("data")
    sh.add_argument("--splits")
    sh.add_argument("--out", required=True)
    sh.add_argument("--per-class", type=int, default=8)
    sh.add_argument("--seed", type=int, default=0)
    sh.set_defaults(func=cmd_data_show)


def cmd_data_split(args: argparse.Namespace) -> int:
    from ..data import load_samples, make_splits, write_splits

    fractions = tuple(float(x) for x in args.fractions.split(","))
    samples = make_splits(load_samples(args.data), fractions=fractions, seed=args.seed, max_distance=args.dup_distance)
    write_splits(args.out, samples)
    counts = Counter((s.split, s.label_name) for s in samples)
    for split in ("train", "val", "test"):
        print(f"{split:5s}  covid {counts[(split, 'covid')]:5d}  normal {counts[(split, 'normal')]:5d}")
    print(f"wrote {args.out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from ..data import check_samples, load_samples

    samples = load_samples(args.data, args.splits)
    res = check_samples(samples, max_distance=args.dup_distance, read_images=not args.no_read)
    print(f"{'split':6s} {'label':7s} {'source':20s} {'images':>7s}")
    for (split, label, source), n in sorted(res.counts.items()):
        print(f"{split:6s} {label:7s} {source:20s} {n:7d}")
    by_label = {lab: sum(n for (_, l, _), n in res.counts.items() if l == lab) for lab in ("covid", "normal")}
    print(f"total: {len(samples)} images — covid (COVID-19, positive class) {by_label['covid']}, normal {by_label['normal']}")
    print(f"unreadable files: {len(res.unreadable)}")
    for path, reason in res.unreadable:
        print(f"  {path}: {reason}")
    print(f"patients in more than one split: {len(res.patient_leaks)}")
    for pid, splits in res.patient_leaks[:50]:
        print(f"  {pid}: {', '.join(splits)}")
    print(f"near-duplicate pairs across splits (pHash distance <= {args.dup_distance}): {len(res.duplicate_leaks)}")
    for a, b, d in res.duplicate_leaks[:50]:
        print(f"  {a} <-> {b} (distance {d})")
    if res.unreadable:
        return 1
    if res.leaks and not args.allow_leaks:
        print("leakage found: fix the split (covidxray data split) or pass --allow-leaks", file=sys.stderr)
        return 1
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    from ..data import load_samples, show_grid

    out = show_grid(load_samples(args.data, args.splits), args.out, per_class=args.per_class, seed=args.seed)
    print(f"wrote {out}")
    return 0
