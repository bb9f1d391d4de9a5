"""Every origin of the shared data, as one pooled manifest, and a model scored on each origin.

The shared data holds films from seven origins. Two give COVID-19 films only (``covid-cxnet``,
``ieee8023``), one gives COVID-19 and normal films that are not from the same hospitals
(``radiography-db``: its normals are RSNA/NIH, its COVID-19 films a compilation), and three give
normal films *and* another disease from the same hospital (``jsrt``: nodules; ``shenzhen`` and
``montgomery``: tuberculosis). `pooled_rows` writes them into one manifest:

* ``label`` is ``covid``, ``normal`` or ``other`` (another finding: trained as *not COVID-19*);
* ``finding`` keeps what the film shows (``covid``, ``normal``, ``tuberculosis``, ``nodule``);
* covid-cxr keeps its committed split; JSRT and tb-cxr are split by patient, 70/15/15, within each
  origin x finding (seed 0), so every origin and finding is in train, validation and test.

`score_origins` scores a model on every film of the named origins, at its own threshold and
threshold-free: specificity of an origin's normals at the threshold that gives 0.90 sensitivity on
COVID-19 films, the share of other-finding films called COVID-19, and the expected calibration error.

    python bench/origins.py --out runs/pooled.csv                     # the pooled manifest (all origins)
    python bench/origins.py --score src/covidxray/bundled             # the bundled model on every origin
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from pathlib import Path

import numpy as np

from common import ROOT, save
from covidxray.data import load_samples
from covidxray.calibration import expected_calibration_error
from covidxray.metrics import bootstrap_metrics, format_ci
from covidxray.utils import atomic_write_text

SHARED = Path(os.environ.get("COVIDXRAY_DATA", ROOT.parent / "shared" / "datasets" / "covid-cxr")).parent
NORMAL_ORIGINS = ("jsrt", "shenzhen", "montgomery")  # normal films from hospitals that also give another disease
COVID_ORIGINS = ("covid-cxnet", "ieee8023")  # COVID-19 films only
ORIGINS = NORMAL_ORIGINS + COVID_ORIGINS
HEADER = ["path", "label", "source", "patient_id", "split", "phash", "finding"]
SENSITIVITY_ANCHOR = 0.90  # threshold-free specificity: at the threshold that gives this sensitivity


def _by_patient(rows: list[dict], seed: int = 0) -> dict[str, str]:
    """patient_id -> split, 70/15/15 of the patients of each (source, finding) group."""
    out: dict[str, str] = {}
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        groups.setdefault((r["source"], r["label"]), []).append(r["patient_id"])
    for key in sorted(groups):
        patients = sorted(set(groups[key]))
        order = np.random.default_rng(seed).permutation(len(patients))
        cut = (round(0.7 * len(patients)), round(0.85 * len(patients)))
        for k, j in enumerate(order):
            out[patients[j]] = "train" if k < cut[0] else "val" if k < cut[1] else "test"
    return out


def pooled_rows(exclude: set[str] = frozenset(), other: bool = True) -> list[list[str]]:
    """Manifest rows (`HEADER`) of every shared origin but ``exclude``; ``other``: keep the other-finding films."""
    # ieee8023's six normal films are no origin of normals to learn or measure (and would dominate a per-source balance).
    rows = [[str(s.path), s.label_name, s.source, s.patient_id, s.split, s.phash, s.label_name]
            for s in load_samples(SHARED / "covid-cxr" / "manifest.csv", ROOT / "splits" / "covid-cxr.csv")
            if not (s.source == "ieee8023" and s.label == 0)]
    for name in ("jsrt", "tb-cxr"):
        extra = list(csv.DictReader(open(SHARED / name / "manifest.csv")))
        split = _by_patient(extra)
        for r in extra:
            finding = r["label"]
            label = finding if finding == "normal" else "other"
            rows.append([str(SHARED / name / r["path"]), label, r["source"], r["patient_id"], split[r["patient_id"]],
                         r["phash"], finding])
    return [r for r in rows if r[2] not in exclude and (other or r[1] != "other")]


def write_manifest(rows: list[list[str]], out: Path) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    w.writerows(rows)
    atomic_write_text(out, buf.getvalue())
    return out


def _anchor(scores: np.ndarray, positive: bool, rate: float = SENSITIVITY_ANCHOR) -> float:
    """The threshold at which ``rate`` of COVID-19 ``scores`` are called positive (or of normal ones negative)."""
    return float(np.quantile(scores, 1 - rate if positive else rate))


def origin_films(preprocess, origins: tuple[str, ...], split: str | None = None, cache_dir=None, purpose: str = "score"):
    """The films of ``origins`` (every one, or of ``split`` only) prepared for a model: ``(samples, images, findings)``,
    the readable samples, their prepared images and each one's finding (``normal``, ``covid``, ``tuberculosis``, ...)."""
    from covidxray.cache import readable_images  # torch, only when scoring

    rows = [r for r in pooled_rows() if r[2] in origins and split in (None, r[4])]
    samples = load_samples(write_manifest(rows, ROOT / "runs" / "origins" / f"{purpose}-{'-'.join(origins)}-{split or 'all'}.csv"))
    finding = {r[0]: r[6] for r in rows}
    kept, images, _ = readable_images(samples, preprocess, cache_dir, desc="decoding " + ",".join(origins))
    return kept, images, [finding[str(s.path)] for s in kept]


def score_origins(predictor, origins: tuple[str, ...], internal: dict[str, np.ndarray], split: str | None = None,
                  cache_dir: str | None = None) -> dict:
    """Per origin: the films' scores turned into the numbers of the every-origin table.

    Args:
        predictor: a `covidxray.predictor.Predictor` (its model, preprocessing, temperature and threshold).
        origins: the shared origins to score (every film of each, or of ``split`` only).
        internal: ``{"covid": P, "normal": P}`` of the run's internal test films, the anchors for the
            threshold-free numbers (the threshold giving 0.90 sensitivity, or 0.90 specificity).
    """
    from covidxray.inference import predict_probs  # torch, only when scoring

    kept, images, findings = origin_films(predictor.preprocess, origins, split, cache_dir, "score")
    p = predict_probs(predictor.model, images, predictor.preprocess, temperature=predictor.temperature)
    thr, at_sens, at_spec = predictor.threshold, _anchor(internal["covid"], True), _anchor(internal["normal"], False)
    out = {}
    for origin in origins:
        for finding in ("normal", "covid", "tuberculosis", "nodule"):
            idx = [i for i, (s, f) in enumerate(zip(kept, findings)) if s.source == origin and f == finding]
            if not idx:
                continue
            q = p[idx]
            y = np.full(len(q), int(finding == "covid"))
            boot = bootstrap_metrics(y, q, thr, n_boot=2000)
            metric = {"normal": "specificity", "covid": "sensitivity"}.get(finding)
            called = {"value": float((q >= thr).mean()), "ci_low": 1 - boot["specificity"]["ci_high"],
                      "ci_high": 1 - boot["specificity"]["ci_low"]} if metric is None else None
            out[f"{origin}/{finding}"] = {
                "origin": origin, "finding": finding, "n": len(q), "metric": metric or "called COVID-19",
                "at_threshold": boot[metric] if metric else called,
                "threshold_free": float(((q < at_sens) if finding == "normal" else (q >= (at_spec if finding == "covid" else at_sens))).mean()),
                "ece": float(expected_calibration_error(y, q)), "mean_p": float(q.mean()),
            }
    return out


def internal_anchors(predictor, cache_dir: str | None = None) -> dict[str, np.ndarray]:
    """P(COVID-19) of the covid-cxr internal test films, by class (the threshold-free anchors)."""
    from covidxray.cache import readable_images
    from covidxray.inference import predict_probs

    test = [s for s in load_samples(SHARED / "covid-cxr" / "manifest.csv", ROOT / "splits" / "covid-cxr.csv") if s.split == "test"]
    kept, images, _ = readable_images(test, predictor.preprocess, cache_dir, desc="decoding internal test")
    p = predict_probs(predictor.model, images, predictor.preprocess, temperature=predictor.temperature)
    y = np.array([s.label for s in kept])
    return {"covid": p[y == 1], "normal": p[y == 0], "y": y, "p": p}


def table_rows(results: dict) -> list[str]:
    """Markdown rows: origin, finding, films, the metric at the threshold (95 % CI), threshold-free, ECE."""
    rows = ["| origin | films | metric | at the model's threshold (95% CI) | threshold-free | ECE |", "|---|---:|---|---|---:|---:|"]
    for r in results.values():
        free = ("specificity at 0.90 internal sensitivity" if r["finding"] == "normal" else
                "sensitivity at 0.90 internal specificity" if r["finding"] == "covid" else "called at 0.90 internal sensitivity")
        rows.append(f"| {r['origin']} | {r['n']} {r['finding']} | {r['metric']} | {format_ci(r['at_threshold'])} | "
                    f"{r['threshold_free']:.3f} ({free}) | {r['ece']:.3f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the pooled manifest of every origin here")
    ap.add_argument("--exclude", default="", help="comma-separated origins to leave out of --out")
    ap.add_argument("--no-other", action="store_true", help="leave the other-finding films (tuberculosis, nodules) out of --out")
    ap.add_argument("--score", help="a model folder (run or bundled) to score on every origin")
    ap.add_argument("--name", default="bundled", help="result name with --score (bench/results/origins-NAME.json)")
    ap.add_argument("--split", choices=("train", "val", "test"),
                    help="with --score: only this split's films of each origin (the test patients, for a model trained "
                         "on the pooled origins); default every film")
    args = ap.parse_args()
    if args.out:
        rows = pooled_rows(set(filter(None, args.exclude.split(","))), other=not args.no_other)
        print(f"{write_manifest(rows, Path(args.out))}: {len(rows)} films")
    if args.score:
        from covidxray.predictor import Predictor

        predictor = Predictor(args.score, backend="torch")
        internal = internal_anchors(predictor)
        results = score_origins(predictor, ORIGINS, internal, split=args.split)
        table = table_rows(results)
        seen = (f"the {args.split} patients of every origin" if args.split else
                "every film of every origin: a model trained on covid-cxr alone has seen covid-cxnet and ieee8023, never "
                "JSRT, Shenzhen or Montgomery")
        save(f"origins-{args.name}", {"title": f"Every origin: {args.name}, scored on {seen}",
                                      "table": table, "results": results, "threshold": predictor.threshold,
                                      "command": f"python bench/origins.py --score {args.score} --name {args.name}"
                                                 + (f" --split {args.split}" if args.split else "")})
        print("\n".join(table))


if __name__ == "__main__":
    main()
