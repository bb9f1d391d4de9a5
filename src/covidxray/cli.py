"""Command-line interface: ``covidxray {data,train,evaluate,calibrate,audit,predict,card,...} ...``.

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
    from . import distributed
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
            "compile", "mask_border",
        )}
        if args.weights is not None:
            overrides["weights"] = None if args.weights == "none" else args.weights
        overrides["deterministic"] = args.deterministic or None
        run = train(config_for(args.recipe, **overrides))
    if distributed.get_env().is_main:
        print(f"run written to {run} (model.json, model.safetensors, history.csv, curves.png)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run

    report = evaluate_run(args.run, data=args.data, splits=args.splits, split=args.split, out=args.out,
                          n_boot=args.bootstrap, cache_dir=args.cache_dir, external=args.external)
    m = report["metrics"]
    print(f"positive class: COVID-19 — {report['n']} images, threshold {report['threshold']:.4f}")
    for name, v in m.items():
        gap = f"  gap vs internal test {report['gap'][name]:+.4f}" if report.get("gap", {}).get(name) is not None else ""
        print(f"  {name:12s} {v['value']:.4f}  (95% CI {v['ci_low']:.4f}–{v['ci_high']:.4f}){gap}" if v["value"] is not None
              else f"  {name:12s} n/a")
    cal = report["calibration"]
    before = f"{cal['uncalibrated']['ece']:.4f} at T=1, " if "uncalibrated" in cal else ""
    print(f"  calibration  ECE {before}{cal['ece']:.4f} at T={cal['temperature']:.3f}")
    print(f"report written to {report['meta']['out']}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import calibrate_run

    cal = calibrate_run(args.run, data=args.data, splits=args.splits, target_sensitivity=args.target_sensitivity,
                        threshold=args.threshold, keep_temperature=args.keep_temperature, cache_dir=args.cache_dir)
    print(f"temperature {cal.temperature:.4f}: validation ECE {cal.ece_before:.4f} -> {cal.ece_after:.4f}, "
          f"NLL {cal.nll_before:.4f} -> {cal.nll_after:.4f} ({cal.n} images)")
    print(f"threshold {cal.threshold:.4f}: {cal.threshold_rule}")
    print("validation thresholds for sensitivity " + ", ".join(f">= {k}: {v:.4f}" for k, v in cal.sensitivity_thresholds.items()))
    print(f"rewrote {args.run} model.json (weights unchanged); evaluate again: earlier reports used the old values")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit_run, summary

    report = audit_run(args.run, data=args.data, splits=args.splits, split=args.split, out=args.out, limit=args.limit,
                       probe_limit=args.probe_limit, cache_dir=args.cache_dir)
    print("\n".join(f"- {line}" for line in summary(report)))
    out = Path(args.out) if args.out else (Path(args.run) if Path(args.run).is_dir() else Path(args.run).parent) / "audit"
    print(f"audit written to {out} (audit.md, audit.json, PNGs)")
    return 0


# ---------------------------------------------------------------------------------------------- predict


def cmd_predict(args: argparse.Namespace) -> int:
    from . import distributed
    from .predictor import (
        PartWriter, Predictor, expand_inputs, merge_predictions, read_path_manifest, read_predictions, remove_parts,
    )

    if not args.inputs and not args.manifest:
        raise CovidXrayError("predict needs image files, folders or globs, or --manifest CSV")
    paths = expand_inputs(args.inputs) + (read_path_manifest(args.manifest) if args.manifest else [])
    if not paths:
        raise CovidXrayError(f"no files found for {' '.join(args.inputs) or args.manifest}")
    dist, device = distributed.setup(args.device)  # rank 0 of 1 unless started by torchrun
    if (args.resume or dist.enabled) and not args.out:
        raise CovidXrayError("--resume and torchrun runs need --out FILE.csv (rows are collected in FILE.csv.partN first)")
    predictor = Predictor(args.model, device=str(device), backend=args.backend)
    mine = paths[dist.rank::dist.world_size]  # each process takes every world_size-th input
    writer = None
    if args.out:
        if args.resume:
            done = read_predictions(args.out)
            log.info("resuming: %d of %d inputs already predicted", sum(str(p) in done for p in paths), len(paths))
            mine = [p for p in mine if str(p) not in done]
        distributed.barrier()  # every rank has read the old part files before any rank rewrites its own
        if dist.is_main and not args.resume:
            remove_parts(args.out, first=dist.world_size)  # left by an earlier run with more processes
        writer = PartWriter(args.out, dist.rank, resume=args.resume, flush_every=args.batch_size)
    echo = not dist.enabled  # under torchrun the merged --out is the output: ranks would interleave on stdout
    failed = 0
    try:
        for result in predictor.predict_paths(mine, batch_size=args.batch_size, workers=args.workers):
            if isinstance(result, ImageError):
                failed += 1
                print(f"error: {result}", file=sys.stderr)
                if args.format == "json" and echo:
                    print(json.dumps({"path": result.source, "error": result.reason}))
                continue
            if writer is not None:
                writer.write(result)
            if args.format == "json" and echo:
                print(json.dumps(result.to_dict()))
            elif not args.out:
                verdict = "COVID-19 positive" if result.label == "covid" else "negative (normal)"
                print(f"{result.path}\t{result.label}\tP(covid)={result.probability:.4f}\t{verdict}")
    finally:
        if writer is not None:
            writer.close()  # what was predicted so far stays on disk for --resume
    failed = distributed.all_reduce_sum([failed])[0]
    if args.out:
        distributed.barrier()  # every part file is complete
        if dist.is_main:
            n = merge_predictions(args.out, paths, resume=args.resume)
            print(f"wrote {n} predictions to {args.out}")
    if args.format == "table" and dist.is_main:
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

    md, html = write_card(args.run, args.out, external=args.external)
    print(f"wrote {md} and {html}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the REST API and the web page with uvicorn until Ctrl-C."""
    import uvicorn

    from .predictor import Predictor
    from .server import create_app, limit_malloc_arenas

    limit_malloc_arenas()  # before torch, ONNX Runtime or uvicorn start their threads
    # Loaded here, not in the app's start-up, so a bad --model is a one-line error before the port opens.
    predictor = Predictor(args.model, backend=args.backend, threads=args.threads)
    max_bytes = int(args.max_upload_mb * 2**20) if args.max_upload_mb else None
    app = create_app(args.model, predictor=predictor, max_upload_bytes=max_bytes, timeout_s=args.timeout,
                     cors_origins=args.cors_origin)
    print(f"covidxray: serving {predictor.name} ({predictor.backend}) at http://{args.host}:{args.port}/ "
          f"(API docs at /docs); Ctrl-C stops. Research software, not a diagnosis.", flush=True)
    # Our middleware logs every request with its ID and without file names; uvicorn's access log would repeat it.
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info")
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
    t.add_argument("--mask-border", type=float, metavar="FRACTION",
                   help="blank this fraction of each side before equalisation, in training and serving (default 0: off)")
    t.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=None, help="class-balanced sampling")
    t.add_argument("--target-sensitivity", type=float, help="choose the threshold for at least this validation sensitivity")
    t.add_argument("--limit", type=int, help="at most N images per split (quick runs)")
    t.add_argument("--seed", type=int)
    t.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"])
    t.add_argument("--cache-dir", help="decoded-image cache (default $COVIDXRAY_CACHE or ~/.cache/covidxray)")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (pays off on GPU for long runs)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a run on a split: metrics with 95%% CIs, plots, report")
    e.add_argument("run", help="run folder (or model.json)")
    e.add_argument("--data", help="data to evaluate (default: the run's training data)")
    e.add_argument("--splits", help="split CSV (default: the run's)")
    e.add_argument("--split", default="test", help="which split (default test; 'all' for every image)")
    e.add_argument("--out", help="report folder (default RUN/eval-SPLIT)")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    e.add_argument("--cache-dir")
    e.add_argument("--external", metavar="DATA",
                   help="labelled data from elsewhere (folder tree or manifest): every image is evaluated and compared "
                        "with the run's internal test metrics (report in RUN/eval-external-NAME)")
    e.set_defaults(func=cmd_evaluate)

    ca = sub.add_parser("calibrate", help="refit temperature and threshold on the validation split; rewrite model.json")
    ca.add_argument("run", help="run folder (or model.json)")
    rule = ca.add_mutually_exclusive_group()
    rule.add_argument("--target-sensitivity", type=float, help="highest threshold reaching this validation sensitivity")
    rule.add_argument("--threshold", type=float, help="use this threshold as it is")
    ca.add_argument("--keep-temperature", action="store_true", help="keep the stored temperature; only choose the threshold")
    ca.add_argument("--data", help="data holding the validation split (default: the run's training data)")
    ca.add_argument("--splits", help="split CSV (default: the run's)")
    ca.add_argument("--cache-dir")
    ca.set_defaults(func=cmd_calibrate)

    au = sub.add_parser("audit", help="shortcut audit: per-source metrics, source probe, leakage, Grad-CAM location")
    au.add_argument("run", help="run folder (or model.json)")
    au.add_argument("--data", help="data to audit (default: the run's training data)")
    au.add_argument("--splits", help="split CSV (default: the run's)")
    au.add_argument("--split", default="test", help="which split (default test; 'all' for every image)")
    au.add_argument("--out", help="output folder (default RUN/audit)")
    au.add_argument("--limit", type=int, default=400, help="images explained with Grad-CAM (default 400)")
    au.add_argument("--probe-limit", type=int, default=2000, help="images for the source probe and per-source metrics")
    au.add_argument("--cache-dir")
    au.set_defaults(func=cmd_audit)

    pr = sub.add_parser("predict", help="classify X-rays (files, folders, globs) as COVID-19 positive or negative")
    pr.add_argument("inputs", nargs="*", metavar="PATH", help="image files, folders or globs")
    pr.add_argument("--manifest", metavar="CSV", help="also classify the images listed in this CSV's 'path' column")
    pr.add_argument("--model", help="run folder or model.json (default: the bundled model)")
    pr.add_argument("--format", choices=["table", "json"], default="table")
    pr.add_argument("--out", help="also write predictions to this CSV")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    pr.add_argument("--backend", default="torch", choices=["torch", "onnx", "auto"],
                    help="torch (default), onnx (needs `covidxray export`), auto (onnx when the file exists)")
    pr.add_argument("--workers", type=int, default=0,
                    help="DataLoader processes decoding images (default 0: two threads in this process)")
    pr.add_argument("--resume", action="store_true",
                    help="skip inputs that already have a row in --out or its FILE.partN files (after a crash)")
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

    cd = sub.add_parser("card", help="write MODEL_CARD.md and .html for a run from its checkpoint, reports and audit")
    cd.add_argument("run")
    cd.add_argument("--out", help="default RUN/MODEL_CARD.md (the .html is written beside it)")
    cd.add_argument("--external", action="append", default=[], metavar="REPORT_DIR",
                    help="also report this external evaluation folder (default: every RUN/eval-external-*)")
    cd.set_defaults(func=cmd_card)

    d = sub.add_parser("demo", help="classify a few held-out X-rays with the bundled model")
    d.add_argument("--model", help="run folder or model.json (default: the bundled model)")
    d.add_argument("-n", type=int, default=8, help="number of images (half COVID-19, half normal)")
    d.set_defaults(func=cmd_demo)

    sv = sub.add_parser("serve", help="REST API and web page (http://127.0.0.1:8000/ by default)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--model", help="run folder, model.json or .onnx (default: the bundled model)")
    sv.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx"],
                    help="auto (default: onnx when model.onnx exists), torch or onnx")
    sv.add_argument("--max-upload-mb", type=float, help="largest accepted file (default $COVIDXRAY_MAX_UPLOAD_MB or 20)")
    sv.add_argument("--timeout", type=float, default=30.0, help="seconds per image before the answer is 504 (default 30)")
    sv.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                    help="allow browser calls from this origin (repeatable; default: none)")
    sv.add_argument("--threads", type=int, help="model intra-op threads (default: the library's; 1 is faster on a busy machine)")
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.func(args)
        from .distributed import teardown

        teardown()  # under torchrun: no rank exits before rank 0 has written the last files
        return code
    except CovidXrayError as e:
        print(f"covidxray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("covidxray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
