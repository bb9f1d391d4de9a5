"""Could onboarding refit the last layer with the site's normal films, instead of only moving the threshold?

    python bench/site_head.py                  # the bundled model, seeds 0-4

What ``covidxray site add NAME --normals DIR --refit-head`` does, measured. For each normal origin the model never
saw (JSRT, Shenzhen, Montgomery), 60 of its normal films (seeded draws) join the training films' features and the
head is refitted (`covidxray.headfit.site_head`, at the bundled model's C), the 60 weighing ``--weight`` times a
training film each. The site head's threshold keeps 0.90 sensitivity on the validation split's COVID-19 films, so no
site film sets it; then site add's rule applies on top (raised, never lowered, until 0.95 of the 60 are called
normal). Scored: the site's other normal films
(specificity), its other findings (tuberculosis, nodules: called COVID-19), and the test split's COVID-19 films of
each origin (sensitivity). The shipped head with `covidxray site add`'s rule (a threshold raised until 0.95 of the
60 are called normal) is the baseline. What no shared set can show: whether COVID-19 films *from the site* would
still be found once its normals have been learnt as normal.
"""

from __future__ import annotations

import argparse

import numpy as np

from common import ROOT, save
from head_refit import CXR, features
from origins import NORMAL_ORIGINS
from covidxray.headfit import HeadFeatures, site_head
from covidxray.predictor import Predictor
from covidxray.sites import site_threshold

N_ONBOARD = 60
SENSITIVITY = 0.90


def site_margins(parts: dict, c: float, onboard: np.ndarray, weight: float) -> dict[str, np.ndarray]:
    """The margins of every part under the site's head (`covidxray.headfit.site_head`, what ``site add --refit-head``
    fits), shifted so that 0 is where 0.90 of the validation COVID-19 films stay at or above it."""
    train, val, unseen = parts["train"], parts["val"], parts["unseen"]
    kept = HeadFeatures(train["feats"], train["finding"] == "covid", val["feats"], val["finding"] == "covid")
    head = site_head(kept, unseen["feats"][onboard], c, temperature=1.0, threshold=0.5, sensitivity=SENSITIVITY,
                     weight=weight)
    return {k: head.margin(v["feats"]) for k, v in parts.items()}


def rates(parts: dict, m: dict[str, np.ndarray], t: float, held: np.ndarray, site: str) -> dict[str, float]:
    test, unseen = parts["test"], parts["unseen"]
    other = np.flatnonzero((unseen["source"] == site) & (unseen["finding"] != "normal"))
    out = {"held_out_specificity": float((m["unseen"][held] < t).mean()),
           "other_called_covid": float((m["unseen"][other] >= t).mean())}
    for origin in CXR:
        out[f"sensitivity_{origin}"] = float((m["test"][(test["source"] == origin) & (test["finding"] == "covid")] >= t).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "src" / "covidxray" / "bundled"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--weight", type=float, default=20.0, help="each onboarding film's weight against a training film's")
    args = ap.parse_args()
    predictor = Predictor(args.model, backend="torch", gate=False)
    c = float(predictor.meta.get("head_refit", {}).get("c", 0.3))  # the shipped refit's strength
    parts = features(predictor)
    shipped = {k: v["margin"] for k, v in parts.items()}
    p_shipped = 1 / (1 + np.exp(-shipped["unseen"]))  # P(COVID-19) at the model's temperature
    rows, table = {}, ["| site | onboarding | held-out normals: specificity | other findings called COVID-19 | "
                       + " | ".join(f"sensitivity {o}" for o in CXR) + " |", "|---|---|---:|---:|" + "---:|" * len(CXR)]
    for site in NORMAL_ORIGINS:
        normals = np.flatnonzero((parts["unseen"]["source"] == site) & (parts["unseen"]["finding"] == "normal"))
        runs: dict[str, list[dict]] = {"shipped head, site add's threshold (0.95 of the 60)": [],
                                       f"site add --refit-head: head refitted with the 60 (weight {args.weight:g})": []}
        for seed in range(args.seeds):
            order = np.random.default_rng(seed).permutation(normals)
            onboard, held = order[:N_ONBOARD], order[N_ONBOARD:]
            t = site_threshold(p_shipped[onboard], 0.95, predictor.threshold)
            runs[next(iter(runs))].append(rates(parts, shipped, float(np.log(t / (1 - t))), held, site))
            m = site_margins(parts, c, onboard, args.weight)  # and site add's rule on top, as the product does
            t = site_threshold(1 / (1 + np.exp(-m["unseen"][onboard])), 0.95, 0.5)
            runs[list(runs)[1]].append(rates(parts, m, float(np.log(t / (1 - t))), held, site))
        for name, rs in runs.items():
            agg = {k: {"mean": float(np.mean([r[k] for r in rs])), "min": float(np.min([r[k] for r in rs]))} for k in rs[0]}
            rows[f"{site}: {name}"] = agg
            table.append(f"| {site} ({len(normals)} normals) | {name} | " + " | ".join(
                f"{agg[k]['mean']:.3f} (min {agg[k]['min']:.3f})" for k in rs[0]) + " |")
    save("site-head", {"title": f"Onboarding a site by refitting the head with {N_ONBOARD} of its normal films "
                                f"(bundled model, seeds 0-{args.seeds - 1}, mean and min; COVID-19 is the positive class)",
                       "table": table, "rows": rows, "c": c, "weight": args.weight,
                       "command": "python bench/site_head.py"})
    print("\n".join(table))


if __name__ == "__main__":
    main()
