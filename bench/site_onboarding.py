"""Onboarding a site with 60 of its normal films: held-out specificity there, and what it costs in sensitivity.

For each normal origin of the shared data (``jsrt``, ``shenzhen``, ``montgomery``: hospitals the
bundled model never saw), a site is onboarded the way ``covidxray site add`` does it: 60 of its
normal films, drawn at random (seeded), go through the model and its input gate, and the site's
threshold is the lowest that calls at least the target share of the answered ones normal
(`covidxray.sites.site_threshold`, the function ``site add`` uses). The origin's other normal films
(never used to set it) give the held-out specificity at that threshold, and the COVID-19 films of
the covid-cxr test split from ``covid-cxnet`` and ``ieee8023`` give the sensitivity at it. Every
film is scored once; the seeds only redraw the 60. Mean and minimum over the seeds. Specificity at
the site is on held-out normals for an onboarded site, on every normal without one.

    python bench/site_onboarding.py                       # the bundled model, seeds 0-4
    python bench/site_onboarding.py --model runs/X --name X
"""

from __future__ import annotations

import argparse

import numpy as np

from common import save
from origins import COVID_ORIGINS, NORMAL_ORIGINS, pooled_rows
from covidxray.errors import ImageError
from covidxray.predictor import Predictor
from covidxray.sites import site_threshold

N_ONBOARD = 60


def scores(predictor: Predictor) -> dict[str, np.ndarray]:
    """P(COVID-19) of every answered film: each normal origin's normals, and the test-split COVID-19 films per origin."""
    rows = pooled_rows()
    groups = {f"{o}/normal": [r[0] for r in rows if r[2] == o and r[1] == "normal"] for o in NORMAL_ORIGINS}
    groups |= {f"{o}/covid": [r[0] for r in rows if r[2] == o and r[1] == "covid" and r[4] == "test"] for o in COVID_ORIGINS}
    out = {}
    for key, paths in groups.items():
        answers = [a for a in predictor.predict_paths(paths) if not isinstance(a, ImageError) and a.answered]
        out[key] = np.array([a.probability for a in answers])
        print(f"{key}: {len(out[key])} of {len(paths)} films answered", flush=True)
    return out


def onboard(p: dict[str, np.ndarray], origin: str, seed: int, target: float, floor: float | None) -> dict:
    """One onboarding of ``origin`` with `N_ONBOARD` seeded normals: the threshold and what it gives.

    ``floor``: the model's threshold (``site add``'s default rule), or None (``site add --allow-lower``)."""
    normals = p[f"{origin}/normal"]
    order = np.random.default_rng(seed).permutation(len(normals))
    # Answered films only are scored here, so this is the worst case of `site add` (60 answered, not 60 sent).
    onboard_p, held = normals[order[:N_ONBOARD]], normals[order[N_ONBOARD:]]
    t = site_threshold(onboard_p, target, floor)
    return {"threshold": t, "held_out_specificity": float((held < t).mean()), "held_out_n": len(held),
            **{f"sensitivity_{o}": float((p[f"{o}/covid"] >= t).mean()) for o in COVID_ORIGINS}}


RULES = (("site add, target specificity 0.95", 0.95, True), ("site add, target specificity 0.9", 0.9, True),
         ("site add --allow-lower, target specificity 0.95", 0.95, False))


def ceiling(p: dict[str, np.ndarray], origin: str) -> float:
    """The origin's specificity (every normal) at the highest threshold keeping 0.90 sensitivity on both COVID-19
    origins: the best any threshold can do for the target, whatever the onboarding."""
    t = min(float(np.quantile(p[f"{o}/covid"], 0.10, method="lower")) for o in COVID_ORIGINS)
    return float((p[f"{origin}/normal"] < t).mean())


def summarise(p: dict[str, np.ndarray], default_threshold: float, seeds: list[int]) -> tuple[dict, list[str]]:
    results: dict = {"default": {}}
    keys = ["held_out_specificity", *[f"sensitivity_{o}" for o in COVID_ORIGINS]]
    table = ["| site (normal origin) | rule | threshold (mean) | specificity at the site, mean / min | "
             + " | ".join(f"sensitivity {o} mean / min" for o in COVID_ORIGINS) + " | target met (every seed) |",
             "|---|---|---:|---|" + "---|" * len(COVID_ORIGINS) + "---|"]
    sens_default = {o: float((p[f"{o}/covid"] >= default_threshold).mean()) for o in COVID_ORIGINS}
    for origin in NORMAL_ORIGINS:
        spec = float((p[f"{origin}/normal"] < default_threshold).mean())
        results["default"][origin] = {"specificity_all_normals": spec, "ceiling_specificity": ceiling(p, origin),
                                      **{f"sensitivity_{o}": v for o, v in sens_default.items()}}
        table.append(f"| {origin} ({len(p[f'{origin}/normal'])} normals) | no site: the model's threshold | {default_threshold:.3f} | "
                     f"{spec:.3f} (every normal) | " + " | ".join(f"{v:.3f}" for v in sens_default.values()) + " | "
                     f"{'yes' if spec >= 0.9 and min(sens_default.values()) >= 0.9 else 'no'} |")
        for label, target, raise_only in RULES:
            runs = [onboard(p, origin, seed, target, default_threshold if raise_only else None) for seed in seeds]
            agg = {k: {"mean": float(np.mean([r[k] for r in runs])), "min": float(np.min([r[k] for r in runs]))} for k in keys}
            met = all(r["held_out_specificity"] >= 0.9 and all(r[f"sensitivity_{o}"] >= 0.9 for o in COVID_ORIGINS) for r in runs)
            key = f"{origin}@{target:g}{'' if raise_only else '-allow-lower'}"
            results[key] = {"origin": origin, "target_specificity": target, "allow_lower": not raise_only, "runs": runs, **agg,
                            "threshold_mean": float(np.mean([r["threshold"] for r in runs])), "target_met": met}
            table.append(f"| {origin} | {label} | {results[key]['threshold_mean']:.3f} | "
                         + " | ".join(f"{agg[k]['mean']:.3f} / {agg[k]['min']:.3f}" for k in keys)
                         + f" | {'yes' if met else 'no'} |")
        table.append(f"| {origin} | ceiling: any threshold with 0.90 sensitivity on both | | {ceiling(p, origin):.3f} (every normal) "
                     "| 0.90 | 0.90 | |")
    return results, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the bundled model)")
    ap.add_argument("--name", default="bundled", help="result name: bench/results/site-onboarding-NAME.json")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    predictor = Predictor(args.model)
    p = scores(predictor)
    results, table = summarise(p, predictor.threshold, list(range(args.seeds)))
    counts = {k: int(len(v)) for k, v in p.items()}
    command = "python bench/site_onboarding.py" + (f" --model {args.model} --name {args.name}" if args.model else "")
    save(f"site-onboarding-{args.name}", {
        "title": f"Site onboarding with {N_ONBOARD} normal films ({args.name} model, seeds 0-{args.seeds - 1}; "
                 "target: held-out specificity >= 0.90 with sensitivity >= 0.90 on both COVID-19 origins)",
        "table": table, "results": results, "answered_films": counts, "default_threshold": predictor.threshold,
        "model": predictor.name, "backend": predictor.backend, "command": command})
    print("\n".join(table))


if __name__ == "__main__":
    main()
