"""Would re-estimating the classifier's BatchNorm statistics on a site's own films (AdaBN) take the origin out of the score?

    .venv/bin/python bench/site_adaptation.py [--model src/covidxray/bundled]

AdaBN (Li et al., 2016) needs no labels: the site's films go through the network once, each BatchNorm layer's
running mean and variance are replaced by theirs, and the weights stay. Each origin of the shared data is taken as
one site, with the films it has (the origins the model never saw: every film; the covid-cxr sources it trained on:
their test films), and scored before and after adapting to it, at the model's threshold: specificity of normal films,
sensitivity of COVID-19 films, the share of other findings called COVID-19; adapting every layer, or only the stem
and the first stages (where a film's style lives, not its finding). A site of COVID-19 films only
(covid-cxnet, ieee8023) shows what adaptation costs when the site's mix is not the training mix: the statistics then
describe COVID-19, and COVID-19 becomes the site's "normal". Adapting the shallow stages from the site's normal films
alone, as many as onboarding asks for, is the variant a site profile could carry. PyTorch backend; the shipped graphs
are not changed (their BatchNorm is folded into the convolutions).
"""

from __future__ import annotations

import argparse
import copy
import os

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from common import ROOT, save
from origins import origin_films
from covidxray.inference import predict_probs
from covidxray.predictor import Predictor

SITES = {  # origin: which of its films make the site
    "shenzhen": None, "montgomery": None, "jsrt": None,  # never in the bundled model's training: every film
    "radiography-db": "test", "covid-cxnet": "test", "ieee8023": "test",  # trained on: their held-out test films
}


def site_films(predictor: Predictor, origin: str, split: str | None) -> tuple[torch.Tensor, list[str]]:
    _, images, findings = origin_films(predictor.preprocess, (origin,), split, ROOT / "runs" / "cache", "site")
    return images, findings


DEPTHS = {  # how much of the network adapts: its first stages carry the film's style, its last ones the finding
    "stem": 0, "stem + stages 1-2": 2, "stem + stages 1-4": 4, "every layer": None,
}


FROM_NORMALS = "stem + stages 1-2"  # also adapted on the site's normal films alone
ONBOARDING_NORMALS = 60  # and on as many as a site is onboarded with (`covidxray site add`), the others held out


def adapted_norms(model: nn.Module, stages: int | None) -> list[nn.Module]:
    """The BatchNorm layers of the stem and the first ``stages`` stages of an EfficientNet (None: every one)."""
    parts = [model] if stages is None else [model.bn1, *list(model.blocks)[:stages]]
    return [m for part in parts for m in part.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapt(model: nn.Module, images: torch.Tensor, predictor: Predictor, stages: int | None, batch: int = 64) -> None:
    """Those BatchNorm layers' running statistics re-estimated on ``images`` (cumulative average over batches); the
    deeper ones keep the training statistics, which the adapted ones' outputs then meet."""
    norms = adapted_norms(model, stages)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for start in range(0, len(images), batch):
        model(predictor.preprocess.to_tensor(images[start:start + batch]))
    model.eval()


def rates(p: np.ndarray, findings: list[str], threshold: float) -> dict[str, float]:
    """Per finding: specificity (normals), sensitivity (COVID-19) or the share called COVID-19 (another finding);
    with both COVID-19 and normal films, the ROC-AUC between them (threshold-free)."""
    out = {}
    for finding in sorted(set(findings)):
        called = float((p[[f == finding for f in findings]] >= threshold).mean())
        out[finding] = round(1 - called if finding == "normal" else called, 3)
    pair = [f in ("covid", "normal") for f in findings]
    if {"covid", "normal"} <= set(findings):
        out["roc_auc"] = round(float(roc_auc_score([f == "covid" for f, k in zip(findings, pair) if k], p[pair])), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "src" / "covidxray" / "bundled"))
    parser.add_argument("--name", default="site-adaptation", help="result file bench/results/NAME.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    predictor = Predictor(args.model, backend="torch", gate=False)
    model, thr, temperature = predictor.model, predictor.threshold, predictor.temperature
    original = copy.deepcopy(model.state_dict())
    rows = []
    for origin, split in SITES.items():
        images, findings = site_films(predictor, origin, split)
        model.load_state_dict(original)
        row = {"site": origin, "films": len(findings), "split": split or "all",
               "before": rates(predict_probs(model, images, predictor.preprocess, temperature=temperature), findings, thr)}
        for depth, stages in DEPTHS.items():
            model.load_state_dict(original)
            adapt(model, images, predictor, stages)
            row[depth] = rates(predict_probs(model, images, predictor.preprocess, temperature=temperature), findings, thr)
        if "normal" in findings:  # what onboarding has: the site's normal films, no label needed beyond that
            normals = np.flatnonzero([f == "normal" for f in findings])
            model.load_state_dict(original)
            adapt(model, images[normals], predictor, DEPTHS[FROM_NORMALS])
            row[f"{FROM_NORMALS}, from its normals"] = rates(
                predict_probs(model, images, predictor.preprocess, temperature=temperature), findings, thr)
            # onboarding's size: 60 normals adapt, every other film of the site is scored
            chosen = np.random.default_rng(0).choice(normals, ONBOARDING_NORMALS, replace=False)
            rest = np.setdiff1d(np.arange(len(findings)), chosen)
            model.load_state_dict(original)
            adapt(model, images[chosen], predictor, DEPTHS[FROM_NORMALS])
            row[f"{FROM_NORMALS}, from {ONBOARDING_NORMALS} normals, the rest scored"] = rates(
                predict_probs(model, images[rest], predictor.preprocess, temperature=temperature),
                [findings[i] for i in rest], thr)
        rows.append(row)
        print(rows[-1], flush=True)
    model.load_state_dict(original)
    words = {"normal": "normals: specificity", "covid": "COVID-19: sensitivity", "tuberculosis": "tuberculosis called COVID-19",
             "nodule": "nodules called COVID-19", "roc_auc": "ROC-AUC, COVID-19 against normals"}
    columns = [*DEPTHS, f"{FROM_NORMALS}, from its normals", f"{FROM_NORMALS}, from {ONBOARDING_NORMALS} normals, the rest scored"]
    table = ["| site (its films) | films | measure | as shipped | " + " | ".join(f"adapted: {d}" for d in columns) + " |",
             "|---|---:|---|" + "---:|" * (1 + len(columns))]
    table += [f"| {r['site']} ({r['split']}) | {r['films']} | {words[k]} | {r['before'][k]} | "
              + " | ".join(str(r[d][k]) if d in r else "–" for d in columns) + " |" for r in rows for k in r["before"]]
    shown = os.path.relpath(args.model, ROOT)
    note = (f"Model {shown} (PyTorch), threshold {thr:.3f}, temperature {temperature:.3f}; each site adapted from the "
            "model as shipped, on all of its films listed, then scored on the same films (adaptation uses no label); the "
            "last two columns adapt on the site's normal films alone (what `site add` collects), all of them, then "
            f"{ONBOARDING_NORMALS} drawn at random with every other film of the site scored. "
            "Stages are EfficientNet's seven; the stem and the first stages see texture and contrast, the last ones "
            "what the film shows.")
    title = "Site adaptation without labels: BatchNorm statistics re-estimated per origin (AdaBN)"
    named = "" if args.name == "site-adaptation" else f" --model {shown} --name {args.name}"
    save(args.name, {"title": title + ("" if not named else f", {shown}"), "rows": rows, "table": table + ["", note],
                     "command": f"python bench/site_adaptation.py{named}"})


if __name__ == "__main__":
    main()
