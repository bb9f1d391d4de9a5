"""Commands on a training run: ``train``, ``evaluate``, ``calibrate``, ``audit``, ``export``, ``card``.

The train flags are derived from `TrainConfig`'s fields (type, choices and help from the field),
so every field has exactly one flag and a misspelt one cannot exist.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import fields

from ..config import RECIPES, TrainConfig, config_for
from ..errors import CovidXrayError

__all__ = ["register", "train_flags"]


def train_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` option per `TrainConfig` field, default None (None: the recipe's value).

    The help shows the value the ``default`` recipe trains with (the field's default as the recipe overrides it).
    """
    hints = typing.get_type_hints(TrainConfig)
    recipe = config_for("default")
    for f in fields(TrainConfig):
        if f.name == "recipe":
            continue  # its own flag, with the recipe names as choices
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # `int | None` -> int
            kind = next(t for t in typing.get_args(kind) if t is not type(None))
        value = getattr(recipe, f.name)
        default = "" if value in (None, "") else f" (default recipe: {value})"
        options: dict = {"help": f.metadata["help"] + default, "default": None, "dest": f.name}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = kind
            if "choices" in f.metadata:
                options["choices"] = f.metadata["choices"]
            else:
                options["metavar"] = f.name.upper()
        parser.add_argument(f"--{f.name.replace('_', '-')}", **options)


def register(sub: argparse._SubParsersAction, run: argparse.ArgumentParser, data: argparse.ArgumentParser) -> None:
    """Add the run commands; ``run`` and ``data`` are the shared parent parsers (run folder; data, splits, cache)."""
    t = sub.add_parser("train", help="train a model (writes checkpoint, history, curves)")
    t.add_argument("--recipe", default="default", choices=sorted(RECIPES), help="preset the flags start from (default: default)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (with --epochs: train longer)")
    train_flags(t)
    t.set_defaults(func=cmd_train)

    split = argparse.ArgumentParser(add_help=False)
    split.add_argument("--split", default="test", help="which split (default test; 'all' for every image)")

    e = sub.add_parser("evaluate", parents=[run, data, split],
                       help="evaluate a run on a split: metrics with 95%% CIs, plots, report")
    e.add_argument("--out", help="report folder (default RUN/eval-SPLIT)")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    e.add_argument("--external", metavar="DATA",
                   help="labelled data from elsewhere (folder tree or manifest): every image is evaluated and compared "
                        "with the run's internal test metrics (report in RUN/eval-external-NAME)")
    e.set_defaults(func=cmd_evaluate)

    ca = sub.add_parser("calibrate", parents=[run, data],
                        help="refit temperature and threshold on the validation split; rewrite model.json")
    rule = ca.add_mutually_exclusive_group()
    rule.add_argument("--target-sensitivity", type=float, help="highest threshold at which every COVID-19 origin of the validation split "
                      "(20 films or more) and all of them together reach this sensitivity")
    rule.add_argument("--threshold", type=float, help="use this threshold as it is")
    rule.add_argument("--site-normals", metavar="DIR",
                      help="rewrite this run's own threshold for one site: a folder (or manifest) of its normal films reach "
                           "--target-specificity, the cost in sensitivity shown on validation (`covidxray site add` does "
                           "this without touching the model, for as many sites as it serves)")
    ca.add_argument("--target-specificity", type=float, default=0.95, help="with --site-normals (default 0.95)")
    ca.add_argument("--pooled", action="store_true", help="with --target-sensitivity: the validation split's COVID-19 films "
                    "together reach it, not each origin (an origin with few films can drag the threshold down)")
    ca.add_argument("--keep-temperature", action="store_true", help="keep the stored temperature; only choose the threshold")
    ca.add_argument("--shift", action="store_true",
                    help="also fit a logit shift (Platt scaling), kept in the classifier's bias: rewrites the weights, "
                         "so export the graphs again")
    ca.set_defaults(func=cmd_calibrate)

    rh = sub.add_parser("refit-head", parents=[run, data],
                        help="refit the classifier's last layer on the training films' features as served (last-layer "
                             "retraining), then temperature and threshold on validation: rewrites the weights")
    rh.add_argument("--target-sensitivity", type=float,
                    help="threshold rule as for calibrate (default: Youden's J on the validation split)")
    rh.add_argument("--pooled", action="store_true", help="with --target-sensitivity: the COVID-19 films together reach it")
    rh.set_defaults(func=cmd_refit_head)

    au = sub.add_parser("audit", parents=[run, data, split],
                        help="shortcut audit: per-source metrics, source probe, leakage, Grad-CAM location")
    au.add_argument("--out", help="output folder (default RUN/audit)")
    au.add_argument("--limit", type=int, default=400, help="images explained with Grad-CAM (default 400)")
    au.add_argument("--probe-limit", type=int, default=2000, help="images for the source probe and per-source metrics")
    au.set_defaults(func=cmd_audit)

    ex = sub.add_parser("export", parents=[run],
                        help="export a model to ONNX (classifier, segmenter and gate; the preprocessing contract as JSON)")
    ex.add_argument("--onnx", metavar="OUT.onnx",
                    help="ONNX file to write (OUT.json beside it); default RUN/model.onnx, or RUN/model.int8.onnx with --int8")
    ex.add_argument("--int8", action="store_true",
                    help="quantise the classifier to int8 (static, calibrated on training films), checked against PyTorch on "
                         "the test split and on each source's validation films, served with films near a threshold scored "
                         "again by the float graph (written beside it as model.onnx) within the narrowest band that keeps "
                         "the ROC-AUC drop <= 0.002 and >= 99%% of decisions on each; refused when no band does")
    ex.add_argument("--calibration-images", type=int, default=300, help="training films that calibrate int8 (default 300)")
    ex.add_argument("--min-band", type=float, default=0.0,
                    help="with --int8: the narrowest re-check band the check may choose (default 0), for origins it "
                         "cannot see (bench/int8_cascade.py measures every shared origin)")
    ex.add_argument("--opset", type=int, default=17)
    ex.set_defaults(func=cmd_export)

    cd = sub.add_parser("card", parents=[run],
                        help="write MODEL_CARD.md and .html for a run from its checkpoint, reports and audit")
    cd.add_argument("--out", help="default RUN/MODEL_CARD.md (the .html is written beside it)")
    cd.add_argument("--external", action="append", default=[], metavar="REPORT_DIR",
                    help="also report this external evaluation folder (default: every RUN/eval-external-*)")
    cd.set_defaults(func=cmd_card)


def cmd_train(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..engine import train

    if args.resume:
        run = train(TrainConfig(out=args.resume, epochs=args.epochs or 0), resume=True)
    else:
        if not args.data:
            raise CovidXrayError("train needs --data (a folder tree or a CSV manifest), or --resume RUN_DIR")
        run = train(config_for(args.recipe, **{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "recipe"}))
    if distributed.get_env().is_main:
        print(f"run written to {run} (model.json, model.safetensors, history.csv, curves.png)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate_run
    from ..metrics import format_ci

    report = evaluate_run(args.run, data=args.data, splits=args.splits, split=args.split, out=args.out,
                          n_boot=args.bootstrap, cache_dir=args.cache_dir, external=args.external)
    print(f"positive class: COVID-19 — {report['n']} images, threshold {report['threshold']:.4f}; value (95% CI)")
    for name, v in report["metrics"].items():
        gap = f"  gap vs internal test {report['gap'][name]:+.4f}" if report.get("gap", {}).get(name) is not None else ""
        print(f"  {name:12s} {format_ci(v, digits=4)}{gap}")
    cal = report["calibration"]
    before = f"{cal['uncalibrated']['ece']:.4f} at T=1, " if "uncalibrated" in cal else ""
    print(f"  calibration  ECE {before}{cal['ece']:.4f} at T={cal['temperature']:.3f}")
    print(f"report written to {report['meta']['out']}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..evaluate import calibrate_run, calibrate_site
    from ..metrics import format_ci

    if args.site_normals:
        r = calibrate_site(args.run, args.site_normals, args.target_specificity, cache_dir=args.cache_dir)
        site, before, after = r["site"], r["validation_before"], r["validation_after"]
        print(f"site: {site['answered']} normal films answered ({site['not_answered']} not answered, {site['unreadable']} "
              f"unreadable); specificity there {site['specificity_before']:.3f} -> {site['specificity_after']:.3f}")
        print(f"threshold {r['threshold_before']:.4f} -> {r['threshold']:.4f} (target specificity {r['target_specificity']:g})")
        print(f"cost on the validation split (positive class COVID-19): sensitivity {format_ci(before['sensitivity'])} -> "
              f"{format_ci(after['sensitivity'])}, specificity {format_ci(before['specificity'])} -> "
              f"{format_ci(after['specificity'])}")
        print(f"rewrote {args.run} model.json (weights and temperature unchanged); evaluate again before use")
        print("note: `covidxray site add NAME --normals DIR --model RUN` sets a site's threshold in a site profile instead, "
              "leaving model.json as it is (one model, several sites; chosen per film by --site or the DICOM header)")
        return 0

    cal = calibrate_run(args.run, data=args.data, splits=args.splits, target_sensitivity=args.target_sensitivity,
                        threshold=args.threshold, keep_temperature=args.keep_temperature, shift=args.shift, pooled=args.pooled,
                        cache_dir=args.cache_dir)
    shift = f", logit shift {cal.shift:+.4f}" if cal.shift else ""
    print(f"temperature {cal.temperature:.4f}{shift}: validation ECE {cal.ece_before:.4f} -> {cal.ece_after:.4f}, "
          f"NLL {cal.nll_before:.4f} -> {cal.nll_after:.4f} ({cal.n} images)")
    print(f"threshold {cal.threshold:.4f}: {cal.threshold_rule}")
    print("validation thresholds for sensitivity " + ", ".join(f">= {k}: {v:.4f}" for k, v in cal.sensitivity_thresholds.items()))
    if cal.shift:
        print(f"rewrote {args.run} model.json and its weights (the shift is in the classifier's bias): export the ONNX "
              "graphs again and evaluate again: earlier graphs and reports belong to the old weights")
    else:
        print(f"rewrote {args.run} model.json (weights unchanged); evaluate again: earlier reports used the old values")
    return 0


def cmd_refit_head(args: argparse.Namespace) -> int:
    from ..head import refit_run

    refit, cal = refit_run(args.run, data=args.data, splits=args.splits, target_sensitivity=args.target_sensitivity,
                           pooled=args.pooled, cache_dir=args.cache_dir)
    print("validation ROC-AUC (COVID-19 positive) by C: " + ", ".join(
        f"{c:g} {auc:.4f}{' (chosen)' if c == refit.c else ''}" for c, auc in refit.val_auc.items()))
    print(f"temperature {cal.temperature:.4f}, logit shift {cal.shift:+.4f}: validation ECE {cal.ece_after:.4f}; "
          f"threshold {cal.threshold:.4f}: {cal.threshold_rule}")
    print(f"rewrote {args.run} weights and model.json: export the ONNX graphs and evaluate again (earlier graphs and "
          "reports belong to the old head)")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from ..audit import audit_run, summary
    from ..checkpoint import run_dir

    report = audit_run(args.run, data=args.data, splits=args.splits, split=args.split, out=args.out, limit=args.limit,
                       probe_limit=args.probe_limit, cache_dir=args.cache_dir)
    print("\n".join(f"- {line}" for line in summary(report)))
    print(f"audit written to {args.out or run_dir(args.run) / 'audit'} (audit.md, audit.json, PNGs)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..checkpoint import contract_path, run_dir
    from ..export import export_onnx

    onnx = args.onnx or run_dir(args.run) / ("model.int8.onnx" if args.int8 else "model.onnx")
    out = export_onnx(args.run, onnx, opset=args.opset, int8=args.int8, calibration_images=args.calibration_images,
                      min_band=args.min_band)
    print(f"wrote {out} and {contract_path(out)}")
    contract = json.loads(contract_path(out).read_text())
    if "int8" in contract:
        q = contract["int8"]
        band = q["recheck"]
        print(f"int8, films within {band['band']} of a threshold re-checked by {band['float_onnx']} ({band['share_test']:.1%} "
              f"of the test films, {band['share_val']:.1%} of the validation films), vs PyTorch on {q['test_images']} test films: "
              f"ROC-AUC {q['roc_auc_torch']:.4f} -> {q['roc_auc_int8']:.4f}, {q['agreement']:.2%} of decisions unchanged "
              f"(int8 alone {q['int8_only']['agreement']:.2%}); validation, by source: "
              + ", ".join(f"{k} {r['agreement']:.2%} (int8 alone {r['int8_only']['agreement']:.2%})"
                          for k, r in q.get("val_sources", {}).items()))
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from ..card import write_card

    md, html = write_card(args.run, args.out, external=args.external)
    print(f"wrote {md} and {html}")
    return 0
