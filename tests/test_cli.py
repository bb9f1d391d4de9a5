"""The command line's help tells the truth, and every shipped artefact has a command that rebuilds it."""

from __future__ import annotations

import csv
import json
from dataclasses import fields
from pathlib import Path

import pytest

from covidxray.cli import build_parser, main
from covidxray.config import RECIPES, TrainConfig, config_for


def _subparser(name: str):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[name]


def test_train_help_shows_what_the_default_recipe_trains_with():
    helps = {a.dest: a.help or "" for a in _subparser("train")._actions}
    recipe = config_for("default")
    for f in fields(TrainConfig):
        value = getattr(recipe, f.name)
        if f.name != "recipe" and value not in (None, ""):
            assert helps[f.name].endswith(f"(default recipe: {value})"), (f.name, helps[f.name])
    # The recipe's own values, not the dataclass defaults: lung crop at 160 px, darkened outside the lungs.
    assert RECIPES["default"]["size"] != TrainConfig.size  # else this test would not tell the two apart
    assert helps["size"].endswith("(default recipe: 160)") and helps["lung_crop"].endswith("(default recipe: True)")
    assert helps["outside"].endswith("(default recipe: 0.7)")


@pytest.mark.parametrize("command", ["train-segmenter", "train-gate"])
def test_artefact_commands_have_help(command: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    assert "segmenter.json" in capsys.readouterr().out


def test_artefact_commands_name_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["train-gate", "--segmenter", str(tmp_path), "--data", "m.csv", "--splits", "s.csv", "--jsrt", "j.csv",
                 "--not-frontal", "n.csv"]) == 2
    assert f"--segmenter {tmp_path}: no segmenter.json there" in capsys.readouterr().err
    assert main(["train-segmenter", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "seg")]) == 2
    assert "--data" in capsys.readouterr().err and not (tmp_path / "seg").exists()
    assert main(["train-segmenter", "--data", str(tmp_path), "--size", "100"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


def _jsrt_subset(data_root: Path, out: Path, n: int) -> Path:
    """The first ``n`` rows of the JSRT manifest, paths made absolute, as a manifest of its own."""
    jsrt = data_root.parent / "jsrt"
    rows = list(csv.DictReader(open(jsrt / "manifest.csv", newline="")))[:n]
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "path": str(jsrt / r["path"]), "mask": str(jsrt / r["mask"])} for r in rows)
    return out


@pytest.mark.slow
def test_train_segmenter_command_writes_a_loadable_segmenter(tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture):
    from covidxray.segment import LungSegmenter

    small = _jsrt_subset(data_root, tmp_path / "jsrt.csv", 20)
    assert main(["train-segmenter", "--data", str(small), "--out", str(tmp_path / "seg"), "--size", "32", "--epochs", "1",
                 "--no-pretrained"]) == 0
    out = capsys.readouterr().out
    assert "validation Dice" in out and "next: covidxray train-gate" in out
    seg = LungSegmenter(tmp_path / "seg")
    assert seg.meta["config"]["epochs"] == 1 and seg.meta["preprocess"]["size"] == 32
    assert json.loads((tmp_path / "seg" / "segmenter.json").read_text())["split"]["train"]


def test_serve_refuses_a_batch_size_below_one_before_loading_anything(tmp_path: Path, capsys: pytest.CaptureFixture):
    """``serve --max-batch 0`` would queue requests no network call ever takes: refused with a clear message."""
    # --model names nothing: were the option not checked first, the missing model would be the error
    assert main(["serve", "--model", str(tmp_path / "none"), "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1, not 0" in capsys.readouterr().err
