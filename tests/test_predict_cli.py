"""Prediction and evaluation through the Python API and the CLI, on real X-rays and broken files."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covidxray.cache import prepare_images
from covidxray.cli import main
from covidxray.data import load_samples
from covidxray.imaging import load_image
from covidxray.predictor import Predictor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def test_images(manifest: Path, split_file: Path) -> list:
    test = [s for s in load_samples(manifest, split_file) if s.split == "test"]
    return [s for s in test if s.label == 1][:3] + [s for s in test if s.label == 0][:3]


def test_train_serve_parity(trained_run: Path, test_images: list, tmp_path: Path):
    """The training cache, a file path, raw bytes and a decoded array all give the same input and answer."""
    pred = Predictor(trained_run)
    cached, failed = prepare_images(test_images, pred.preprocess, cache_dir=str(tmp_path))
    assert failed == []
    cached_again, _ = prepare_images(test_images, pred.preprocess, cache_dir=str(tmp_path))  # from the disk cache
    assert torch.equal(cached, cached_again)
    for i, s in enumerate(test_images):
        fresh = pred.preprocess.prepare(load_image(s.path))
        assert np.array_equal(fresh, cached[i].numpy())
    p_cache = pred.predict_prepared(cached)
    p_path = [pred.predict_path(s.path).probability for s in test_images]
    p_bytes = [pred.predict_bytes(s.path.read_bytes(), s.key).probability for s in test_images]
    p_batch = [r.probability for r in pred.predict_paths([s.path for s in test_images], batch_size=4)]
    np.testing.assert_allclose(p_path, p_cache, atol=1e-5)
    np.testing.assert_allclose(p_bytes, p_cache, atol=1e-5)
    np.testing.assert_allclose(p_batch, p_cache, atol=1e-5)


def test_prediction_fields(trained_run: Path, test_images: list):
    pred = Predictor(trained_run)
    r = pred.predict_path(test_images[0].path)
    assert r.label == ("covid" if r.probability >= r.threshold else "normal")
    assert 0.0 <= r.probability <= 1.0 and r.threshold == pred.threshold


def test_predict_cli_table_json_csv_and_bad_file(trained_run: Path, test_images: list, tmp_path: Path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an x-ray")
    paths = [str(s.path) for s in test_images[:2]] + [str(bad)] + [str(test_images[-1].path)]

    assert main(["predict", *paths, "--model", str(trained_run), "--format", "json"]) == 2
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in rows] == paths
    assert "error" in rows[2] and "notes.png" in err and "not a recognised image format" in rows[2]["error"]
    for r in rows[:2] + rows[3:]:
        assert r["label"] in ("covid", "normal") and 0 <= r["probability"] <= 1 and r["threshold"] > 0

    out_csv = tmp_path / "preds.csv"
    assert main(["predict", *paths[:2], "--model", str(trained_run), "--out", str(out_csv)]) == 0
    with open(out_csv) as f:
        got = list(csv.DictReader(f))
    assert [g["path"] for g in got] == paths[:2]
    assert [g["label"] for g in got] == [r["label"] for r in rows[:2]]

    assert main(["predict", str(test_images[0].path), "--model", str(trained_run)]) == 0
    out, _ = capsys.readouterr()
    assert "P(covid)=" in out and str(test_images[0].path) in out


def test_predict_cli_folder_and_glob(trained_run: Path, test_images: list, tmp_path: Path, capsys):
    for i, s in enumerate(test_images[:3]):
        (tmp_path / f"img{i}.jpg").symlink_to(s.path)
    assert main(["predict", str(tmp_path), "--model", str(trained_run), "--format", "json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert main(["predict", str(tmp_path / "img[01].jpg"), "--model", str(trained_run), "--format", "json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_predict_missing_model_is_exit_2(tmp_path: Path, test_images: list, capsys):
    assert main(["predict", str(test_images[0].path), "--model", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_evaluate_writes_report_with_cis(val_evaluation: Path, manifest: Path, split_file: Path):
    """`covidxray evaluate --split val` of the trained run (shared with test_calibration, see `val_evaluation`)."""
    out = val_evaluation
    report = json.loads((out / "report.json").read_text())
    assert "COVID-19" in report["positive_class"]
    n_val = sum(s.split == "val" for s in load_samples(manifest, split_file))
    gate = report["input_gate"]  # the run validated on 400; the report covers the whole split, less what the gate refused
    assert report["n"] == gate["answered"] and gate["answered"] + gate["not_answered"] == n_val
    assert gate["not_answered"] <= 0.01 * n_val and "## Input gate" in (out / "report.md").read_text()
    for name in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc", "pr_auc"):
        m = report["metrics"][name]
        assert m["ci_low"] <= m["value"] <= m["ci_high"], name
    assert set(report["per_source"]) == {"radiography-db", "ieee8023", "covid-cxnet"}
    for png in ("confusion_matrix.png", "roc.png", "pr.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "COVID-19" in (out / "report.md").read_text()


def test_console_script_help_lists_commands():
    exe = Path(sys.executable).with_name("covidxray")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("data", "train", "evaluate", "predict", "demo"):
        assert cmd in out


def test_card_states_positive_class_metrics_and_limits(test_evaluation: Path, tmp_path: Path):
    """The card of the trained run after `covidxray evaluate --split test` (see `test_evaluation`)."""
    assert main(["card", str(test_evaluation), "--out", str(tmp_path / "CARD.md")]) == 0
    card = (tmp_path / "CARD.md").read_text()
    meta = json.loads((test_evaluation / "model.json").read_text())
    report = json.loads((test_evaluation / "eval-test" / "report.json").read_text())
    assert "Not a medical device" in card and "COVID-19 (`covid`) is the positive class" in card
    assert f"{meta['threshold']:.4f}" in card
    assert f"{report['metrics']['roc_auc']['value']:.4f}" in card  # the test-split AUC with its CI
    assert "radiography-db" in card and "Source confounding" in card


def test_demo_classifies_held_out_images(trained_run: Path, data_root: Path, split_file: Path, tmp_path: Path,
                                         monkeypatch, capsys):
    monkeypatch.setenv("COVIDXRAY_DATA", str(data_root))
    monkeypatch.chdir(tmp_path)  # no ../shared here: the data comes from $COVIDXRAY_DATA
    assert main(["demo", "--model", str(trained_run), "-n", "4"]) == 0
    out = capsys.readouterr().out
    shown = [line.split()[0] for line in out.splitlines() if " truth " in line]
    test_split = {s.key for s in load_samples(data_root / "manifest.csv", split_file) if s.split == "test"}
    assert len(shown) == 4 and set(shown) <= test_split
    assert "correct on held-out test images" in out and "warning" not in out


def test_demo_warns_when_the_training_split_is_not_at_hand(manifest: Path, tmp_path: Path, monkeypatch, capsys):
    # Another manifest (absolute paths): its fingerprint is not the bundled model's, so nothing is known to be
    # held out. Its one "normal" film is noise, which the input gate refuses: shown as no answer.
    with open(manifest, newline="") as f:
        covid = [r for r in csv.DictReader(f) if r["label"] == "covid"][:2]
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray((np.random.default_rng(0).random((256, 256)) * 255).astype(np.uint8)).save(data / "noise.png")
    with open(data / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label", "source"])
        w.writeheader()
        w.writerows({"path": str(manifest.parent / r["path"]), "label": "covid", "source": r["source"]} for r in covid)
        w.writerow({"path": "noise.png", "label": "normal", "source": "noise"})
    monkeypatch.setenv("COVIDXRAY_DATA", str(data))
    monkeypatch.delenv("COVIDXRAY_MODEL", raising=False)
    assert main(["demo", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "may include training images" in out and "correct on these images" in out and "held-out" not in out
    assert out.count(" truth ") == 2 and "noise.png" in out and "-> no answer (" in out


def test_demo_without_data_says_how_to_point_it_there(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.delenv("COVIDXRAY_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # the default is ../shared/datasets/covid-cxr from the current folder: not here
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path.parent.resolve() / "shared" / "datasets" / "covid-cxr" / "manifest.csv") in err
    assert "COVIDXRAY_DATA" in err and "covidxray predict" in err
