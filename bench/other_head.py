"""Could a second head, "another lung disease", keep tuberculosis and nodules from being called COVID-19?

    python bench/other_head.py                  # the bundled model's features (bench/head_pool.py's cache)

The shipped COVID-19 head stays as it is. A second logistic head on the same features learns *another finding
versus normal* from origins that give both (Shenzhen and Montgomery: tuberculosis and normal; JSRT: nodule and
normal), so the origin cannot tell the classes apart and only the lungs can: the within-origin contrast the issue
proposes. A film the COVID-19 head calls positive and the second head calls "other finding" would get a third
outcome, "abnormal, not typical of COVID-19", instead of "COVID-19". Its threshold is set on validation COVID-19
films alone: at most ``--flag`` (3 %) of those called COVID-19 may be flagged. C is chosen on the training origins'
validation patients. Leave one origin out: the second head is fitted without any film of the held-out origin, and
every film of it is scored; ``nothing`` fits it on all three origins' training patients and scores their test
patients. Sensitivity is on covid-cxr's test split, per COVID-19 source.
"""

from __future__ import annotations

import argparse

import numpy as np

from common import ROOT, save
from head_pool import SENSITIVITY, cached_features
from head_refit import CXR
from origins import NORMAL_ORIGINS
from covidxray.headfit import fit_head
from covidxray.predictor import Predictor


def other_head(unseen: dict, origins: tuple[str, ...]):
    """The "other finding vs normal" head fitted on the training patients of ``origins`` (C on their validation ones)."""
    pick = {s: np.isin(unseen["source"], origins) & (unseen["split"] == s) for s in ("train", "val")}
    y = unseen["finding"] != "normal"
    return fit_head(unseen["feats"][pick["train"]], y[pick["train"]], unseen["feats"][pick["val"]], y[pick["val"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flag", type=float, default=0.03, help="share of validation COVID-19 positives it may flag")
    args = ap.parse_args()
    model = str(ROOT / "src" / "covidxray" / "bundled")
    parts = cached_features(Predictor(model, backend="torch", gate=False), model)
    val, test, unseen = parts["val"], parts["test"], parts["unseen"]
    covid_val = val["finding"] == "covid"
    t = float(np.quantile(val["margin"][covid_val], 1 - SENSITIVITY, method="lower"))  # the COVID-19 head's threshold
    rows = {}
    for held in (*NORMAL_ORIGINS, None):
        refit = other_head(unseen, tuple(o for o in NORMAL_ORIGINS if o != held))
        other = {k: refit.head.margin(v["feats"]) for k, v in parts.items()}
        positive_val = covid_val & (val["margin"] >= t)
        t_other = float(np.quantile(other["val"][positive_val], 1 - args.flag, method="higher"))
        r: dict[str, float] = {"C": refit.c}
        for source in CXR:
            films = (test["source"] == source) & (test["finding"] == "covid")
            called = test["margin"][films] >= t
            r[f"sensitivity {source}"] = called.mean()
            r[f"sensitivity {source}, flagged out"] = (called & (other["test"][films] < t_other)).mean()
        for origin in NORMAL_ORIGINS if held is None else (held,):
            here = (unseen["source"] == origin) & ((unseen["split"] == "test") | (held is not None))
            for finding, kind in (("normal", "normals"), ("other", "other findings")):
                films = here & ((unseen["finding"] == "normal") == (finding == "normal"))
                called = unseen["margin"][films] >= t
                r[f"{origin} {kind} called COVID-19"] = called.mean()
                r[f"{origin} {kind} called COVID-19, flagged out"] = (called & (other["unseen"][films] < t_other)).mean()
        rows[held or "nothing"] = {k: round(float(v), 4) for k, v in r.items()}
        print(held or "nothing", rows[held or "nothing"], flush=True)
    table = ["| other-finding head fitted without | C | COVID-19 sensitivity radiography-db / covid-cxnet / ieee8023: "
             "COVID-19 head → flagged out | scored origin | normals called COVID-19 | other findings called COVID-19 |",
             "|---|---:|---|---|---:|---:|"]
    for held, r in rows.items():
        sens = " / ".join(f"{r[f'sensitivity {s}']:.3f} → {r[f'sensitivity {s}, flagged out']:.3f}" for s in CXR)
        for origin in NORMAL_ORIGINS if held == "nothing" else (held,):
            table.append(f"| {held} | {r['C']:g} | {sens} | {origin}{' (test patients)' if held == 'nothing' else ''} | "
                         f"{r[f'{origin} normals called COVID-19']:.3f} → {r[f'{origin} normals called COVID-19, flagged out']:.3f} | "
                         f"{r[f'{origin} other findings called COVID-19']:.3f} → "
                         f"{r[f'{origin} other findings called COVID-19, flagged out']:.3f} |")
            sens = "〃"
    table.append(f"\nBundled backbone and COVID-19 head (threshold: {SENSITIVITY:.2f} sensitivity on the validation COVID-19 "
                 f"films); the other-finding head's threshold lets at most {args.flag:.0%} of the validation COVID-19 "
                 "films called positive be flagged. \"→\": the COVID-19 head alone, then with the flagged films taken out "
                 "of COVID-19 (they would be \"abnormal, not typical of COVID-19\"). Gate off. COVID-19 is the positive class.")
    save("other-head", {"title": "A second head for other lung disease (tuberculosis, nodules), one origin left out at a time",
                        "rows": rows, "table": table, "command": "python bench/other_head.py"})
    print("\n".join(table))


if __name__ == "__main__":
    main()
