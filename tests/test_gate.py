"""Input gate: no COVID-19 answer for what is not a frontal chest X-ray, on real files.

Refused: the shared not-frontal set's held-out patients (the gate never trained on them), pydicom's
own test files of other modalities, package photographs it never saw, generated documents and
noise, frontal films turned on their side. Answered: frontal films of covid-cxr's test split and JSRT.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dicoms
from covidxray.cli import main
from covidxray.gate import GATE_CLASSES, InputGate, header_verdict
from covidxray.gate_training import not_frontal_split
from covidxray.imaging import ImageInfo, read_image
from covidxray.negatives import HELD_OUT, generated, package_images, pydicom_images
from covidxray.predictor import NOT_ANSWERED, Predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor()


@pytest.fixture(scope="module")
def shared(data_root: Path) -> Path:
    return data_root.parent


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("info, reason", [
    (ImageInfo("dicom", modality="CT"), "wrong_modality"),
    (ImageInfo("dicom", modality="MR"), "wrong_modality"),
    (ImageInfo("dicom", modality="US"), "wrong_modality"),
    (ImageInfo("dicom", modality="CR", body_part="SKULL"), "not_chest"),
    (ImageInfo("dicom", modality="DX", view_position="LL"), "lateral_view"),
    (ImageInfo("dicom", modality="DX", view_position="RAO"), "oblique_view"),
    (ImageInfo("dicom", modality="CR", patient_orientation="A\\F"), "lateral_view"),
    (ImageInfo("dicom", modality="DX", body_part="CHEST", view_position="PA", patient_orientation="L\\F"), None),
    (ImageInfo("dicom", modality="CR", body_part="PORTABLE CHEST", view_position="AP"), None),
    (ImageInfo("dicom", modality="OT"), None),  # a secondary capture: the pixels decide
    (ImageInfo("png"), None),
])
def test_header_rules(info: ImageInfo, reason: str | None):
    verdict = header_verdict(info)
    assert (verdict.reason if verdict else None) == reason
    if verdict:
        assert verdict.by == "header" and "chest" in verdict.message


def test_other_modalities_from_pydicom_get_no_answer(predictor: Predictor):
    """pydicom's CT, MR, US, NM and colour test files: refused by their header, and by their pixels alone."""
    refused = by_pixels = total = 0
    for name, _, path in pydicom_images():
        try:
            image, info = read_image(path)
        except Exception:  # broken on purpose, or an undecodable syntax: not this test's subject
            continue
        total += 1
        answer = predictor.predict_array(image, name, info)
        refused += answer.label == NOT_ANSWERED
        if info.modality not in ("", "OT"):
            assert answer.reason == "wrong_modality", name
        stripped = predictor.predict_bytes(_png((image * 255).astype(np.uint8)), name)  # no header: pixels only
        by_pixels += stripped.label == NOT_ANSWERED
    assert total >= 20 and refused == total
    assert by_pixels >= 0.9 * total, f"{by_pixels}/{total} refused from their pixels alone"


def test_held_out_not_frontal_patients_get_no_answer(predictor: Predictor, shared: Path):
    _, held = not_frontal_split(str(shared / "not-frontal-cxr" / "manifest.csv"), 0.4, 0)
    assert held["lateral"] and held["other_modality"]
    for kind, minimum in (("lateral", 0.9), ("other_modality", 1.0)):
        answers = [predictor.predict_path(p) for p in held[kind]]
        share = np.mean([a.label == NOT_ANSWERED for a in answers])
        assert share >= minimum, (kind, share, [a.path for a in answers if a.answered])


def test_photos_documents_and_noise_get_no_answer(predictor: Predictor):
    photos = [item for item in package_images() if item[0] in HELD_OUT]
    grace = next(src for name, _, src in photos if name == "grace_hopper.jpg")
    grey = _png(np.asarray(Image.open(grace).convert("L")))
    rng = np.random.default_rng(7)
    noise = [_png((rng.random((300, 300)) * 255).astype(np.uint8)), _png((rng.random((200, 260, 3)) * 255).astype(np.uint8))]
    items = [(n, s) for n, _, s in photos] + [("grace-grey", grey)] + [(f"noise{i}", b) for i, b in enumerate(noise)]
    items += [(n, s) for n, _, s in generated(12, seed=4242)]  # documents, charts, noise never seen in training
    answers = {name: predictor.predict(src, name=name) for name, src in items}
    answered = {n: a.label for n, a in answers.items() if a.answered}
    assert not answered, answered
    assert answers["grace-grey"].reason == "not_chest_xray" and answers["grace-grey"].probability is None


def test_frontal_films_are_answered(predictor: Predictor, manifest: Path, split_file: Path, shared: Path):
    split = {r["path"]: r["split"] for r in csv.DictReader(open(split_file))}
    rows = [r for r in csv.DictReader(open(manifest)) if split[r["path"]] == "test"]
    picks = [manifest.parent / r["path"] for r in rows[::4]]  # every fourth test film, all sources
    picks += sorted((shared / "jsrt" / "images" / "normal").glob("*.jpg"))[:40]
    answers = list(predictor.predict_paths(picks))
    refused = [a.path for a in answers if not a.answered]
    assert len(refused) <= 0.01 * len(picks), refused


def test_turned_films_are_refused_as_rotated(predictor: Predictor, manifest: Path):
    paths = sorted((manifest.parent / "images" / "radiography-db" / "covid").glob("*.jpg"))[:10]
    turned = [np.rot90(read_image(p)[0], k) for p in paths for k in (1, 2)]
    answers = [predictor.predict_array(np.ascontiguousarray(t)) for t in turned]
    assert sum(not a.answered for a in answers) >= 0.9 * len(answers)
    assert sum(a.reason == "rotated" for a in answers) >= 0.6 * len(answers)


def test_the_input_gate_alone_turns_probabilities_into_the_answer(predictor: Predictor, shared: Path):
    """The segmenter gives probabilities only; `InputGate` (header, then pixels) decides what the Predictor answers."""
    gate = predictor.input_gate
    assert gate.uses_pixels and gate.threshold == predictor.segmenter.gate_threshold
    _, held = not_frontal_split(str(shared / "not-frontal-cxr" / "manifest.csv"), 0.4, 0)
    picks = held["lateral"][:6] + sorted((shared / "jsrt" / "images" / "normal").glob("*.jpg"))[:6]
    decoded = [read_image(p) for p in picks]
    analyses = predictor.segmenter.analyse([image for image, _ in decoded], [info for _, info in decoded])
    reasons = []
    for (image, info), analysis in zip(decoded, analyses):
        assert analysis.gate.shape == (len(GATE_CLASSES),) and abs(float(analysis.gate.sum()) - 1) < 1e-5
        verdict = gate.header(info) or gate.pixels(analysis.gate)
        reasons.append(verdict.reason if verdict else None)
        assert predictor.predict_array(image, "x", info).reason == reasons[-1]
    assert None in reasons and "lateral_view" in reasons  # both outcomes were exercised
    # The rule is P(frontal) against the threshold; off, or without a trained head, the pixels refuse nothing.
    at = np.array([gate.threshold, 1 - gate.threshold, 0, 0, 0])
    below = np.array([gate.threshold - 0.01, 0, 0, 1.01 - gate.threshold, 0])
    assert gate.pixels(at) is None and gate.pixels(below).reason == "rotated" and gate.pixels(below).by == "pixels"
    ct = ImageInfo("dicom", modality="CT")
    assert gate.header(ct).reason == "wrong_modality" and gate.header(None) is None
    off, headless = InputGate(gate.threshold, enabled=False), InputGate(None)
    assert off.header(ct) is None and off.pixels(below) is None and not off.uses_pixels
    assert headless.pixels(below) is None and headless.header(ct).reason == "wrong_modality"


def test_gate_off_forces_an_answer(manifest: Path):
    noise = _png((np.random.default_rng(0).random((256, 256)) * 255).astype(np.uint8))
    assert Predictor().predict_bytes(noise).label == NOT_ANSWERED
    forced = Predictor(gate=False).predict_bytes(noise)
    assert forced.label in ("covid", "normal") and forced.probability is not None


def test_cli_reports_no_answer_with_its_reason_and_exit_code(tmp_path: Path, manifest: Path, capsys):
    ct = tmp_path / "ct.dcm"
    dicoms.write(ct, dicoms.dx((np.random.default_rng(1).random((128, 128)) * 4000).astype(np.uint16), Modality="CT"))
    xray = manifest.parent / "images/radiography-db/normal/00001.jpg"
    assert main(["predict", str(xray), str(ct), "--format", "json"]) == 3
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["label"] in ("covid", "normal") and rows[0]["reason"] is None
    assert rows[1] == {**rows[1], "label": "not_answered", "reason": "wrong_modality", "probability": None}
    assert main(["predict", str(ct), "--out", str(tmp_path / "p.csv")]) == 3
    row = next(csv.DictReader(open(tmp_path / "p.csv")))
    assert (row["label"], row["reason"], row["probability"]) == ("not_answered", "wrong_modality", "")
    assert main(["predict", str(ct), "--no-gate"]) == 0
    assert main(["predict", str(xray)]) == 0
    out = capsys.readouterr().out
    assert "no answer" not in out.splitlines()[-1]
