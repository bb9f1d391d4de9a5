"""What a site's own head costs when serving: the same folder decided with no site and at a site with its head.

    python bench/site_cost.py [--rounds 9]          # the bundled model, on an otherwise idle machine

A site is onboarded as ``covidxray site add NAME --normals DIR --refit-head`` does (`onboard_site`), from 60 of
JSRT's normal films (the first 60 by name). Then two Predictors of the shipped default graph (int8 with its float
re-check) decide the same folders, in turn, ``--rounds`` times: one as `covidxray predict FOLDER` does with no site,
the other as ``predict --site`` does (`Predictor.watch_sites`, then `Predictor.at_site` on every answer: the site
head's dot product over the features, and the films near the site head's threshold re-checked in float). The
folders: the 128 covid-cxr JPEGs `bench/infer_speed.py` times, and JSRT's other 182 films (the site's own kind,
where its threshold is in play). Reported: films/s (median round), and the share of films the cascade re-checked.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import ROOT, save
from covidxray.onboarding import onboard_site
from covidxray.predictor import Predictor

SHARED = Path(os.environ.get("COVIDXRAY_DATA", ROOT.parent / "shared" / "datasets" / "covid-cxr")).parent


def timed_pass(pred: Predictor, files: list[Path], site) -> tuple[float, float]:
    """Seconds for one pass over ``files`` (decided at ``site``, or with none), and the share the cascade re-checked."""
    scored, rechecked = pred.runner.scored, pred.runner.rechecked
    start = time.perf_counter()
    answers = [pred.at_site(p, site) if site is not None else p for p in pred.predict_paths(files)]
    seconds = time.perf_counter() - start
    assert len(answers) == len(files)
    return seconds, (pred.runner.rechecked - rechecked) / max(1, pred.runner.scored - scored)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    jsrt = sorted((SHARED / "jsrt" / "images").rglob("*.jpg"))
    normals = [f for f in jsrt if f.parent.name == "normal"][:60]
    with tempfile.TemporaryDirectory() as tmp:
        for f in normals:
            (Path(tmp) / f.name).symlink_to(f)
        site = onboard_site("bench-site", tmp, refit_head=True, validation=False)
    plain, at_site = Predictor(), Predictor()
    at_site.watch_sites([site])
    folders = {"128 covid-cxr JPEGs": sorted((SHARED / "covid-cxr" / "images").rglob("*.jpg"))[::20][:128],
               f"{len(jsrt) - len(normals)} other JSRT films": [f for f in jsrt if f not in normals]}
    load_before = os.getloadavg()
    rows, table = {}, ["| folder | no site: films/s | site head: films/s | ratio | re-checked in float: no site / site |",
                       "|---|---:|---:|---:|---:|"]
    for name, files in folders.items():
        timed_pass(plain, files, None), timed_pass(at_site, files, site)  # warm-up
        runs = {"plain": [], "site": []}
        for _ in range(args.rounds):
            runs["plain"].append(timed_pass(plain, files, None))
            runs["site"].append(timed_pass(at_site, files, site))
        speed = {k: len(files) / statistics.median(s for s, _ in v) for k, v in runs.items()}
        share = {k: statistics.mean(r for _, r in v) for k, v in runs.items()}
        rows[name] = {"films": len(files), "img_per_s": speed, "rechecked": share}
        table.append(f"| {name} | {speed['plain']:.1f} | {speed['site']:.1f} | {speed['site'] / speed['plain']:.3f} | "
                     f"{100 * share['plain']:.1f}% / {100 * share['site']:.1f}% |")
    table.append(f"\nBundled model {plain.name}, backend {plain.backend} (int8, float re-check band "
                 f"{plain.runner.band:g}); site head fitted on 60 JSRT normals (threshold {site.threshold:.4f}, model's "
                 f"{plain.threshold:.4f}); median of {args.rounds} rounds, the two Predictors in turn. Load average "
                 f"before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs.")
    save("site-cost", {"title": "A site's own head when serving: the same folders with no site and at the site",
                       "rows": rows, "table": table, "command": "python bench/site_cost.py"})
    print("\n".join(table))


if __name__ == "__main__":
    main()
