"""Tests for covidxray.metrics and covidxray.report: values checked against hand counts."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
from PIL import Image

from covidxray.errors import DataError
from covidxray.metrics import (
    DEFAULT_THRESHOLDS,
    METRICS,
    _resample_metrics,
    bootstrap_metrics,
    choose_threshold,
    operating_points,
    point_metrics,
)
from covidxray.report import write_report

# At threshold 0.5: COVID-19 cases 0.9, 0.8, 0.7 are TP and 0.3, 0.2 FN;
# normal case 0.6 is a FP and 0.4, 0.1, 0.05, 0.15 are TN.
Y_HAND = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
P_HAND = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.6, 0.4, 0.1, 0.05, 0.15])


def _synthetic(n: int, seed: int = 0, separation: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels and rounded (hence tied) scores from two overlapping Gaussians."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.round(1 / (1 + np.exp(-(separation * (y - 0.5) + rng.normal(size=n)))), 2)


def test_point_metrics_match_hand_counted_confusion_matrix():
    m = point_metrics(Y_HAND, P_HAND, 0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 1, 4, 2)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(3 / 5)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["ppv"] == pytest.approx(3 / 4)
    assert m["npv"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    assert set(METRICS) <= set(m)


def test_threshold_is_inclusive():
    # prob == threshold counts as COVID-19: the 0.6 normal case stays a FP at threshold 0.6.
    assert point_metrics(Y_HAND, P_HAND, 0.6)["fp"] == 1
    assert point_metrics(Y_HAND, P_HAND, 0.6000001)["fp"] == 0


def test_aucs_match_hand_counted_pairs():
    y = [0, 0, 1, 1, 0, 1]
    p = [0.1, 0.4, 0.35, 0.8, 0.5, 0.5]
    # COVID-19 0.35 beats 0.1 (1); 0.8 beats all three (3); 0.5 beats 0.1, 0.4 and ties 0.5 (2.5).
    assert point_metrics(y, p, 0.5)["roc_auc"] == pytest.approx(6.5 / 9)
    # Ranked 0.9 (COVID-19), 0.8 (normal), 0.7 (COVID-19): recall steps of 1/2 at precision 1 and 2/3.
    assert point_metrics([1, 0, 1], [0.9, 0.8, 0.7], 0.5)["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_undefined_metrics_are_nan_not_zero():
    m = point_metrics([0, 0, 0], [0.2, 0.7, 0.1], 0.5)  # no COVID-19 case
    assert np.isnan(m["sensitivity"]) and np.isnan(m["roc_auc"]) and np.isnan(m["pr_auc"])
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["ppv"] == 0.0  # one flag, and it is wrong: defined and zero


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="0 \\(normal\\) and 1"):
        point_metrics([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="equally long"):
        point_metrics([0, 1], [0.1], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        point_metrics([0, 1], [0.1, np.nan], 0.5)


def test_vectorised_resamples_equal_sklearn_on_materialised_resamples():
    y, p = _synthetic(60, seed=3)
    rng = np.random.default_rng(0)
    weights = np.stack([np.bincount(rng.integers(0, 60, 60), minlength=60) for _ in range(40)])
    weights[0] = np.where(y == 1, 0, 2)  # resamples with one class: undefined metrics
    weights[1] = np.where(y == 0, 0, 2)
    fast = _resample_metrics(y, p, 0.5, weights.astype(float))
    for row, w in enumerate(weights):
        slow = point_metrics(np.repeat(y, w), np.repeat(p, w), 0.5)
        for name in METRICS:
            assert fast[name][row] == pytest.approx(slow[name], abs=1e-12, nan_ok=True), (name, row)


def test_bootstrap_ci_brackets_point_value_and_is_fast():
    y, p = _synthetic(1000)
    start = time.perf_counter()
    b = bootstrap_metrics(y, p, 0.5, n_boot=1000)
    assert time.perf_counter() - start < 3.0
    point = point_metrics(y, p, 0.5)
    for name in METRICS:
        assert b[name]["value"] == point[name]
        assert b[name]["ci_low"] <= b[name]["value"] <= b[name]["ci_high"], name
        assert b[name]["ci_high"] - b[name]["ci_low"] > 0, name
    assert {k: b[k] for k in ("tp", "fp", "tn", "fn")} == {k: point[k] for k in ("tp", "fp", "tn", "fn")}
    assert (b["n"], b["n_pos"]) == (1000, int(y.sum()))


def test_bootstrap_ci_narrows_with_more_data():
    def width(n: int, name: str) -> float:
        b = bootstrap_metrics(*_synthetic(n, seed=1), 0.5, n_boot=300)
        return b[name]["ci_high"] - b[name]["ci_low"]

    for name in ("sensitivity", "specificity", "roc_auc"):
        assert width(2000, name) < 0.5 * width(100, name), name


def test_bootstrap_is_deterministic_for_a_seed():
    y, p = _synthetic(200)
    assert bootstrap_metrics(y, p, 0.5, n_boot=200, seed=7) == bootstrap_metrics(y, p, 0.5, n_boot=200, seed=7)
    assert bootstrap_metrics(y, p, 0.5, n_boot=200, seed=7) != bootstrap_metrics(y, p, 0.5, n_boot=200, seed=8)


def test_bootstrap_alpha_sets_the_coverage():
    y, p = _synthetic(300)
    ci95, ci50 = (bootstrap_metrics(y, p, 0.5, n_boot=400, alpha=a)["roc_auc"] for a in (0.05, 0.5))
    assert ci95["ci_low"] < ci50["ci_low"] < ci50["ci_high"] < ci95["ci_high"]


def test_youden_threshold_separates_a_separable_set():
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    p = np.array([0.05, 0.2, 0.3, 0.35, 0.55, 0.7, 0.9])
    t = choose_threshold(y, p)
    assert 0.35 < t <= 0.55
    m = point_metrics(y, p, t)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_target_sensitivity_gives_highest_threshold_reaching_it(target):
    y, p = _synthetic(400, seed=2)
    t = choose_threshold(y, p, target_sensitivity=target)
    assert point_metrics(y, p, t)["sensitivity"] >= target
    # Predictions only change at observed scores, so the next higher score is the next candidate.
    higher = p[p > t]
    assert higher.size and point_metrics(y, p, higher.min())["sensitivity"] < target


def test_target_sensitivity_on_a_hand_counted_set():
    # COVID-19 at 0.9, 0.8, 0.7, 0.6, 0.3; normal at 0.5, 0.4, 0.2. Sensitivity reaches 2/5 at 0.8,
    # on a straight stretch of the ROC curve that roc_curve's default drop_intermediate would skip.
    y = [1, 1, 1, 1, 1, 0, 0, 0]
    p = [0.9, 0.8, 0.7, 0.6, 0.3, 0.5, 0.4, 0.2]
    assert choose_threshold(y, p, target_sensitivity=0.4) == 0.8
    assert choose_threshold(y, p, target_sensitivity=1.0) == 0.3
    assert choose_threshold(y, p) == 0.6  # Youden: sensitivity 4/5 + specificity 1 - 1


def test_choose_threshold_is_finite_and_refuses_one_class():
    # A model that ranks backwards: Youden's J peaks at "flag nothing" (roc_curve's +inf).
    assert choose_threshold([0, 1], [0.9, 0.1]) == 1.0
    with pytest.raises(DataError, match="one class"):
        choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match="target_sensitivity"):
        choose_threshold(Y_HAND, P_HAND, target_sensitivity=1.5)


def test_operating_points_match_point_metrics():
    points = operating_points(Y_HAND, P_HAND)
    assert [o["threshold"] for o in points] == list(DEFAULT_THRESHOLDS)
    at_05 = points[DEFAULT_THRESHOLDS.index(0.5)]
    assert at_05 == {"threshold": 0.5, "sensitivity": 3 / 5, "specificity": 4 / 5, "ppv": 3 / 4, "npv": 4 / 6}
    assert all(a["sensitivity"] >= b["sensitivity"] for a, b in zip(points, points[1:]))


def _no_nan(token: str):
    raise AssertionError(f"report.json holds the non-JSON constant {token}")


def test_write_report_files(tmp_path):
    y_a, p_a = _synthetic(120, seed=4)
    y = np.r_[y_a, np.zeros(30, dtype=int)]  # source "normals-only" has no COVID-19 case
    p = np.r_[p_a, np.linspace(0.05, 0.6, 30)]
    sources = ["mixed"] * 120 + ["normals-only"] * 30
    paths = [f"img/{i:03d}.png" for i in range(150)]
    out = tmp_path / "report"
    meta = {"threshold_source": "Youden's J on the validation split", "model": "resnet18"}
    returned = write_report(out, y, p, 0.42, sources=sources, paths=paths, meta=meta, n_boot=200, title="Test run")

    names = {"report.json", "report.md", "confusion_matrix.png", "roc.png", "pr.png", "reliability.png", "predictions.csv"}
    assert {f.name for f in out.iterdir()} == names  # and no temporary files left behind
    report = json.loads((out / "report.json").read_text(), parse_constant=_no_nan)
    assert report == returned
    assert report["positive_class"] == "covid (COVID-19)"
    assert (report["threshold"], report["n"], report["meta"]) == (0.42, 150, meta)
    assert report["metrics"]["sensitivity"]["value"] == pytest.approx(point_metrics(y, p, 0.42)["sensitivity"])
    assert report["confusion"]["tp"] + report["confusion"]["fn"] == int(y.sum())
    assert len(report["operating_points"]) == len(DEFAULT_THRESHOLDS)

    normals = report["per_source"]["normals-only"]
    assert (normals["n"], normals["n_covid"], normals["n_normal"]) == (30, 0, 30)
    assert normals["metrics"]["roc_auc"] == {"value": None, "ci_low": None, "ci_high": None}
    assert normals["metrics"]["sensitivity"]["value"] is None
    assert normals["metrics"]["specificity"]["value"] == pytest.approx(np.mean(p[120:] < 0.42))
    assert isinstance(report["per_source"]["mixed"]["metrics"]["roc_auc"]["ci_low"], float)

    for name in ("confusion_matrix.png", "roc.png", "pr.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) > 100, name
            im.verify()

    md = (out / "report.md").read_text()
    assert md.startswith("# Test run")
    assert "Positive class: COVID-19 (`covid`). Threshold 0.420 (Youden's J on the validation split)." in md
    for needle in ("| ROC AUC |", "| normals-only | 30 | 0 | 30 |", "(roc.png)", "(pr.png)", "(confusion_matrix.png)"):
        assert needle in md, needle

    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 150 and rows[0]["path"] == "img/000.png" and rows[-1]["source"] == "normals-only"
    assert all(int(r["pred"]) == (float(r["probability"]) >= 0.42) for r in rows[120:])
    assert [int(r["label"]) for r in rows] == y.tolist()


def test_write_report_without_sources_or_paths(tmp_path):
    report = write_report(tmp_path, Y_HAND, P_HAND, 0.5, n_boot=50)
    assert "per_source" not in report and report["meta"] is None
    assert report["confusion"] == {"tp": 3, "fp": 1, "tn": 4, "fn": 2}
    assert not (tmp_path / "predictions.csv").exists()
    md = (tmp_path / "report.md").read_text()
    assert "Positive class: COVID-19 (`covid`). Threshold 0.500 chosen on the validation set." in md
    assert "## Per source" not in md
