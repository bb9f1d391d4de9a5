"""Command-line interface: ``covidxray {data,train,evaluate,predict} ...``.

Exit codes: 0 success, 1 a check found problems (leakage, unreadable files), 2 bad input
(an unreadable image, a malformed manifest, a missing model), with a one-line message naming
the file and the problem instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import CovidXrayError, ImageError

log = logging.getLogger("covidxray")


# ---------------------------------------------------------------------------------------------- data


def cmd_data_split(args: argparse.Namespace) -> int:
    from collections import Counter

    from .data import load_samples, make_splits, write_splits

    fractions = tuple(float(x) for x in args.fractions.split(","))
    samples = make_splits(load_samples(args.data), fractions=fractions, seed=args.seed, max_distance=args.dup_distance)
    write_splits(args.out, samples)
    counts = Counter((s.split, s.label_name) for s in samples)
    for split in ("train", "val", "test"):
        print(f"{split:5s}  covid {counts[(split, 'covid')]:5d}  normal {counts[(split, 'normal')]:5d}")
    print(f"wrote {args.out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .data import check_samples, load_samples

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
    from .data import load_samples, show_grid

    out = show_grid(load_samples(args.data, args.splits), args.out, per_class=args.per_class, seed=args.seed)
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------------- train / evaluate


def cmd_train(args: argparse.Namespace) -> int:
    from .engine import config_for, train

    if args.resume:
        from .engine import TrainConfig

        run = train(TrainConfig(out=args.resume, epochs=args.epochs or 0), resume=True)
    else:
        if not args.data:
            raise CovidXrayError("train needs --data (a folder tree or a CSV manifest), or --resume RUN_DIR")
        overrides = {k: getattr(args, k) for k in (
            "data", "splits", "out", "arch", "size", "epochs", "batch_size", "lr", "weight_decay", "seed",
            "limit", "device", "cache_dir", "target_sensitivity", "patience", "freeze", "equalize", "balanced", "augment",
        )}
        if args.weights is not None:
            overrides["weights"] = None if args.weights == "none" else args.weights
        overrides["deterministic"] = args.deterministic or None
        run = train(config_for(args.recipe, **overrides))
    print(f"run written to {run} (model.json, model.safetensors, history.csv, curves.png)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    report = evaluate_run(args.run, data=args.data, splits=args.splits, split=args.split, out=args.out,
                          n_boot=args.bootstrap, cache_dir=args.cache_dir)
    m = report["metrics"]
    print(f"positive class: COVID-19 — {report['n']} images, threshold {report['threshold']:.4f}")
    for name, v in m.items():
        print(f"  {name:12s} {v['value']:.4f}  (95% CI {v['ci_low']:.4f}–{v['ci_high']:.4f})" if v["value"] is not None
              else f"  {name:12s} n/a")
    print(f"report written to {report['meta']['out']}")
    return 0


# ---------------------------------------------------------------------------------------------- predict


def cmd_predict(args: argparse.Namespace) -> int:
    import csv
    import io

    from .predictor import Predictor, expand_inputs
    from .utils import atomic_write_text

    paths = expand_inputs(args.inputs)
    if not paths:
        raise CovidXrayError(f"no files found for {' '.join(args.inputs)}")
    predictor = Predictor(args.model, device=args.device, backend=args.backend)
    rows, failed = [], 0
    for result in predictor.predict_paths(paths, batch_size=args.batch_size):
        if isinstance(result, ImageError):
            failed += 1
            print(f"error: {result}", file=sys.stderr)
            if args.format == "json":
                print(json.dumps({"path": result.source, "error": result.reason}))
            continue
        rows.append(result)
        if args.format == "json":
            print(json.dumps(result.to_dict()))
        elif not args.out:
            verdict = "COVID-19 positive" if result.label == "covid" else "negative (normal)"
            print(f"{result.path}\t{result.label}\tP(covid)={result.probability:.4f}\t{verdict}")
    if args.out:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["path", "label", "probability", "threshold"])
        w.writeheader()
        w.writerows(r.to_dict() for r in rows)
        atomic_write_text(args.out, buf.getvalue())
        print(f"wrote {len(rows)} predictions to {args.out}")
    if args.format == "table":
        print(f"# model {predictor.name}, threshold {predictor.threshold:.4f}; positive class: COVID-19. "
              "Research software, not a diagnosis.", file=sys.stderr)
    return 2 if failed else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain_files
    from .predictor import Predictor, expand_inputs

    paths = expand_inputs(args.inputs)
    if not paths:
        raise CovidXrayError(f"no files found for {' '.join(args.inputs)}")
    results = explain_files(Predictor(args.model, device=args.device), paths, args.out)
    failed = 0
    for r in results:
        if "error" in r:
            failed += 1
            print(f"error: {r['error']}", file=sys.stderr)
        else:
            print(f"{r['path']}\t{r['label']}\tP(covid)={r['probability']:.4f}\t-> {r['overlay']}")
    return 2 if failed else 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    out = export_onnx(args.run, args.onnx, opset=args.opset)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from .card import write_card

    print(f"wrote {write_card(args.run, args.out)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Classify a few held-out X-rays of the shared data set with the bundled model."""
    import os
    from itertools import zip_longest

    from .data import load_samples
    from .predictor import Predictor

    predictor = Predictor(args.model)
    root = Path(os.environ.get("COVIDXRAY_DATA", Path(__file__).resolve().parents[3] / "shared" / "datasets" / "covid-cxr"))
    print(f"model: {predictor.name}, threshold {predictor.threshold:.3f} (positive class: COVID-19)")
    if not (root / "manifest.csv").is_file():
        print(f"no demo images ({root}/manifest.csv missing); try: covidxray predict YOUR_XRAY.png")
        return 0
    split_file = Path(__file__).resolve().parents[2] / "splits" / "covid-cxr.csv"
    samples = [s for s in load_samples(root / "manifest.csv", split_file if split_file.is_file() else None) if s.split in ("test", "")]
    def round_robin(label: int, n: int) -> list:  # alternate sources so one collection does not fill the demo
        by_source: dict[str, list] = {}
        for s in samples:
            if s.label == label:
                by_source.setdefault(s.source, []).append(s)
        mixed = [s for group in zip_longest(*by_source.values()) for s in group if s is not None]
        return mixed[:n]

    picks = round_robin(1, args.n // 2) + round_robin(0, args.n - args.n // 2)
    right = 0
    for s, r in zip(picks, predictor.predict_paths([s.path for s in picks])):
        if isinstance(r, ImageError):
            print(f"error: {r}")
            continue
        right += r.label == s.label_name
        print(f"{s.key:45s} truth {s.label_name:6s} -> {r.label:6s} P(covid)={r.probability:.3f}")
    print(f"{right}/{len(picks)} correct on held-out test images. Research software, not a diagnosis.")
    print("Next: covidxray predict IMAGE.png | covidxray evaluate RUN | covidxray train --data DATA --out RUN")
    return 0


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .engine import RECIPES
    from .models import REGISTRY

    p = argparse.ArgumentParser(prog="covidxray", description="Detect COVID-19 on chest X-rays (COVID-19 is the positive class).")
    p.add_argument("--version", action="version", version=f"covidxray {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="split, check and show datasets").add_subparsers(dest="data_command", required=True, metavar="ACTION")
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

    t = sub.add_parser("train", help="train a model (writes checkpoint, history, curves)")
    t.add_argument("--data", help="folder tree or CSV manifest")
    t.add_argument("--splits", help="split CSV (default: the data's own split, else one is made)")
    t.add_argument("--out", default="runs/default", help="run directory")
    t.add_argument("--recipe", default="default", choices=sorted(RECIPES), help="preset (default: default)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    t.add_argument("--arch", choices=sorted(REGISTRY))
    t.add_argument("--weights", help="'imagenet' (offline sources only), 'none', or a local weights file")
    t.add_argument("--size", type=int)
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--patience", type=int, help="early-stopping patience in epochs (0: off)")
    t.add_argument("--augment", choices=["cxr", "reference", "none"])
    t.add_argument("--freeze", action=argparse.BooleanOptionalAction, default=None, help="freeze early layers")
    t.add_argument("--equalize", action=argparse.BooleanOptionalAction, default=None, help="histogram equalisation")
    t.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=None, help="class-balanced sampling")
    t.add_argument("--target-sensitivity", type=float, help="choose the threshold for at least this validation sensitivity")
    t.add_argument("--limit", type=int, help="at most N images per split (quick runs)")
    t.add_argument("--seed", type=int)
    t.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"])
    t.add_argument("--cache-dir", help="decoded-image cache (default $COVIDXRAY_CACHE or ~/.cache/covidxray)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a run on a split: metrics with 95%% CIs, plots, report")
    e.add_argument("run", help="run folder (or model.json)")
    e.add_argument("--data", help="data to evaluate (default: the run's training data)")
    e.add_argument("--splits", help="split CSV (default: the run's)")
    e.add_argument("--split", default="test", help="which split (default test; 'all' for every image)")
    e.add_argument("--out", help="report folder (default RUN/eval-SPLIT)")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    e.add_argument("--cache-dir")
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="classify X-rays (files, folders, globs) as COVID-19 positive or negative")
    pr.add_argument("inputs", nargs="+", metavar="PATH")
    pr.add_argument("--model", help="run folder or model.json (default: the bundled model)")
    pr.add_argument("--format", choices=["table", "json"], default="table")
    pr.add_argument("--out", help="also write predictions to this CSV")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    pr.add_argument("--backend", default="torch", choices=["torch", "onnx", "auto"],
                    help="torch (default), onnx (needs `covidxray export`), auto (onnx when the file exists)")
    pr.set_defaults(func=cmd_predict)

    xp = sub.add_parser("explain", help="Grad-CAM: where the model looked (overlay PNG + raw .npy per image)")
    xp.add_argument("inputs", nargs="+", metavar="IMAGE")
    xp.add_argument("--out", required=True, help="output folder")
    xp.add_argument("--model", help="run folder or model.json (default: the bundled model)")
    xp.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    xp.set_defaults(func=cmd_explain)

    ex = sub.add_parser("export", help="export a model to ONNX (with its preprocessing contract as JSON)")
    ex.add_argument("run", help="run folder or model.json")
    ex.add_argument("--onnx", required=True, metavar="OUT.onnx", help="ONNX file to write (OUT.json is written beside it)")
    ex.add_argument("--opset", type=int, default=17)
    ex.set_defaults(func=cmd_export)

    cd = sub.add_parser("card", help="write MODEL_CARD.md for a run from its checkpoint and evaluation reports")
    cd.add_argument("run")
    cd.add_argument("--out", help="default RUN/MODEL_CARD.md")
    cd.set_defaults(func=cmd_card)

    d = sub.add_parser("demo", help="classify a few held-out X-rays with the bundled model")
    d.add_argument("--model", help="run folder or model.json (default: the bundled model)")
    d.add_argument("-n", type=int, default=8, help="number of images (half COVID-19, half normal)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except CovidXrayError as e:
        print(f"covidxray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("covidxray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
