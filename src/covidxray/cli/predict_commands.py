"""Commands that classify: ``predict``, ``explain``, ``demo``, ``serve``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
from itertools import zip_longest
from pathlib import Path

from .. import DISCLAIMER
from ..config import for_workers, settings
from ..errors import CovidXrayError, ImageError
from ..utils import usable_cores
from .site_commands import sites_flag

__all__ = ["register", "EXIT_UNREADABLE", "EXIT_NOT_ANSWERED"]

EXIT_UNREADABLE = 2  # some input could not be read (named on stderr)
EXIT_NOT_ANSWERED = 3  # every input was read, but some were not frontal chest X-rays and got no answer

log = logging.getLogger("covidxray")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the classifying commands to the top-level subparsers."""
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", help="run folder or model.json (default: the bundled model)")

    pr = sub.add_parser("predict", parents=[model],
                        help="classify X-rays (files, folders, globs) as COVID-19 positive or negative")
    pr.add_argument("inputs", nargs="*", metavar="PATH", help="image files, folders or globs")
    pr.add_argument("--manifest", metavar="CSV", help="also classify the images listed in this CSV's 'path' column")
    pr.add_argument("--format", choices=["table", "json"], default="table")
    pr.add_argument("--out", help="also write predictions to this CSV")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    pr.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"],
                    help="auto (default: the fastest exported ONNX graph beside the model, int8 first; else PyTorch), "
                         "onnx or torch")
    pr.add_argument("--workers", type=int, default=0,
                    help="DataLoader processes decoding images (default 0: two threads in this process)")
    pr.add_argument("--resume", action="store_true",
                    help="skip inputs that already have a row in --out or its FILE.partN files (after a crash)")
    pr.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True,
                    help="refuse what is not a frontal chest X-ray (default); --no-gate forces an answer (research only)")
    pr.add_argument("--site", metavar="NAME",
                    help="the films come from this onboarded site: its threshold decides (`covidxray site add`); "
                         "without it the model's default threshold applies and each answer says 'site not onboarded'")
    sites_flag(pr)
    pr.set_defaults(func=cmd_predict)

    xp = sub.add_parser("explain", parents=[model], help="Grad-CAM: where the model looked (overlay PNG + raw .npy per image)")
    xp.add_argument("inputs", nargs="+", metavar="IMAGE")
    xp.add_argument("--out", required=True, help="output folder")
    xp.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    xp.set_defaults(func=cmd_explain)

    sg = sub.add_parser("segment", parents=[model],
                        help="lung masks: STEM_lungs.png (255 = lung) and STEM_lungs_overlay.png (with the crop box) per image")
    sg.add_argument("inputs", nargs="+", metavar="IMAGE")
    sg.add_argument("--out", required=True, help="output folder")
    sg.add_argument("--margin", type=float, default=0.1, help="crop-box margin drawn on the overlay (default 0.1)")
    sg.set_defaults(func=cmd_segment)

    d = sub.add_parser("demo", parents=[model], help="classify a few held-out X-rays with the bundled model")
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
    sv.add_argument("--threads", type=int, help="intra-op threads per network call (default: ONNX Runtime 1, a call "
                                                "per core side by side, as covidxray.backends.thread_plan says)")
    sv.add_argument("--max-batch", type=int, default=4, help="most images per network call when requests arrive together "
                                                          "(default 4: the segmenter and classifier then overlap)")
    sv.add_argument("--workers", type=int, help="server processes, each with its own model (about 1 GB each): requests "
                                                "are shared between them, /metrics sums them (default 2 on two or more "
                                                "cores, 1 with --dicomweb-spool or on one core)")
    sv.add_argument("--db", help="results database of `covidxray listen` (path, sqlite:///PATH or postgresql://...): GET /v1/results and "
                                 "the page's results list")
    sv.add_argument("--dicomweb-spool", metavar="DIR", help="with --db: accept DICOMweb STOW-RS at /dicomweb/studies "
                                                           "into this spool, classified and recorded as `listen` does")
    sv.add_argument("--send-to-dicomweb", metavar="URL", help="with --dicomweb-spool: send a structured report per received "
                                                             "instance to this DICOMweb root by STOW-RS")
    sites_flag(sv)
    sv.set_defaults(func=cmd_serve)


def cmd_predict(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..batch import PartWriter, expand_inputs, merge_predictions, read_path_manifest, read_predictions, remove_parts
    from ..predictor import Predictor
    from ..sites import SiteRegistry

    if not args.inputs and not args.manifest:
        raise CovidXrayError("predict needs image files, folders or globs, or --manifest CSV")
    paths = expand_inputs(args.inputs) + (read_path_manifest(args.manifest) if args.manifest else [])
    if not paths:
        raise CovidXrayError(f"no files found for {' '.join(args.inputs) or args.manifest}")
    dist, device = distributed.setup(args.device)  # rank 0 of 1 unless started by torchrun
    if (args.resume or dist.enabled) and not args.out:
        raise CovidXrayError("--resume and torchrun runs need --out FILE.csv (rows are collected in FILE.csv.partN first)")
    predictor = Predictor(args.model, device=str(device), backend=args.backend, gate=args.gate)
    site = SiteRegistry(args.sites).get(args.site, predictor.meta.get("weights_sha256")) if args.site else None
    predictor.watch_sites([site] if site is not None else [])  # int8: films near it re-checked in float
    mine = paths[dist.rank::dist.world_size]  # each process takes every world_size-th input
    writer = None
    if args.out:
        if args.resume:
            done = read_predictions(args.out)
            _check_same_rule(args.out, done.values(), site.name if site else "", predictor.threshold_at(site))
            log.info("resuming: %d of %d inputs already predicted", sum(str(p) in done for p in paths), len(paths))
            mine = [p for p in mine if str(p) not in done]
        distributed.barrier()  # every rank has read the old part files before any rank rewrites its own
        if dist.is_main and not args.resume:
            remove_parts(args.out, first=dist.world_size)  # left by an earlier run with more processes
        writer = PartWriter(args.out, dist.rank, resume=args.resume, flush_every=args.batch_size)
    echo = not dist.enabled  # under torchrun the merged --out is the output: ranks would interleave on stdout
    failed = refused = 0
    try:
        for result in predictor.predict_paths(mine, batch_size=args.batch_size, workers=args.workers):
            if isinstance(result, ImageError):
                failed += 1
                print(f"error: {result}", file=sys.stderr)
                if args.format == "json" and echo:
                    print(json.dumps({"path": result.source, "error": result.reason}))
                continue
            result = predictor.at_site(result, site) if site is not None else result
            if writer is not None:
                writer.write(result)
            refused += not result.answered
            if args.format == "json" and echo:
                print(json.dumps(result.to_dict()))
            elif not args.out:
                print(_table_row(result))
    finally:
        if writer is not None:
            writer.close()  # what was predicted so far stays on disk for --resume
    failed, refused = distributed.all_reduce_sum([failed, refused])
    if args.out:
        distributed.barrier()  # every part file is complete
        if dist.is_main:
            n = merge_predictions(args.out, paths, resume=args.resume)
            print(f"wrote {n} predictions to {args.out}")
    if args.format == "table" and dist.is_main:
        where = (f"site {site.name}, threshold {site.threshold:.4f}" if site is not None else
                 f"threshold {predictor.threshold:.4f}, site not onboarded (the model's default threshold)")
        print(f"# model {predictor.name}, {where}; positive class: COVID-19. {DISCLAIMER}", file=sys.stderr)
    return EXIT_UNREADABLE if failed else EXIT_NOT_ANSWERED if refused else 0


def _check_same_rule(out: str, rows, site: str, threshold: float) -> None:
    """`CovidXrayError` when rows already in ``out`` were decided at another site or threshold: one file, one rule."""
    for row in rows:
        if (row.get("site") or "") != site or (row.get("threshold") and not math.isclose(float(row["threshold"]), threshold)):
            raise CovidXrayError(
                f"{out}: its rows were decided at {('site ' + row['site']) if row.get('site') else 'no site'}, threshold "
                f"{row.get('threshold')}; this run would decide at {('site ' + site) if site else 'no site'}, threshold "
                f"{threshold:.4f}: resume with the same --site and --model, or write to a new --out")


def _table_row(result) -> str:
    if not result.answered:
        return f"{result.path}\tnot_answered\t{result.reason}\tno answer: {result.message}"
    verdict = "COVID-19 positive" if result.label == "covid" else "negative (normal)"
    note = f"\twarning: {result.message}" if result.message else ""
    return f"{result.path}\t{result.label}\tP(covid)={result.probability:.4f}\t{verdict}{note}"


def cmd_explain(args: argparse.Namespace) -> int:
    from ..batch import expand_inputs
    from ..explain import Explained, explain_files
    from ..predictor import Predictor

    paths = expand_inputs(args.inputs)
    if not paths:
        raise CovidXrayError(f"no files found for {' '.join(args.inputs)}")
    failed = refused = 0
    for r in explain_files(Predictor(args.model, device=args.device, backend="torch"), paths, args.out):
        if isinstance(r, ImageError):
            failed += 1
            print(f"error: {r}", file=sys.stderr)
        elif isinstance(r, Explained):
            p = r.prediction
            print(f"{p.path}\t{p.label}\tP(covid)={p.probability:.4f}\t-> {r.overlay}")
        else:  # the input gate's refusal
            refused += 1
            print(f"{r.path}\tnot_answered\t{r.reason}\tno answer: {r.message}")
    return EXIT_UNREADABLE if failed else EXIT_NOT_ANSWERED if refused else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Classify a few X-rays of the shared data set that the model did not train on."""
    from ..checkpoint import default_model_path, run_dir
    from ..data import load_samples
    from ..predictor import Predictor

    # $COVIDXRAY_DATA, else where the data set sits beside a clone of the repository (`make run` starts there).
    root = Path(settings().data or Path("..", "shared", "datasets", "covid-cxr"))
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise CovidXrayError(f"no demo images: {manifest.resolve()} does not exist. Set COVIDXRAY_DATA to the covid-cxr "
                             "data set (the folder holding manifest.csv), or run from a folder that has it at "
                             "../shared/datasets/covid-cxr; to classify your own X-ray: covidxray predict YOUR_XRAY.png")
    predictor = Predictor(args.model)
    print(f"model: {predictor.name}, threshold {predictor.threshold:.3f} (positive class: COVID-19)")
    held_out = _held_out(manifest, run_dir(args.model or default_model_path()), predictor.meta)
    if not held_out:
        print("warning: the split this model was trained on is not at hand for this data, so these images may include "
              "training images")
    samples = held_out or load_samples(manifest)

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
        if not r.answered:  # refused by the input gate: no probability to show
            print(f"{s.key:45s} truth {s.label_name:6s} -> no answer ({r.reason})")
            continue
        right += r.label == s.label_name
        print(f"{s.key:45s} truth {s.label_name:6s} -> {r.label:6s} P(covid)={r.probability:.3f}")
    print(f"{right}/{len(picks)} correct on {'held-out test' if held_out else 'these'} images. {DISCLAIMER}")
    print("Next: covidxray predict IMAGE.png | covidxray evaluate RUN | covidxray train --data DATA --out RUN")
    return 0


def _held_out(manifest: Path, folder: Path, meta: dict) -> list:
    """The test split's samples, if the split file the model was trained with is at hand for this data (else []).

    Training records the SHA-256 of manifest + split file (``data_fingerprint``); only when it
    matches is the test split known to be held out.
    """
    from ..data import data_fingerprint, load_samples

    named = (meta.get("train_config") or {}).get("splits")
    # splits.csv beside model.json travels with the model (the bundled one has it); the recorded path works in the
    # repository; None is the manifest's own split column.
    for splits in (folder / "splits.csv", Path(named) if named else None):
        if (splits is None or splits.is_file()) and data_fingerprint(manifest, splits) == meta.get("data_fingerprint"):
            return [s for s in load_samples(manifest, splits) if s.split == "test"]
    return []


def cmd_segment(args: argparse.Namespace) -> int:
    from ..batch import expand_inputs
    from ..checkpoint import default_model_path, run_dir
    from ..segment import LungSegmenter, segment_files

    paths = expand_inputs(args.inputs)
    if not paths:
        raise CovidXrayError(f"no files found for {' '.join(args.inputs)}")
    seg = LungSegmenter(run_dir(args.model or default_model_path()))
    failed = 0
    for r in segment_files(seg, paths, args.out, margin=args.margin):
        if isinstance(r, ImageError):
            failed += 1
            print(f"error: {r}", file=sys.stderr)
        else:
            print(f"{r.path}\tlung {r.lung_fraction:.1%} of the image\t-> {r.mask}, {r.overlay}")
    return EXIT_UNREADABLE if failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the REST API and the web page with uvicorn until Ctrl-C."""
    if args.send_to_dicomweb and not (args.dicomweb_spool and args.db):  # it would serve, and never send a report
        raise CovidXrayError("--send-to-dicomweb needs --db DB and --dicomweb-spool DIR: reports are sent for what "
                             "STOW-RS receives into the spool")
    if args.max_batch < 1:
        raise CovidXrayError(f"--max-batch must be at least 1, not {args.max_batch}")
    workers = args.workers or (1 if args.dicomweb_spool or usable_cores() < 2 else 2)
    if workers < 1 or (workers > 1 and args.dicomweb_spool):
        raise CovidXrayError(f"--workers {workers}: give at least 1, and 1 with --dicomweb-spool (one node per spool)")
    max_bytes = int(args.max_upload_mb * 2**20) if args.max_upload_mb else None
    options = dict(max_upload_bytes=max_bytes, timeout_s=args.timeout, max_batch=args.max_batch,
                   cors_origins=args.cors_origin, results_db=args.db, sites=args.sites)
    return _serve_workers(args, workers, options) if workers > 1 else _serve_one(args, options)


def _serve_one(args: argparse.Namespace, options: dict) -> int:
    import uvicorn

    from ..predictor import Predictor
    from ..server import create_app, limit_malloc_arenas

    limit_malloc_arenas()  # before torch, ONNX Runtime or uvicorn start their threads
    # Loaded here, not in the app's start-up, so a bad --model is a one-line error before the port opens.
    predictor = Predictor(args.model, backend=args.backend, threads=args.threads)
    app = create_app(args.model, predictor=predictor, dicomweb_spool=args.dicomweb_spool,
                     dicomweb_send_to=args.send_to_dicomweb, **options)
    _serving(f"{predictor.name} ({predictor.backend})", args, 1)
    # Our middleware logs every request with its ID and without file names; uvicorn's access log would repeat it.
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info")
    return 0


def _serve_workers(args: argparse.Namespace, workers: int, options: dict) -> int:
    """uvicorn's worker processes, each loading the model; this one only watches them, so it never imports the model's
    libraries (about 0.75 GB): the model is tried once in a short-lived process, for a one-line error on a bad one."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from ..server.workers import close, listening_sockets, run_workers

    try:  # a socket per worker: the kernel spreads connections over them (`covidxray.server.workers`)
        socks = listening_sockets(args.host, args.port, workers)
    except OSError as e:
        raise CovidXrayError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as check:
            described = check.submit(_describe_model, args.model, args.backend, args.threads).result()
        _serving(described, args, workers, port=socks[0].getsockname()[1])
        with tempfile.TemporaryDirectory(prefix="covidxray-metrics-") as metrics:  # every worker's counts, for /metrics
            app = {"model": args.model, "backend": args.backend, "threads": args.threads, **options}
            for_workers(json.dumps({"app": app, "log_level": logging.getLogger().getEffectiveLevel()}), metrics)
            if not run_workers({"app": "covidxray.server:app_from_environment", "factory": True, "access_log": False,
                                "log_level": "info"}, socks):
                raise CovidXrayError("a server process could not start; its log above says why")
    except OSError as e:  # the workers' control sockets (a temporary folder that cannot be written, say)
        raise CovidXrayError(f"cannot start the server's workers: {e}") from None
    finally:
        close(socks)
    return 0


def _describe_model(model: str | None, backend: str, threads: int | None) -> str:
    from ..predictor import Predictor

    predictor = Predictor(model, backend=backend, threads=threads)
    return f"{predictor.name} ({predictor.backend})"


def _serving(model: str, args: argparse.Namespace, workers: int, port: int | None = None) -> None:
    print(f"covidxray: serving {model} at http://{args.host}:{port or args.port}/ (API docs at /docs)"
          f"{f' from {workers} processes' if workers > 1 else ''}; Ctrl-C stops. {DISCLAIMER}", flush=True)
