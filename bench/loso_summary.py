"""Every leave-one-origin-out run with JSRT, Shenzhen and Montgomery held out, in one table, worst origin first.

    .venv/bin/python bench/loso_summary.py

Reads the ``bench/results/loso-*.json`` that `bench/loso.py` wrote for that group (a run merged into an ``-all``
result is shown once, as the merge) and writes bench/results/loso-summary.json (and docs/benchmarks.md): per recipe,
the seeds, the held-out normals' specificity and the tuberculosis called COVID-19 at each run's threshold, and the
internal test ROC-AUC. Issue 19's targets: specificity ≥ 0.90 on every held-out origin, internal ROC-AUC ≥ 0.98.
Nothing is trained or scored here: it only gathers what the runs measured.
"""

from __future__ import annotations

import json
import re

import numpy as np

from common import RESULTS, save

NORMALS = ("jsrt/normal", "shenzhen/normal", "montgomery/normal")


def runs() -> dict[str, dict]:
    """Result name -> its payload, for the runs that held out all three normal origins (merged ones once)."""
    found = {}
    for path in sorted(RESULTS.glob("loso-*.json")):
        payload = json.loads(path.read_text())
        cells = payload.get("summary", {}).get("cells", {})
        if path.stem != "loso-summary" and all(c in cells for c in NORMALS):
            found[path.stem.removeprefix("loso-")] = payload
    merged = {name for p in found.values() for names in re.findall(r"--merge (\S+)", p["command"]) for name in names.split(",")}
    return {name: p for name, p in found.items() if name not in merged}


def seeds(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def main() -> None:
    rows = []
    for name, payload in runs().items():
        cells = payload["summary"]["cells"]
        spec = np.array([cells[c]["at_threshold"] for c in NORMALS])  # (origin, seed)
        auc = payload["summary"]["internal_test_auc"]
        options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in payload.get("overrides", {}).items())
        if "--pooled" in payload["command"]:
            options = "every other shared origin in training, one origin held out at a time; " + options
        rows.append((float(spec.min(0).mean()), name, options, spec, cells["shenzhen/tuberculosis"]["at_threshold"], auc))
    rows.sort(key=lambda r: -r[0])
    table = ["| run | training options | seeds | worst normal origin, mean | JSRT | Shenzhen | Montgomery normals | Shenzhen "
             "tuberculosis called COVID-19 | internal ROC-AUC, mean (range over runs) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for worst, name, options, spec, tb, auc in rows:
        table.append(f"| {name} | {options} | {spec.shape[1]} | {worst:.3f} | {seeds(spec[0])} | {seeds(spec[1])} | "
                     f"{seeds(spec[2])} | {seeds(tb)} | {np.mean(auc):.3f} ({min(auc):.3f}–{max(auc):.3f}) |")
    note = ("Specificity of each held-out origin's normals at each run's own threshold (chosen on validation), one value "
            "per seed; an ensemble is one row of one value. Targets: ≥ 0.90 on every origin, internal ROC-AUC ≥ 0.98, "
            "tuberculosis called COVID-19 ≤ 0.20. COVID-19 is the positive class. Each run's command is in its own "
            "result file (bench/results/loso-RUN.json) and section below.")
    save("loso-summary", {"title": "Leave one origin out, every recipe at a glance (JSRT, Shenzhen, Montgomery held out)",
                          "table": table + ["", note], "command": "python bench/loso_summary.py"})
    print("\n".join(table), "\n", note, sep="")


if __name__ == "__main__":
    main()
