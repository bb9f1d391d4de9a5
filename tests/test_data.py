"""Tests for covidxray.data and the ``covidxray data`` commands, on the real shared X-ray set."""

from __future__ import annotations

import csv
import logging
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from covidxray.cli import main
from covidxray.data import (
    Sample, check_samples, load_samples, make_splits, near_duplicate_pairs, parse_label, read_folder, read_manifest,
)
from covidxray.errors import DataError

SOURCES = {"radiography-db", "ieee8023", "covid-cxnet"}


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def samples(manifest: Path) -> list[Sample]:
    return read_manifest(manifest)


@pytest.fixture(scope="module")
def split_samples(samples: list[Sample]) -> list[Sample]:
    return make_splits(samples)


@pytest.fixture(scope="module")
def real_images(samples: list[Sample]) -> dict[str, list[Path]]:
    """A few distinct real X-rays of each class, from different sources."""
    covid = [s.path for s in samples if s.label == 1 and s.source == "covid-cxnet"][:4]
    covid += [s.path for s in samples if s.label == 1 and s.source == "ieee8023"][:2]
    normal = [s.path for s in samples if s.label == 0 and s.source == "radiography-db"][:6]
    return {"covid": covid, "normal": normal}


def _link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)
    return dst


def _read_split_csv(path: Path) -> dict[str, str]:
    with open(path, newline="") as f:
        return {r["path"]: r["split"] for r in csv.DictReader(f)}


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------- manifest


def test_read_manifest_counts_labels_and_sources(samples: list[Sample]):
    assert len(samples) == 7414
    assert Counter(s.label for s in samples) == {1: 3408, 0: 4006}
    assert Counter(s.label_name for s in samples) == {"covid": 3408, "normal": 4006}
    assert {s.source for s in samples} == SOURCES
    assert all(s.path.is_absolute() and s.path.is_file() for s in samples)
    assert len({s.key for s in samples}) == 7414
    assert all(re.fullmatch(r"[0-9a-f]{16}", s.phash) for s in samples)
    # Only ieee8023 gives patient IDs (README caveat 7).
    assert {s.source for s in samples if s.patient_id} == {"ieee8023"}


def test_read_manifest_first_row_is_resolved_against_manifest_folder(samples: list[Sample], data_root: Path):
    first = samples[0]
    assert first.key == "images/covid-cxnet/covid/00001.jpg"
    assert first.path == data_root.resolve() / first.key
    assert (first.label, first.source, first.patient_id, first.split) == (1, "covid-cxnet", "", "")
    assert first.phash == "cd3f60721bc13d1c"


@pytest.mark.parametrize("text,label", [
    ("COVID-19", 1), ("Covid19", 1), ("covid", 1), (" NORMAL ", 0), ("healthy", 0), ("No Finding", 0), ("pneumonia", None),
    ("other", 0), (" Other ", 0),  # another finding (tuberculosis, a nodule): the negative class of the COVID-19 question
])
def test_parse_label_aliases(text: str, label: int | None):
    assert parse_label(text) == label


def test_manifest_unknown_label_names_file_and_line(tmp_path: Path, real_images):
    m = _write_csv(tmp_path / "bad.csv", ["path", "label"], [
        [str(real_images["covid"][0]), "covid"],
        [str(real_images["normal"][0]), "normal"],
        [str(real_images["normal"][1]), "pneumonia"],
    ])
    with pytest.raises(DataError) as e:
        read_manifest(m)
    msg = str(e.value)
    assert str(m) in msg and "line 4" in msg and "'pneumonia'" in msg and "covid, normal or other" in msg


def test_manifest_unknown_split_names_line(tmp_path: Path, real_images):
    m = _write_csv(tmp_path / "bad.csv", ["path", "label", "split"], [[str(real_images["covid"][0]), "covid", "tset"]])
    with pytest.raises(DataError, match=r"line 2: unknown split 'tset'"):
        read_manifest(m)


def test_manifest_without_label_column(tmp_path: Path, real_images):
    m = _write_csv(tmp_path / "nolabel.csv", ["path", "diagnosis"], [[str(real_images["covid"][0]), "covid"]])
    with pytest.raises(DataError, match=r"'path' and 'label'") as e:
        read_manifest(m)
    assert str(m) in str(e.value)


def test_manifest_empty_file(tmp_path: Path):
    m = tmp_path / "empty.csv"
    m.write_text("")
    with pytest.raises(DataError, match="empty.csv"):
        read_manifest(m)


def test_split_file_missing_paths(tmp_path: Path, manifest: Path, split_file: Path):
    lines = split_file.read_text().splitlines()
    short = tmp_path / "short.csv"
    short.write_text("\n".join(lines[:-3]) + "\n")  # drop the last 3 images
    with pytest.raises(DataError) as e:
        load_samples(manifest, short)
    msg = str(e.value)
    assert str(short) in msg and "3 images" in msg and lines[-3].split(",")[0] in msg


def test_split_file_without_split_column(tmp_path: Path, manifest: Path):
    f = _write_csv(tmp_path / "s.csv", ["path", "fold"], [["images/covid-cxnet/covid/00001.jpg", "train"]])
    with pytest.raises(DataError, match="'path' and 'split'"):
        load_samples(manifest, f)


def test_split_file_unknown_split_name_is_an_error(tmp_path: Path, manifest: Path, split_file: Path):
    text = split_file.read_text().replace("images/covid-cxnet/covid/00001.jpg,train", "images/covid-cxnet/covid/00001.jpg,tset")
    assert ",tset" in text
    typo = tmp_path / "typo.csv"
    typo.write_text(text)
    with pytest.raises(DataError, match="tset"):
        load_samples(manifest, typo)


def test_load_samples_missing_path(tmp_path: Path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_samples(tmp_path / "nothing.csv")


def test_committed_split_applies_to_manifest(manifest: Path, split_file: Path):
    s = load_samples(manifest, split_file)
    assert len(s) == 7414
    assert {x.split for x in s} == {"train", "val", "test"}


# ---------------------------------------------------------------------------------------------- folder trees


def test_folder_tree_with_split_and_class_aliases(tmp_path: Path, real_images, caplog: pytest.LogCaptureFixture):
    root = tmp_path / "ROOT"
    c, n = real_images["covid"], real_images["normal"]
    expected = {  # key -> (label, split)
        "train/COVID-19/a.jpg": (1, "train"), "train/COVID-19/sub/b.jpg": (1, "train"),
        "train/NORMAL/c.jpg": (0, "train"), "train/NORMAL/d.jpg": (0, "train"),
        "Validation/normal/e.jpg": (0, "val"), "Validation/Covid19/f.jpg": (1, "val"),
        "test/Covid19/g.jpg": (1, "test"), "test/healthy/h.jpg": (0, "test"),
    }
    srcs = {"a": c[0], "b": c[1], "c": n[0], "d": n[1], "e": n[2], "f": c[2], "g": c[3], "h": n[3]}
    for key in expected:
        _link(srcs[Path(key).stem], root / key)
    _link(n[4], root / "train" / "pneumonia" / "x.jpg")  # unknown class: skipped
    (root / "train" / "NORMAL" / "labels.csv").write_text("not an image\n")  # not an image: ignored
    (root / "train" / "NORMAL" / ".DS_Store").write_bytes(b"\0\0")  # hidden: ignored
    with caplog.at_level(logging.WARNING, logger="covidxray.data"):
        got = load_samples(root)
    assert {s.key: (s.label, s.split) for s in got} == expected
    assert {s.key: s.path for s in got} == {k: srcs[Path(k).stem].resolve() for k in expected}
    assert "pneumonia" in caplog.text


def test_flat_folder_tree_has_no_split(tmp_path: Path, real_images):
    root = tmp_path / "flat"
    for i, p in enumerate(real_images["covid"][:3]):
        _link(p, root / "covid" / f"c{i}.jpg")
    for i, p in enumerate(real_images["normal"][:2]):
        _link(p, root / "Normal" / f"n{i}.jpg")
    got = read_folder(root)
    assert sorted((s.key, s.label, s.split) for s in got) == [
        ("Normal/n0.jpg", 0, ""), ("Normal/n1.jpg", 0, ""),
        ("covid/c0.jpg", 1, ""), ("covid/c1.jpg", 1, ""), ("covid/c2.jpg", 1, ""),
    ]


def test_empty_or_unrecognised_folder_raises(tmp_path: Path, real_images):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_samples(empty)
    other = tmp_path / "other"
    _link(real_images["covid"][0], other / "pneumonia" / "a.jpg")
    with pytest.raises(DataError, match=str(other)):
        load_samples(other)
    with pytest.raises(DataError, match="not a folder"):
        read_folder(tmp_path / "missing")


def test_folder_tree_with_two_aliases_of_one_split_loses_nothing(tmp_path: Path, real_images):
    root = tmp_path / "ROOT"
    _link(real_images["covid"][0], root / "train" / "covid" / "a.jpg")
    _link(real_images["normal"][0], root / "train" / "normal" / "b.jpg")
    _link(real_images["covid"][1], root / "val" / "covid" / "c.jpg")
    _link(real_images["normal"][1], root / "Validation" / "normal" / "d.jpg")
    try:
        got = load_samples(root)
    except DataError as e:  # refusing the ambiguous layout is an acceptable fix too
        assert "val" in str(e).lower()
        return
    assert sorted(s.key for s in got) == ["Validation/normal/d.jpg", "train/covid/a.jpg", "train/normal/b.jpg",
                                          "val/covid/c.jpg"]


# ---------------------------------------------------------------------------------------------- splitting


def test_make_splits_is_deterministic_and_complete(samples: list[Sample], split_samples: list[Sample]):
    again = make_splits(samples)
    assert [s.split for s in again] == [s.split for s in split_samples]
    assert all(s.split in ("train", "val", "test") for s in split_samples)
    assert [s.key for s in split_samples] == [s.key for s in samples]  # order and identity kept
    other = make_splits(samples, seed=1)
    assert [s.split for s in other] != [s.split for s in split_samples]


def test_make_splits_fractions(split_samples: list[Sample]):
    n = len(split_samples)
    share = {k: v / n for k, v in Counter(s.split for s in split_samples).items()}
    assert share["train"] == pytest.approx(0.70, abs=0.02)
    assert share["val"] == pytest.approx(0.15, abs=0.02)
    assert share["test"] == pytest.approx(0.15, abs=0.02)


def test_make_splits_keeps_patients_together(split_samples: list[Sample]):
    splits_of: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s in split_samples:
        if s.patient_id:
            splits_of[(s.source, s.patient_id)].add(s.split)
    assert len(splits_of) > 100  # ieee8023 patients
    assert sum(1 for v in splits_of.values() if len(v) > 1) == 0
    assert any(len([s for s in split_samples if (s.source, s.patient_id) == k]) > 1 for k in splits_of)


def test_make_splits_keeps_near_duplicates_together(split_samples: list[Sample]):
    pairs = near_duplicate_pairs(split_samples, max_distance=4)
    assert len(pairs) > 10  # the set does hold near-duplicate pairs (README: 57 cross-label ones)
    assert all(d <= 4 for _, _, d in pairs)
    crossing = [(split_samples[i].key, split_samples[j].key) for i, j, _ in pairs
                if split_samples[i].split != split_samples[j].split]
    assert crossing == []


def test_make_splits_keeps_each_source_label_mix_within_2pp(split_samples: list[Sample]):
    """Acceptance criterion: each source's COVID-19 share is within +-2 percentage points in every split."""
    for source in SOURCES:
        sub = [s for s in split_samples if s.source == source]
        overall = sum(s.label for s in sub) / len(sub)
        for split in ("train", "val", "test"):
            part = [s for s in sub if s.split == split]
            assert part, (source, split)
            share = sum(s.label for s in part) / len(part)
            assert abs(share - overall) <= 0.02, f"{source}/{split}: covid share {share:.4f} vs {overall:.4f}"


def test_make_splits_rejects_bad_fractions(samples: list[Sample]):
    with pytest.raises(DataError, match="fractions"):
        make_splits(samples[:10], fractions=(0.8, 0.2, 0.2))
    with pytest.raises(DataError, match="fractions"):
        make_splits(samples[:10], fractions=(0.5, 0.5))


def test_committed_split_is_reproducible(split_samples: list[Sample], split_file: Path):
    committed = _read_split_csv(split_file)
    assert committed == {s.key: s.split for s in split_samples}


def test_check_samples_on_committed_split_finds_no_leaks(manifest: Path, split_file: Path):
    res = check_samples(load_samples(manifest, split_file), read_images=False)
    assert res.patient_leaks == [] and res.duplicate_leaks == [] and not res.leaks
    assert sum(res.counts.values()) == 7414
    assert sum(n for (_, lab, _), n in res.counts.items() if lab == "covid") == 3408


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_data_check_reads_every_image(manifest: Path, split_file: Path, capsys: pytest.CaptureFixture):
    rc = main(["data", "check", str(manifest), "--splits", str(split_file)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert re.search(r"total: 7414 images .*covid .*3408, normal 4006", out), out
    assert "unreadable files: 0" in out
    assert "patients in more than one split: 0" in out
    assert re.search(r"near-duplicate pairs across splits \(pHash distance <= 4\): 0", out)
    assert re.search(r"train\s+covid\s+ieee8023\s+\d+", out)


@pytest.fixture()
def leaky_split(tmp_path: Path, manifest: Path, split_file: Path) -> tuple[Path, str]:
    """The committed split with one image of a multi-image ieee8023 patient moved to another split."""
    split = _read_split_csv(split_file)
    by_patient: dict[str, list[str]] = defaultdict(list)
    for s in read_manifest(manifest):
        if s.source == "ieee8023" and s.patient_id:
            by_patient[s.patient_id].append(s.key)
    pid, keys = next((p, k) for p, k in sorted(by_patient.items()) if len(k) >= 2)
    split[keys[0]] = "test" if split[keys[0]] != "test" else "train"
    assert split[keys[0]] != split[keys[1]]
    out = _write_csv(tmp_path / "leaky.csv", ["path", "split"], [[k, v] for k, v in split.items()])
    return out, f"ieee8023/{pid}"


def test_cli_data_check_reports_patient_leak(manifest: Path, leaky_split, capsys: pytest.CaptureFixture):
    path, patient = leaky_split
    rc = main(["data", "check", str(manifest), "--splits", str(path), "--no-read"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "patients in more than one split: 1" in cap.out
    assert re.search(rf"^\s+{re.escape(patient)}: \w+, \w+$", cap.out, re.M), cap.out
    assert "--allow-leaks" in cap.err


def test_cli_data_check_allow_leaks(manifest: Path, leaky_split, capsys: pytest.CaptureFixture):
    path, patient = leaky_split
    rc = main(["data", "check", str(manifest), "--splits", str(path), "--no-read", "--allow-leaks"])
    out = capsys.readouterr().out
    assert rc == 0
    assert patient in out and "patients in more than one split: 1" in out


def test_cli_data_check_finds_duplicate_across_folder_splits(tmp_path: Path, real_images, capsys: pytest.CaptureFixture):
    root = tmp_path / "tree"
    c, n = real_images["covid"], real_images["normal"]
    _link(c[0], root / "train" / "covid" / "same.jpg")
    _link(c[1], root / "train" / "covid" / "b.jpg")
    _link(n[0], root / "train" / "normal" / "c.jpg")
    _link(c[0], root / "test" / "covid" / "copy.jpg")  # the same picture in test
    _link(n[1], root / "test" / "normal" / "d.jpg")
    rc = main(["data", "check", str(root)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "unreadable files: 0" in out
    assert "near-duplicate pairs across splits (pHash distance <= 4): 1" in out
    assert re.search(r"test/covid/copy\.jpg <-> train/covid/same\.jpg \(distance 0\)|"
                     r"train/covid/same\.jpg <-> test/covid/copy\.jpg \(distance 0\)", out), out


def test_cli_data_check_lists_unreadable_file(tmp_path: Path, real_images, capsys: pytest.CaptureFixture):
    root = tmp_path / "tree"
    _link(real_images["covid"][0], root / "covid" / "a.jpg")
    _link(real_images["normal"][0], root / "normal" / "b.jpg")
    broken = root / "normal" / "broken.jpg"
    broken.write_bytes(b"")
    rc = main(["data", "check", str(root)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "unreadable files: 1" in out
    assert re.search(rf"^\s+{re.escape(str(broken.resolve()))}: \S.*$", out, re.M), out
    assert "total: 3 images" in out


def test_cli_data_split_writes_committed_split(tmp_path: Path, manifest: Path, split_file: Path,
                                               capsys: pytest.CaptureFixture):
    out = tmp_path / "x.csv"
    rc = main(["data", "split", str(manifest), "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert _read_split_csv(out) == _read_split_csv(split_file)
    assert out.read_text().splitlines() == split_file.read_text().splitlines()
    assert f"wrote {out}" in printed
    assert re.search(r"^train\s+covid\s+\d+\s+normal\s+\d+$", printed, re.M)


def test_cli_data_show_writes_png(tmp_path: Path, manifest: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "grid.png"
    rc = main(["data", "show", str(manifest), "--out", str(out), "--per-class", "4"])
    assert rc == 0 and f"wrote {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 500 and im.height > 200
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_missing_manifest_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture):
    missing = tmp_path / "no" / "manifest.csv"
    rc = main(["data", "check", str(missing)])
    cap = capsys.readouterr()
    assert rc == 2
    assert str(missing) in cap.err and "Traceback" not in cap.err
