"""Refitting the classifier's last layer (`covidxray.head`, `covidxray refit-head`)."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from covidxray.card import build_card
from covidxray.checkpoint import copy_model, load_model, model_files
from covidxray.cli import main
from covidxray.data import load_samples
from covidxray.errors import DataError
from covidxray.evaluate import predict_split
from covidxray.head import C_GRID, LinearHead, fit_head, set_head
from covidxray.headfit import HeadFeatures
from covidxray.models import forward_with_features
from covidxray.predictor import Predictor


def _features(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two informative features among noise, a label that needs both, and a feature that is always 0 (as some are)."""
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 12))
    x[:, 0] = x[:, 0] + 1.5 * y
    x[:, 1] = x[:, 1] + 1.5 * y
    x[:, 2] = 0.0
    return x, y


def test_fit_head_is_a_logistic_regression_on_the_features_chosen_on_validation():
    rng = np.random.default_rng(0)
    (x, y), (vx, vy) = _features(rng, 400), _features(rng, 300)
    refit = fit_head(x, y, vx, vy)
    assert set(refit.candidates) == set(C_GRID) and refit.c in C_GRID
    for c, head in refit.candidates.items():  # the folded centring gives sklearn's own logistic regression
        pipe = LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(x, y)
        np.testing.assert_allclose(head.margin(vx), pipe.decision_function(vx), rtol=1e-4, atol=1e-4)
        assert refit.val_auc[c] == pytest.approx(roc_auc_score(vy, pipe.decision_function(vx)), abs=1e-6)
    assert refit.val_auc[refit.c] == pytest.approx(max(refit.val_auc.values()), abs=1e-4)
    assert refit.val_auc[refit.c] > 0.88  # both features found (one alone gives about 0.86, both 0.93)
    assert refit.head.weight[2] == 0.0  # a feature that never varied gets no weight
    with pytest.raises(DataError, match="validation split; it has one class"):
        fit_head(x, y, vx, np.zeros_like(vy))


def test_set_head_writes_a_margin_the_network_then_gives(trained_run: Path):
    model, meta = load_model(trained_run)
    model.eval()
    x = torch.randn(3, 1, 96, 96)
    with torch.no_grad():
        _, feats = forward_with_features(model, x, meta["arch"])
    head = LinearHead(np.random.default_rng(1).normal(size=feats.shape[1]), 0.25)
    set_head(model, meta["arch"], head)
    with torch.no_grad():
        logits, again = forward_with_features(model, x, meta["arch"])
    torch.testing.assert_close(again, feats)  # the backbone is untouched
    np.testing.assert_allclose((logits[:, 1] - logits[:, 0]).numpy(), head.margin(feats.numpy()), rtol=1e-4, atol=1e-4)
    assert torch.allclose(logits.sum(1), torch.zeros(3), atol=1e-5)  # symmetric logits: only their difference counts
    with pytest.raises(DataError, match="head"):
        set_head(model, meta["arch"], LinearHead(np.zeros(7), 0.0))


@pytest.fixture()
def small_data(manifest: Path, split_file: Path, tmp_path: Path) -> Path:
    """200 training and 150 validation films of the shared data, both classes, as a manifest with a split column."""
    samples = load_samples(manifest, split_file)
    rng = np.random.default_rng(0)
    chosen = [s for split, n in (("train", 100), ("val", 75)) for label in (0, 1)
              for s in rng.permutation([s for s in samples if s.split == split and s.label == label])[:n]]
    out = tmp_path / "small.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "source", "split"])
        w.writerows([str(s.path), s.label_name, s.source, s.split] for s in chosen)
    return out


def test_refit_head_command_rewrites_the_head_and_its_calibration(trained_run: Path, small_data: Path, cache_dir: Path,
                                                                 tmp_path: Path, capsys):
    run = copy_model(trained_run, tmp_path / "run")
    before = json.loads((run / "model.json").read_text())
    assert main(["refit-head", str(run), "--data", str(small_data), "--cache-dir", str(cache_dir)]) == 0
    assert "(chosen)" in capsys.readouterr().out
    meta = json.loads((run / "model.json").read_text())
    assert meta["weights_sha256"] == hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest() != before["weights_sha256"]
    assert {p.name for p in run.iterdir()} == {f.name for f in model_files(run)}  # written atomically, nothing left over
    refit = meta["head_refit"]
    assert refit["train_images"] == 200 and refit["c"] in C_GRID and meta["val_auc"] == before["val_auc"]
    # What is stored is what the rewritten model does: its validation ROC-AUC, and a threshold it gives a validation film.
    predictor = Predictor(run, backend="torch")
    val, logits, _, _ = predict_split(predictor, str(small_data), None, "val", str(cache_dir))
    assert roc_auc_score([s.label for s in val], logits[:, 1] - logits[:, 0]) == pytest.approx(refit["val_auc"], abs=1e-4)
    probs = torch.softmax(torch.from_numpy(logits) / meta["temperature"], dim=1)[:, 1].numpy()
    assert np.abs(probs - meta["threshold"]).min() < 1e-6
    assert meta["familiarity"] == before["familiarity"]  # the features, and so their statistics, are unchanged
    # The features it was fitted on are kept beside it (for a site's own head), and checked against model.json.
    kept = HeadFeatures.load(run, meta)
    assert (len(kept.train), len(kept.val)) == (200, len(val)) and refit["features_file"] in {p.name for p in model_files(run)}
    assert (kept.val_y == [s.label for s in val]).all()
    # The validation sensitivity a site's head keeps: the share at or above the threshold. The threshold is one film's
    # probability, which the network run again gives only to about 1e-6, so that film may fall on either side here.
    margin, cut = np.log(probs / (1 - probs))[kept.val_y == 1], np.log(meta["threshold"] / (1 - meta["threshold"]))
    assert (margin >= cut + 1e-4).mean() <= refit["val_sensitivity"] <= (margin >= cut - 1e-4).mean()
    assert (margin >= cut - 1e-4).mean() - (margin >= cut + 1e-4).mean() <= 1 / len(margin)  # one film at most
    model_part = next(payload for kind, payload in build_card(run) if kind == "ul" and "Architecture" in payload[0])
    assert "last layer was refitted (`covidxray refit-head`)" in model_part[0] and f"C = {refit['c']:g}" in model_part[0]
    assert "refitted" not in next(p for k, p in build_card(trained_run) if k == "ul" and "Architecture" in p[0])[0]
