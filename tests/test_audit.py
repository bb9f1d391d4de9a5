"""Shortcut audit on real X-rays: Grad-CAM frame mass, the source probe, leakage and `covidxray audit`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covidxray.audit import area_shares, border_mass, leakage, source_probe
from covidxray.cli import main
from covidxray.data import Sample, load_samples
from covidxray.imaging import load_image
from covidxray.inference import logits_and_features
from covidxray.models import build_model, get_spec
from covidxray.predictor import Predictor
from covidxray.presets import Preprocess

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_border_mass_of_known_maps():
    size, frame = 64, 0.125
    d = 8
    uniform = torch.ones(1, size, size)
    frame_only = torch.ones(1, size, size)
    frame_only[:, d:-d, d:-d] = 0
    centre_only = torch.zeros(1, size, size)
    centre_only[:, d:-d, d:-d] = 1
    corner = torch.zeros(1, size, size)
    corner[:, :d, -d:] = 1
    m = border_mass(torch.cat([uniform, frame_only, centre_only, corner, torch.zeros(1, size, size)]), frame)
    assert m["border"][:4] == pytest.approx([1 - 0.75 ** 2, 1.0, 0.0, 1.0])
    assert m["corners"][:4] == pytest.approx([4 * 0.125 ** 2, 4 * d * d / (size * size - 48 * 48), 0.0, 1.0])
    assert np.isnan(m["border"][4]) and np.isnan(m["corners"][4])  # no evidence: nothing to locate
    assert area_shares(size, frame) == pytest.approx({"border": 1 - 0.75 ** 2, "corners": 4 * 0.125 ** 2})


@pytest.mark.parametrize("arch", ["cxrnet", "tf_efficientnet_lite0", "resnet18"])
def test_features_are_what_the_head_sees(arch: str):
    torch.manual_seed(0)
    model = build_model(arch).train()
    pre = Preprocess(size=64)
    images = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    logits, f = logits_and_features(model, arch, images, pre)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        x = pre.to_tensor(images)
        assert torch.allclose(model.get_submodule(get_spec(arch).head)(torch.from_numpy(f)), model(x), atol=1e-5)
        assert torch.allclose(torch.from_numpy(logits), model(x), atol=1e-5)  # both from the one pass


@pytest.fixture(scope="module")
def one_source_images(manifest: Path, split_file: Path) -> list[np.ndarray]:
    """320 real normal X-rays of one source (radiography-db validation split), decoded."""
    val = [s for s in load_samples(manifest, split_file) if s.split == "val" and s.label == 0 and s.source == "radiography-db"]
    pick = np.random.default_rng(0).choice(len(val), 320, replace=False)
    return [load_image(val[i].path) for i in sorted(pick)]


def _probe_features(run: Path, images: list[np.ndarray]) -> np.ndarray:
    pred = Predictor(run, backend="torch")
    prepared = torch.from_numpy(np.stack([pred.preprocess.prepare(img) for img in images]))
    return logits_and_features(pred.model, pred.meta["arch"], prepared, pred.preprocess)[1]


def test_probe_finds_a_planted_source_marker_and_nothing_without_it(trained_run: Path, one_source_images):
    """Two fake 'sources' drawn from one real source: separable only when one of them carries a corner marker."""
    fake = np.array(["A", "B"] * (len(one_source_images) // 2))
    marked = []
    for img, src in zip(one_source_images, fake):
        img = img.copy()
        if src == "B":  # a bright burned-in square in the top-left corner, like a hospital's film marker
            # (a third of each side: after pooling, a 96 px network's features dilute smaller marks)
            h, w = img.shape
            img[: h // 3, : w // 3] = 1.0
        marked.append(img)
    with_marker = source_probe(_probe_features(trained_run, marked), fake)["all"]
    without = source_probe(_probe_features(trained_run, one_source_images), fake)["all"]
    assert with_marker["chance_balanced_accuracy"] == 0.5 and with_marker["n"] == 320
    assert with_marker["balanced_accuracy"] > 0.9, with_marker
    # Chance is 0.5; cross-validated scores on 320 images stray from it by about 0.05 either way.
    assert abs(without["balanced_accuracy"] - 0.5) < 0.15, without


def test_probe_within_class_and_too_small_sources():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    labels = np.r_[np.ones(30, int), np.zeros(30, int)]
    sources = np.array(["a"] * 15 + ["b"] * 15 + ["a"] * 27 + ["c"] * 3)
    out = source_probe(x, sources, labels)
    assert set(out) == {"all", "covid", "normal"}
    assert out["covid"]["sources"] == {"a": 15, "b": 15} and out["covid"]["chance_balanced_accuracy"] == 0.5
    assert out["normal"]["excluded"] == {"c": 3} and "skipped" in out["normal"]  # one source left


def _copy_resized(src: Path, dst: Path, scale: float = 0.85, quality: int = 80) -> None:
    with Image.open(src) as im:
        im.convert("L").resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC).save(
            dst, format="JPEG", quality=quality)


def test_leakage_finds_a_planted_duplicate_and_a_shared_patient(manifest: Path, split_file: Path, tmp_path: Path):
    samples = load_samples(manifest, split_file)
    rng = np.random.default_rng(0)
    train = [samples[i] for i in rng.choice([i for i, s in enumerate(samples) if s.split == "train"], 40, replace=False)]
    test = [samples[i] for i in rng.choice([i for i, s in enumerate(samples) if s.split == "test"], 40, replace=False)]
    assert leakage(train, test)["near_duplicates"] == []

    copy = tmp_path / "copy.jpg"  # the same film, re-scaled and re-encoded, so its bytes and size differ
    _copy_resized(train[7].path, copy)
    planted = Sample(copy, train[7].label, key="planted/copy.jpg", source="elsewhere")
    found = leakage(train, [*test, planted])
    assert [(d["train"], d["evaluated"]) for d in found["near_duplicates"]] == [(train[7].key, "planted/copy.jpg")]
    assert found["patients"] == []

    same_patient = Sample(test[0].path, test[0].label, key=test[0].key, source="ieee8023", patient_id="p-42")
    found = leakage([*train, Sample(train[0].path, 1, key=train[0].key, source="ieee8023", patient_id="p-42")],
                    [same_patient])
    assert found["patients"] == ["ieee8023/p-42"]


def test_audit_command_writes_the_audit(trained_run: Path, cache_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "audit"
    assert main(["audit", str(trained_run), "--split", "val", "--out", str(out), "--limit", "24", "--probe-limit", "200",
                 "--cache-dir", str(cache_dir)]) == 0
    assert "Source probe" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"audit.json", "audit.md", "gradcam_examples.png", "gradcam_mean.png"}
    audit = json.loads((out / "audit.json").read_text())
    assert audit["n_images"] == 200 and audit["split"] == "val" and "COVID-19" in audit["positive_class"]
    rdb = audit["per_source"]["radiography-db"]
    assert rdb["both_classes"] and 0.5 < rdb["roc_auc"]["value"] <= 1
    assert not audit["per_source"]["covid-cxnet"]["both_classes"]
    assert audit["leakage"]["near_duplicates"] == [] and audit["leakage"]["patients"] == []  # the committed split is clean
    probe = audit["source_probe"]["covid"]
    assert set(probe["sources"]) <= {"radiography-db", "covid-cxnet", "ieee8023"}
    assert 0 <= probe["balanced_accuracy"] <= 1 and len(probe["fold_balanced_accuracy"]) == 5
    cam = audit["gradcam"]
    assert cam["n"] == 24 and sum(c["n"] for c in cam["by_class"].values()) == 24
    for c in cam["by_class"].values():
        assert 0 <= c["border_mass"] <= 1 and 0 <= c["corner_mass"] <= c["border_mass"]
    md = (out / "audit.md").read_text()
    assert "## Source probe" in md and "(gradcam_examples.png)" in md and "radiography-db" in md
    for png in ("gradcam_examples.png", "gradcam_mean.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
