"""Leave one origin out, for every origin: how a recipe does on films from a hospital it never saw.

Each group of held-out origins is trained without (all of its films: normals, other findings and
COVID-19), with the threshold chosen on validation as the recipe says; then every film of the
held-out origins is scored (`origins.score_origins`): specificity of its normals, sensitivity of its
COVID-19 films, the share of its other-finding films called COVID-19 — at the run's threshold, and
threshold-free (at the threshold that gives 0.90 sensitivity, or 0.90 specificity, on the run's
internal covid-cxr test films) — and the expected calibration error per origin. The summary names
the **worst** origin, not the mean: a recipe is only better if the held-out origins say so.

The default groups hold out one normal origin and one COVID-19 origin together, so three runs cover
all five origins (``jsrt+covid-cxnet``, ``shenzhen+ieee8023``, ``montgomery``); ``--seeds 0,1,2``
repeats every group per seed and reports mean and spread.

    python bench/loso.py --name pooled-acq --pooled -- --augment acquisition --balance-sources
    python bench/loso.py --name lungs --groups jsrt                   # covid-cxr only, JSRT held out
    python bench/loso.py --name X --pooled --seeds 0,1,2 -- ...       # train flags after --
    python bench/loso.py --name X --merge X-a,X-b -- ...              # one table of results saved in turn
    python bench/loso.py --name X --seeds 0,1,2 --ensemble -- ...     # the seeds' runs as one mean-probability ensemble
    python bench/loso.py --name X --refit-head --result X-refit -- ... # each run scored with its head refitted

``--pooled`` trains on every shared origin (covid-cxr, JSRT and tb-cxr: `origins.pooled_rows`, other
findings as not COVID-19); without it, on covid-cxr alone (plus ``--jsrt-normals``). Runs go to
runs/loso/NAME/seedS/GROUP (resumable: a finished run is reused); results to
bench/results/loso-NAME.json and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from common import ROOT, save
from origins import COVID_ORIGINS, ORIGINS, SHARED, internal_anchors, pooled_rows, score_origins, write_manifest
from covidxray.cache import readable_images
from covidxray.cli.run_commands import train_flags
from covidxray.config import TrainConfig, config_for
from covidxray.data import load_samples
from covidxray.engine import train
from covidxray.inference import predict_probs
from covidxray.metrics import choose_threshold
from covidxray.predictor import Predictor

GROUPS = "jsrt+covid-cxnet,shenzhen+ieee8023,montgomery"


def training_rows(held_out: set[str], pooled: bool, jsrt_normals: bool) -> list[list[str]]:
    """The training data of one group: every origin but ``held_out`` (pooled), or covid-cxr (+ JSRT normals) only."""
    rows = pooled_rows(held_out)
    if not pooled:
        keep = {"radiography-db", *COVID_ORIGINS} | ({"jsrt"} if jsrt_normals else set())
        rows = [r for r in rows if r[2] in keep and r[1] != "other"]
    return rows


def finished(run: Path) -> bool:
    return (run / "model.json").is_file() and "train_seconds" in json.loads((run / "model.json").read_text())


def train_group(name: str, seed: int, group: str, args, overrides: dict) -> Path:
    """The run of one seed with ``group``'s origins held out: trained (or resumed) unless it has finished."""
    held_out = set(group.split("+"))
    unknown = held_out - set(ORIGINS)
    if unknown:
        raise SystemExit(f"unknown origin(s) {', '.join(sorted(unknown))}; choose from {', '.join(ORIGINS)}")
    run = ROOT / "runs" / "loso" / name / f"seed{seed}" / group
    if not finished(run):
        data = write_manifest(training_rows(held_out, args.pooled, args.jsrt_normals), run.parent / f"data-without-{group}.csv")
        cfg = config_for(args.recipe, data=str(data), out=str(run), **{**overrides, "seed": seed})
        train(cfg, resume=(run / "last.safetensors").is_file())
    return run


def refitted(run: Path) -> Path:
    """A copy of ``run`` beside it (``GROUP-refit``) with its head refitted as the shipped model's is (`covidxray.head`):
    0.90 sensitivity on the validation COVID-19 films together."""
    from covidxray.head import refit_run

    out = run.parent / f"{run.name}-refit"
    if not (out / "model.json").is_file() or "head_refit" not in json.loads((out / "model.json").read_text()):
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(run, out, ignore=shutil.ignore_patterns("last.safetensors", "*.onnx", "eval-*", "audit"))
        refit_run(out, target_sensitivity=0.9, pooled=True, cache_dir=str(ROOT / "runs" / "cache"))
    return out


def run_group(name: str, seed: int, group: str, args, overrides: dict) -> dict:
    held_out = set(group.split("+"))
    run = train_group(name, seed, group, args, overrides)
    run = refitted(run) if args.refit_head else run
    predictor = Predictor(run, backend="torch")
    internal = internal_anchors(predictor)
    y, p = internal.pop("y"), internal.pop("p")
    # origins of other findings the run saw in training (pooled only: covid-cxr alone has none)
    seen = tuple(o for o in ("jsrt", "shenzhen", "montgomery") if o not in held_out) if args.pooled else ()
    return {"run": str(run.relative_to(ROOT)), "threshold": predictor.threshold, "val_auc": predictor.meta.get("val_auc"),
            "internal_test_auc": float(roc_auc_score(y, p)), "train_minutes": predictor.meta.get("train_seconds", 0) / 60,
            "origins": score_origins(predictor, tuple(sorted(held_out)), internal),
            # another finding from a hospital the run did see: its patients kept back in the pooled test split
            "other_findings_test": {k: v for k, v in (score_origins(predictor, seen, internal, split="test") if seen else {}).items()
                                    if v["finding"] in ("tuberculosis", "nodule")}}


def summarise(results: dict[int, dict[str, dict]]) -> tuple[list[str], dict]:
    """Per held-out origin and finding: mean and spread over seeds; the worst origin of each kind."""
    cells: dict[str, list[dict]] = {}
    aucs = [g["internal_test_auc"] for seed in results.values() for g in seed.values()]
    for seed in results.values():
        for g in seed.values():
            for key, r in g["origins"].items():
                cells.setdefault(key, []).append(r)
            for key, r in g.get("other_findings_test", {}).items():
                cells.setdefault(f"{key} (test split, origin seen)", []).append(r)

    def ms(values: list[float]) -> str:
        return f"{np.mean(values):.3f}" + (f" ± {np.std(values):.3f}" if len(values) > 1 else "")

    table = ["| held-out origin | films | metric | at the run's threshold | threshold-free | ECE |", "|---|---:|---|---:|---:|---:|"]
    summary = {}
    for key in sorted(cells, key=lambda k: ("(" in k, ORIGINS.index(k.split("/")[0]), k)):
        rs = cells[key]
        at = [r["at_threshold"]["value"] for r in rs]
        free = [r["threshold_free"] for r in rs]
        summary[key] = {"metric": rs[0]["metric"], "n": rs[0]["n"], "at_threshold": at, "threshold_free": free,
                        "ece": [r["ece"] for r in rs]}
        table.append(f"| {key} | {rs[0]['n']} | {rs[0]['metric']} | {ms(at)} | {ms(free)} | {ms([r['ece'] for r in rs])} |")
    worst = {}
    for metric in ("specificity", "sensitivity", "called COVID-19"):
        keys = [k for k, v in summary.items() if v["metric"] == metric and v["n"] >= 20]
        if keys:
            pick = (max if metric == "called COVID-19" else min)(keys, key=lambda k: np.mean(summary[k]["at_threshold"]))
            worst[metric] = {"origin": pick, "at_threshold": float(np.mean(summary[pick]["at_threshold"]))}
    table.append("")
    table.append("Worst held-out origin at the run's threshold: " + "; ".join(
        f"{m} {w['at_threshold']:.3f} ({w['origin']})" for m, w in worst.items()) +
        f". Internal covid-cxr test ROC-AUC of the runs: {ms(aucs)} (threshold-free numbers: at 0.90 internal sensitivity "
        "for normals and other findings, at 0.90 internal specificity for COVID-19 films).")
    return table, {"cells": summary, "worst": worst, "internal_test_auc": aucs}


class _MeanProbability(torch.nn.Module):
    """Several runs' calibrated P(COVID-19), averaged, as log-probabilities: softmax at temperature 1 gives the mean."""

    def __init__(self, predictors: list[Predictor]):
        super().__init__()
        self.members = torch.nn.ModuleList(p.model for p in predictors)
        self.temperatures = [p.temperature for p in predictors]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.stack([torch.softmax(m(x) / t, 1)[:, 1] for m, t in zip(self.members, self.temperatures)]).mean(0)
        return torch.log(torch.stack([1 - p, p], 1).clamp_min(1e-12))


def ensemble_group(name: str, seeds: list[int], group: str, args, overrides: dict) -> dict:
    """One group's runs of every seed (trained here if missing) as one ensemble: the mean of their P(COVID-19),
    thresholded by Youden's J on the covid-cxr validation split (every member's own validation films)."""
    runs = [train_group(name, seed, group, args, overrides) for seed in seeds]
    predictors = [Predictor(run, backend="torch") for run in runs]
    if len({json.dumps(p.preprocess.to_dict(), sort_keys=True) for p in predictors}) != 1:
        raise SystemExit("an ensemble needs runs with one preprocessing; these differ")
    model = _MeanProbability(predictors).eval()
    val = [s for s in load_samples(SHARED / "covid-cxr" / "manifest.csv", ROOT / "splits" / "covid-cxr.csv") if s.split == "val"]
    kept, images, _ = readable_images(val, predictors[0].preprocess, None, desc="decoding validation")
    y_val = np.array([s.label for s in kept])
    p_val = predict_probs(model, images, predictors[0].preprocess)
    ensemble = SimpleNamespace(model=model, preprocess=predictors[0].preprocess, temperature=1.0,
                               threshold=choose_threshold(y_val, p_val), meta={})
    internal = internal_anchors(ensemble)
    y, p = internal.pop("y"), internal.pop("p")
    return {"run": " + ".join(str(run.relative_to(ROOT)) for run in runs), "threshold": ensemble.threshold,
            "val_auc": float(roc_auc_score(y_val, p_val)), "internal_test_auc": float(roc_auc_score(y, p)),
            "train_minutes": sum(p.meta.get("train_seconds", 0) for p in predictors) / 60,
            "origins": score_origins(ensemble, tuple(sorted(group.split("+"))), internal), "other_findings_test": {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="name of this recipe variant (runs/loso/NAME, loso-NAME.json)")
    ap.add_argument("--groups", default=GROUPS, help=f"comma-separated groups of '+'-joined origins from {', '.join(ORIGINS)}")
    ap.add_argument("--pooled", action="store_true", help="train on every shared origin (covid-cxr, JSRT, tb-cxr), not covid-cxr alone")
    ap.add_argument("--jsrt-normals", action="store_true", help="without --pooled: add JSRT's normals (never when held out)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; every group is trained once per seed")
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--result", help="result name (bench/results/loso-RESULT.json; default NAME): keeps tables of "
                                     "other groups or seeds of the same runs apart")
    ap.add_argument("--merge", help="comma-separated result names: one table of their runs' results, nothing trained "
                                    "(e.g. the groups and seeds of one recipe screened in turn)")
    ap.add_argument("--ensemble", action="store_true", help="score each group's runs of all --seeds as one ensemble "
                                                            "(mean P(COVID-19), Youden threshold on validation)")
    ap.add_argument("--refit-head", action="store_true", help="score each run with its head refitted as the shipped "
                    "model's (`covidxray refit-head RUN --target-sensitivity 0.9 --pooled`, on a copy: GROUP-refit)")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: covidxray train flags")
    args = ap.parse_args()
    flags = argparse.ArgumentParser(add_help=False)
    train_flags(flags)
    extra = flags.parse_args([a for a in args.train_args if a != "--"])
    overrides = {f.name: getattr(extra, f.name) for f in fields(TrainConfig)
                 if f.name not in ("recipe", "data", "splits", "out", "seed") and getattr(extra, f.name) is not None}
    results: dict[int, dict[str, dict]] = {}
    for name in filter(None, (args.merge or "").split(",")):
        for seed, groups in json.loads((ROOT / "bench" / "results" / f"loso-{name}.json").read_text())["results"].items():
            results.setdefault(int(seed), {}).update(groups)
    seeds = [int(x) for x in args.seeds.split(",")]
    for group in args.groups.split(",") if args.ensemble and not args.merge else []:
        results.setdefault(0, {})[group] = ensemble_group(args.name, seeds, group, args, overrides)
    for seed in [] if args.merge or args.ensemble else seeds:
        for group in args.groups.split(","):
            results.setdefault(seed, {})[group] = run_group(args.name, seed, group, args, overrides)
            print(json.dumps({"seed": seed, "group": group, **{k: v for k, v in results[seed][group].items() if k != "origins"}}),
                  flush=True)
    table, summary = summarise(results)
    command = (f"python bench/loso.py --name {args.name}" + (f" --result {args.result}" if args.result else "")
               + (f" --merge {args.merge}" if args.merge else f" --groups {args.groups} --seeds {args.seeds}")
               + (" --ensemble" if args.ensemble else "") + (" --refit-head" if args.refit_head else "")
               + (" --pooled" if args.pooled else "") + (" --jsrt-normals" if args.jsrt_normals else "")
               + (f" --recipe {args.recipe}" if args.recipe != "default" else "")
               + (" -- " + " ".join(a for a in args.train_args if a != "--") if args.train_args else ""))
    result = args.result or args.name
    save(f"loso-{result}", {"title": f"Leave one origin out: {result}", "table": table, "summary": summary,
                            "results": {str(k): v for k, v in results.items()}, "command": command, "overrides": overrides})
    print("\n".join(table))


if __name__ == "__main__":
    main()
