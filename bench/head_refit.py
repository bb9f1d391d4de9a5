"""Is the classifier's last layer the weak part? Refit it on the training films' own features and score every origin.

    python bench/head_refit.py                                   # the bundled model
    python bench/head_refit.py --model runs/loso/NAME/seed0/jsrt+shenzhen+montgomery --name NAME

The network's pre-logit features of the covid-cxr training films are taken once, as prediction sees them (no
augmentation), and an L2-regularised logistic regression on them replaces the head (`covidxray.head.fit_head`,
what `covidxray refit-head` does); the regularisation is chosen on the validation split's ROC-AUC. The shipped
head and the refitted ones are then scored alike: ROC-AUC on validation and on the test split (COVID-19 against
normal), and on the origins the model never saw (JSRT, Shenzhen, Montgomery) at one rule,
the threshold that keeps 0.90 sensitivity on the validation split's COVID-19 films: specificity of their normals and
the share of their other findings (nodules, tuberculosis) called COVID-19; and sensitivity per COVID-19 origin of the
test split at that threshold. The test split chooses nothing here.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import roc_auc_score

from common import ROOT, save
from origins import NORMAL_ORIGINS, origin_films
from covidxray.head import C_GRID, fit_head
from covidxray.inference import logits_and_features
from covidxray.predictor import Predictor

CXR = ("radiography-db", "covid-cxnet", "ieee8023")
SENSITIVITY = 0.90


def features(predictor: Predictor) -> dict[str, dict[str, np.ndarray]]:
    """Per part (train, val, test of covid-cxr; the unseen origins' every film): features, margins, origins, findings,
    splits (the unseen origins' patient split of `origins.pooled_rows`)."""
    out = {}
    for part, origins, split in (("train", CXR, "train"), ("val", CXR, "val"), ("test", CXR, "test"), ("unseen", NORMAL_ORIGINS, None)):
        kept, images, findings = origin_films(predictor.preprocess, origins, split, ROOT / "runs" / "cache", "head")
        logits, feats = logits_and_features(predictor.model, predictor.meta["arch"], images, predictor.preprocess)
        out[part] = {"feats": feats, "margin": (logits[:, 1] - logits[:, 0]) / predictor.temperature,
                     "source": np.array([s.source for s in kept]), "finding": np.array(findings),
                     "split": np.array([s.split for s in kept])}
        print(f"{part}: {len(kept)} films", flush=True)
    return out


def score(parts: dict, margins: dict[str, np.ndarray]) -> dict:
    """The numbers of one head, given its margin (logit of COVID-19) on every part."""
    def auc(part: str) -> float:
        keep = np.isin(parts[part]["finding"], ("covid", "normal"))
        return float(roc_auc_score(parts[part]["finding"][keep] == "covid", margins[part][keep]))

    val_covid = margins["val"][parts["val"]["finding"] == "covid"]
    t = float(np.quantile(val_covid, 1 - SENSITIVITY, method="lower"))
    out = {"val_roc_auc": auc("val"), "test_roc_auc": auc("test")}
    test, unseen = parts["test"], parts["unseen"]
    for origin in CXR:
        out[f"sensitivity_{origin}"] = float((margins["test"][(test["source"] == origin) & (test["finding"] == "covid")] >= t).mean())
    for origin in NORMAL_ORIGINS:
        here = unseen["source"] == origin
        out[f"specificity_{origin}"] = float((margins["unseen"][here & (unseen["finding"] == "normal")] < t).mean())
        out[f"other_called_covid_{origin}"] = float((margins["unseen"][here & (unseen["finding"] != "normal")] >= t).mean())
    out["worst_unseen_specificity"] = min(out[f"specificity_{o}"] for o in NORMAL_ORIGINS)
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "src" / "covidxray" / "bundled"))
    ap.add_argument("--name", default="bundled", help="result name: bench/results/head-refit-NAME.json")
    args = ap.parse_args()
    predictor = Predictor(args.model, backend="torch", gate=False)
    parts = features(predictor)
    heads = {"shipped head": {k: v["margin"] for k, v in parts.items()}}
    chosen = fit_head(parts["train"]["feats"], parts["train"]["finding"] == "covid",
                      parts["val"]["feats"], parts["val"]["finding"] == "covid")
    for c, head in chosen.candidates.items():
        heads[f"refit, C={c:g}{' (chosen on validation)' if c == chosen.c else ''}"] = {k: head.margin(v["feats"]) for k, v in parts.items()}
    rows = {name: score(parts, m) for name, m in heads.items()}
    keys = list(next(iter(rows.values())))
    table = ["| head | " + " | ".join(k.replace("_", " ") for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    table += [f"| {name} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " |" for name, v in rows.items()]
    named = "" if args.name == "bundled" else f" --model {args.model} --name {args.name}"
    save(f"head-refit-{args.name}", {
        "title": f"The classifier's last layer refitted on its training films' features ({args.name} model; "
                 f"threshold: {SENSITIVITY:.2f} sensitivity on the validation split's COVID-19 films; COVID-19 is the positive class)",
        "table": table, "rows": rows, "chosen_c": chosen.c, "c_grid": list(C_GRID),
        "command": f"python bench/head_refit.py{named}"})
    print("\n".join(table))


if __name__ == "__main__":
    main()
