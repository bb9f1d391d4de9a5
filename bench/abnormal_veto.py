"""Could an "is anything abnormal?" head, learnt within origins, veto COVID-19 calls on normal films of a new origin?

    python bench/abnormal_veto.py                  # the bundled model's features (bench/head_pool.py's cache)

`bench/other_head.py` fits a second logistic head on the bundled backbone's features: *another finding versus normal*,
only on origins that give both (Shenzhen and Montgomery: tuberculosis; JSRT: nodules), so the origin cannot tell its
classes apart. It asked whether that head's *high* end separates tuberculosis from COVID-19 (it does not). This asks
about its *low* end: a film the COVID-19 head calls positive but the abnormality head calls plainly normal (below the
``v`` quantile of the validation COVID-19 films' abnormality scores) is answered "normal". The pair of thresholds is
chosen on validation alone, at matched sensitivity: for each veto share ``v``, the COVID-19 threshold is then the
highest that keeps 0.90 sensitivity on the validation COVID-19 films with the veto applied (``v = 0`` is the shipped
rule). Leave one origin out: the abnormality head never sees the held-out origin, whose every film is scored;
``nothing`` fits it on all three origins' training patients and scores their test patients (few films: JSRT's test
patients hold 14 normals). Sensitivity is on covid-cxr's test split, per COVID-19 source. One backbone (the bundled
one), gate off.
"""

from __future__ import annotations

import numpy as np

from common import ROOT, save
from head_pool import SENSITIVITY, cached_features
from head_refit import CXR
from origins import NORMAL_ORIGINS
from other_head import other_head
from covidxray.predictor import Predictor

VETOES = (0.0, 0.02, 0.03, 0.05)


def thresholds(val: dict, abnormal: np.ndarray, veto: float) -> tuple[float, float]:
    """The veto's threshold on the abnormality margin, then the highest COVID-19 threshold keeping the sensitivity."""
    covid = val["finding"] == "covid"
    t_abnormal = float(np.quantile(abnormal[covid], veto, method="lower")) if veto else -np.inf
    kept = np.sort(val["margin"][covid & (abnormal >= t_abnormal)])[::-1]
    return float(kept[int(np.ceil(SENSITIVITY * covid.sum())) - 1]), t_abnormal


def scores(parts: dict, abnormal: dict, t: float, t_abnormal: float, held: str | None) -> dict[str, float]:
    """Sensitivity per covid-cxr source (test), and per scored origin its normals' specificity and other findings called COVID-19."""
    def called(part: str, films: np.ndarray) -> float:
        return float(((parts[part]["margin"][films] >= t) & (abnormal[part][films] >= t_abnormal)).mean())

    test, unseen = parts["test"], parts["unseen"]
    r = {f"sensitivity {s}": called("test", (test["source"] == s) & (test["finding"] == "covid")) for s in CXR}
    for origin in NORMAL_ORIGINS if held is None else (held,):
        here = (unseen["source"] == origin) & ((unseen["split"] == "test") | (held is not None))
        normal = here & (unseen["finding"] == "normal")
        r[f"{origin} normals"] = int(normal.sum())
        r[f"{origin} specificity"] = 1 - called("unseen", normal)
        r[f"{origin} other findings called COVID-19"] = called("unseen", here & ~normal)
    return r


def main() -> None:
    model = str(ROOT / "src" / "covidxray" / "bundled")
    parts = cached_features(Predictor(model, backend="torch", gate=False), model)
    rows = {}
    for held in (*NORMAL_ORIGINS, None):
        head = other_head(parts["unseen"], tuple(o for o in NORMAL_ORIGINS if o != held)).head
        abnormal = {k: head.margin(v["feats"]) for k, v in parts.items()}
        for veto in VETOES:
            t, t_abnormal = thresholds(parts["val"], abnormal["val"], veto)
            r = {"COVID-19 threshold (margin)": t, "abnormality threshold (margin)": t_abnormal,
                 **scores(parts, abnormal, t, t_abnormal, held)}
            rows[f"{held or 'nothing'}, veto {veto:g}"] = {k: round(float(v), 4) for k, v in r.items()}
            print(held or "nothing", veto, rows[f"{held or 'nothing'}, veto {veto:g}"], flush=True)
    table = ["| abnormality head fitted without | veto share v | scored origin | normals | specificity | "
             "other findings called COVID-19 | sensitivity radiography-db / covid-cxnet / ieee8023 |",
             "|---|---:|---|---:|---:|---:|---|"]
    for key, r in rows.items():
        held, veto = key.split(", veto ")
        for origin in NORMAL_ORIGINS if held == "nothing" else (held,):
            sens = " / ".join(f"{r[f'sensitivity {s}']:.3f}" for s in CXR)
            table.append(f"| {held} | {veto}{' (shipped rule)' if veto == '0' else ''} | "
                         f"{origin}{' (test patients)' if held == 'nothing' else ''} | {r[f'{origin} normals']:.0f} | "
                         f"{r[f'{origin} specificity']:.3f} | {r[f'{origin} other findings called COVID-19']:.3f} | {sens} |")
    table.append(f"\nBundled backbone and COVID-19 head. A film is called COVID-19 when the COVID-19 head reaches its "
                 f"threshold and the within-origin abnormality head is not below the v quantile of the validation "
                 f"COVID-19 films' scores; the COVID-19 threshold then keeps {SENSITIVITY:.2f} sensitivity on the "
                 "validation COVID-19 films (matched sensitivity; the test split chooses nothing). Gate off. "
                 "COVID-19 is the positive class.")
    save("abnormal-veto", {"title": "A within-origin abnormality head as a veto on COVID-19 calls, one origin left out at a time",
                           "rows": rows, "table": table, "command": "python bench/abnormal_veto.py"})
    print("\n".join(table))


if __name__ == "__main__":
    main()
