"""Would re-estimating the classifier's BatchNorm statistics on a site's own films (AdaBN) take the origin out of the score?

    .venv/bin/python bench/site_adaptation.py [--model src/covidxray/bundled]

AdaBN (Li et al., 2016) needs no labels: the site's films go through the network once, each BatchNorm layer's
running mean and variance are replaced by theirs, and the weights stay. Each origin of the shared data is taken as
one site, with the films it has (the origins the model never saw: every film; the covid-cxr sources it trained on:
their test films), and scored before and after adapting to it, at the model's threshold: specificity of normal films,
sensitivity of COVID-19 films, the share of other findings called COVID-19. A site of COVID-19 films only
(covid-cxnet, ieee8023) shows what adaptation costs when the site's mix is not the training mix: the statistics then
describe COVID-19, and COVID-19 becomes the site's "normal". PyTorch backend; the shipped graphs are not changed.
"""

from __future__ import annotations

import argparse
import copy
import os

import numpy as np
import torch
from torch import nn

from common import ROOT, save
from origins import pooled_rows, write_manifest
from covidxray.cache import readable_images
from covidxray.data import load_samples
from covidxray.inference import predict_probs
from covidxray.predictor import Predictor

SITES = {  # origin: which of its films make the site
    "shenzhen": None, "montgomery": None, "jsrt": None,  # never in the bundled model's training: every film
    "radiography-db": "test", "covid-cxnet": "test", "ieee8023": "test",  # trained on: their held-out test films
}


def site_films(predictor: Predictor, origin: str, split: str | None) -> tuple[torch.Tensor, list[str]]:
    rows = [r for r in pooled_rows() if r[2] == origin and split in (None, r[4])]
    samples = load_samples(write_manifest(rows, ROOT / "runs" / "origins" / f"site-{origin}-{split or 'all'}.csv"))
    findings = {r[0]: r[6] for r in rows}
    kept, images, _ = readable_images(samples, predictor.preprocess, ROOT / "runs" / "cache", desc=f"decoding {origin}")
    return images, [findings[str(s.path)] for s in kept]


@torch.no_grad()
def adapt(model: nn.Module, images: torch.Tensor, predictor: Predictor, batch: int = 64) -> None:
    """Every BatchNorm layer's running statistics re-estimated on ``images`` (cumulative average over batches)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for start in range(0, len(images), batch):
        model(predictor.preprocess.to_tensor(images[start:start + batch]))
    model.eval()


def rates(p: np.ndarray, findings: list[str], threshold: float) -> dict[str, float]:
    out = {}
    for finding in sorted(set(findings)):
        called = float((p[[f == finding for f in findings]] >= threshold).mean())
        out[finding] = round(1 - called if finding == "normal" else called, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "src" / "covidxray" / "bundled"))
    args = parser.parse_args()
    torch.manual_seed(0)
    predictor = Predictor(args.model, backend="torch", gate=False)
    model, thr, temperature = predictor.model, predictor.threshold, predictor.temperature
    original = copy.deepcopy(model.state_dict())
    rows = []
    for origin, split in SITES.items():
        images, findings = site_films(predictor, origin, split)
        model.load_state_dict(original)
        before = rates(predict_probs(model, images, predictor.preprocess, temperature=temperature), findings, thr)
        adapt(model, images, predictor)
        after = rates(predict_probs(model, images, predictor.preprocess, temperature=temperature), findings, thr)
        rows.append({"site": origin, "films": len(findings), "split": split or "all", "before": before, "after": after})
        print(rows[-1], flush=True)
    model.load_state_dict(original)
    words = {"normal": "normals: specificity", "covid": "COVID-19: sensitivity", "tuberculosis": "tuberculosis called COVID-19",
             "nodule": "nodules called COVID-19"}
    table = ["| site (its films) | films | measure | before | after AdaBN |", "|---|---:|---|---:|---:|"]
    table += [f"| {r['site']} ({r['split']}) | {r['films']} | {words[k]} | {r['before'][k]} | {r['after'][k]} |"
              for r in rows for k in r["before"]]
    shown = os.path.relpath(args.model, ROOT)
    note = (f"Model {shown} (PyTorch), threshold {thr:.3f}, temperature {temperature:.3f}; each site adapted from the "
            "model as shipped, on all of its films listed, then scored on the same films (adaptation uses no label).")
    save("site-adaptation", {"title": "Site adaptation without labels: BatchNorm statistics re-estimated per origin (AdaBN)",
                             "rows": rows, "table": table + ["", note],
                             "command": "python bench/site_adaptation.py"})


if __name__ == "__main__":
    main()
