"""Does the last layer travel better when the COVID-19 sources weigh differently in it?

    python bench/head_sources.py                  # the bundled model's features (bench/head_pool.py's cache)

covid-cxr's normals all come from radiography-db, its COVID-19 films from radiography-db, covid-cxnet and ieee8023.
A head fitted on all of them may learn "from covid-cxnet or ieee8023" as COVID-19. The backbone stays as shipped; only
the head is refitted (`covidxray.headfit.fit_head`, C chosen on validation ROC-AUC), on: every training film (the
shipped recipe), radiography-db's films only (both classes from one source), every film with each COVID-19 source
weighing the same in total, and every film with covid-cxnet and ieee8023 at 0.3. The threshold keeps 0.90
sensitivity on the validation COVID-19 films. Scored: the test split's COVID-19 films per source (sensitivity), and
*every* film of JSRT, Shenzhen and Montgomery, which neither the backbone nor any head here has seen (specificity on
their normals, their other findings called COVID-19).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from common import ROOT, save
from head_pool import SENSITIVITY, cached_features
from head_refit import CXR
from origins import NORMAL_ORIGINS
from covidxray.headfit import fit_head
from covidxray.predictor import Predictor


def variants(train: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Name -> (training films kept, their weights)."""
    every, rdb = np.ones(len(train["feats"]), bool), train["source"] == "radiography-db"
    covid = train["finding"] == "covid"
    balanced = np.ones(len(every))
    for source in CXR:
        here = covid & (train["source"] == source)
        balanced[here] = covid.sum() / len(CXR) / here.sum()
    return {"every training film (shipped)": (every, np.ones(len(every))),
            "radiography-db only": (rdb, np.ones(len(every))),
            "COVID-19 sources weigh the same": (every, balanced),
            "covid-cxnet and ieee8023 at 0.3": (every, np.where(rdb, 1.0, 0.3))}


def main() -> None:
    model = str(ROOT / "src" / "covidxray" / "bundled")
    parts = cached_features(Predictor(model, backend="torch", gate=False), model)
    train, val, test, unseen = parts["train"], parts["val"], parts["test"], parts["unseen"]
    rows = {}
    for name, (keep, weight) in variants(train).items():
        vkeep = val["source"] == "radiography-db" if name == "radiography-db only" else np.ones(len(val["feats"]), bool)
        refit = fit_head(train["feats"][keep], train["finding"][keep] == "covid", val["feats"][vkeep],
                         val["finding"][vkeep] == "covid", sample_weight=weight[keep])
        m = {k: refit.head.margin(v["feats"]) for k, v in parts.items()}
        t = float(np.quantile(m["val"][val["finding"] == "covid"], 1 - SENSITIVITY, method="lower"))
        two = np.isin(test["finding"], ("covid", "normal"))
        r = {"C": refit.c, "test ROC-AUC": roc_auc_score(test["finding"][two] == "covid", m["test"][two])}
        for source in CXR:
            r[f"sensitivity {source}"] = (m["test"][(test["source"] == source) & (test["finding"] == "covid")] >= t).mean()
        for origin in NORMAL_ORIGINS:
            here = unseen["source"] == origin
            r[f"specificity {origin}"] = (m["unseen"][here & (unseen["finding"] == "normal")] < t).mean()
            r[f"other called COVID-19 {origin}"] = (m["unseen"][here & (unseen["finding"] != "normal")] >= t).mean()
        rows[name] = {k: round(float(v), 4) for k, v in r.items()}
        print(name, rows[name], flush=True)
    keys = [k for k in next(iter(rows.values())) if k != "C"]
    table = ["| head fitted on | C | " + " | ".join(keys) + " |", "|---|---:|" + "---:|" * len(keys)]
    table += [f"| {name} | {r['C']:g} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for name, r in rows.items()]
    table.append(f"\nBundled backbone; threshold: {SENSITIVITY:.2f} sensitivity on the validation split's COVID-19 films; "
                 "JSRT, Shenzhen and Montgomery: every film (never seen by the backbone or the head). COVID-19 is the "
                 "positive class.")
    save("head-sources", {"title": "The head refitted with the COVID-19 sources weighed differently (bundled backbone)",
                          "rows": rows, "table": table, "command": "python bench/head_sources.py"})
    print("\n".join(table))


if __name__ == "__main__":
    main()
