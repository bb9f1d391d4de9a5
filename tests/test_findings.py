"""The finding task (`covidxray.findings`): which films it takes, its head and loss, and real training with it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from covidxray.config import config_for
from covidxray.data import Sample, read_manifest
from covidxray.engine import train
from covidxray.errors import DataError
from covidxray.findings import FindingTask, build_finding_task, finding_sources, finding_targets

SIZE = 64


def _sample(source: str, label: int, other: bool = False) -> Sample:
    return Sample(path=Path(f"/x/{source}.jpg"), label=label, source=source, other=other)


def test_only_films_of_sources_with_both_normals_and_another_finding_get_a_target():
    films = [_sample("rdb", 0), _sample("rdb", 1), _sample("cxnet", 1),  # the COVID-19 question's
             _sample("jsrt", 0), _sample("jsrt", 0, other=True),  # normals and nodules of one origin
             _sample("mont", 0, other=True),  # another finding with no normal of its origin: nothing to contrast
             _sample("shen", 0)]  # normals alone: the same
    assert finding_sources(films) == {"jsrt"}
    assert finding_targets(films).tolist() == [-1, -1, -1, 0, 1, -1, -1]
    assert finding_targets(films, {"jsrt", "shen"}).tolist() == [-1, -1, -1, 0, 1, -1, 0]


def test_a_manifest_keeps_other_apart_from_normal(tmp_path: Path):
    (tmp_path / "m.csv").write_text("path,label,source\na.jpg,normal,jsrt\nb.jpg,other,jsrt\nc.jpg,covid,x\n")
    films = read_manifest(tmp_path / "m.csv")
    assert [(s.label, s.other, s.label_name) for s in films] == [(0, False, "normal"), (0, True, "normal"), (1, False, "covid")]


def test_the_loss_counts_only_the_task_films_and_reaches_the_features():
    rng = torch.get_rng_state()
    task = FindingTask(width=4, weight=0.5, seed=0)
    assert torch.equal(torch.get_rng_state(), rng), "building the head drew from the global random stream"
    feats = torch.tensor([[1.0, 0, 0, 2], [0, 1, 0, 0], [3, 0, 1, 0], [0, 0, 0, 1]], requires_grad=True)
    targets = torch.tensor([1, 0, -1, 1])
    loss = task.loss(feats, targets)
    with torch.no_grad():
        logits = task.head(feats).squeeze(1)
        expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[[0, 1, 3]], torch.tensor([1.0, 0, 1]))
    assert float(loss.detach()) == pytest.approx(0.5 * float(expected), rel=1e-6)
    loss.backward()
    assert feats.grad[2].abs().sum() == 0 and feats.grad[[0, 1, 3]].abs().sum() > 0  # the COVID-19 film feels nothing
    stats = task.epoch_stats()
    assert stats["finding_loss"] == pytest.approx(float(expected), rel=1e-6)
    assert task.epoch_stats() == {"finding_loss": 0.0, "finding_acc": 0.0}  # the tallies start again
    task.zero_grad()
    none = task.loss(feats, torch.tensor([-1, -1, -1, -1]))
    none.backward()
    assert float(none.detach()) == 0.0 and torch.count_nonzero(task.head.weight.grad) == 0


def test_weight_zero_builds_nothing():
    from covidxray.models import build_model

    model = build_model("cxrnet", weights=None)
    assert build_finding_task(model, "cxrnet", torch.tensor([0, 1]), 0.0, 0, torch.device("cpu")) is None
    task = build_finding_task(model, "cxrnet", torch.tensor([0, 1]), 0.3, 0, torch.device("cpu"))
    assert task.head.in_features == model.get_submodule("classifier.3").in_features and task.weight == 0.3


@pytest.fixture(scope="module")
def pooled_manifest(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    """A small real manifest: covid-cxr films (train and val) and JSRT's normals and nodules (``other``) in both splits."""
    rows = []
    with open(data_root / "manifest.csv") as f:
        for i, r in enumerate(csv.DictReader(f)):
            if i % 60 == 0:
                rows.append([str(data_root / r["path"]), r["label"], r["source"], "val" if i % 180 == 0 else "train"])
    jsrt = data_root.parent / "jsrt"
    with open(jsrt / "manifest.csv") as f:
        for i, r in enumerate(csv.DictReader(f)):
            if i % 6 == 0:
                label = "normal" if r["label"] == "normal" else "other"
                rows.append([str(jsrt / r["path"]), label, "jsrt", "val" if i % 24 == 0 else "train"])
    out = tmp_path_factory.mktemp("findings") / "pooled.csv"
    with open(out, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "source", "split"], *rows])
    return out


def _config(manifest: Path, cache_dir: Path, out: Path, weight: float):
    return config_for("default", data=str(manifest), out=str(out), cache_dir=str(cache_dir), size=SIZE, epochs=2,
                      deterministic=True, patience=0, seed=3, finding_task=weight)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, pooled_manifest: Path, cache_dir: Path) -> dict[str, Path]:
    """Two real tiny runs on the same films, without and with the finding task."""
    base = tmp_path_factory.mktemp("finding-runs")
    return {name: train(_config(pooled_manifest, cache_dir, base / name, weight)) for name, weight in (("off", 0.0), ("on", 0.5))}


@pytest.mark.slow
def test_the_task_trains_its_head_and_leaves_the_covid_question(runs: dict[str, Path], pooled_manifest: Path):
    on, off = runs["on"], runs["off"]
    history = json.loads((on / "history.json").read_text())
    assert all(0 < h["finding_loss"] < 5 and 0 <= h["finding_acc"] <= 1 for h in history)
    assert not any(k.startswith("finding_") for k in json.loads((off / "history.json").read_text())[0])
    with safe_open(str(on / "last.safetensors"), framework="pt") as f:
        assert {k for k in f.keys() if k.startswith("findings.")} == {"findings.head.weight", "findings.head.bias"}
    # the saved classifier is the same network either way: the head lives in training only
    assert load_file(str(on / "model.safetensors")).keys() == load_file(str(off / "model.safetensors")).keys()
    # validation (the threshold's and the temperature's films) is the COVID-19 question's alone with the task on
    val_on = (on / "val_predictions.csv").read_text()
    val_off = (off / "val_predictions.csv").read_text()
    assert "jsrt" not in val_on and "jsrt" in val_off
    assert json.loads((on / "model.json").read_text())["train_config"]["finding_task"] == 0.5


def test_the_task_needs_a_source_with_both_normals_and_another_finding(tmp_path: Path, data_root: Path, cache_dir: Path):
    rows = [r for r in csv.DictReader(open(data_root / "manifest.csv"))][:40:4]
    (tmp_path / "m.csv").write_text("path,label,source,split\n" + "".join(
        f"{data_root / r['path']},{r['label']},{r['source']},{'train' if i % 2 else 'val'}\n" for i, r in enumerate(rows)))
    with pytest.raises(DataError, match=r"m\.csv: --finding-task needs training films of a source"):
        train(_config(tmp_path / "m.csv", cache_dir, tmp_path / "run", 0.5))
