"""External validation and the model card (Markdown + self-contained HTML) on a real small run."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from covidxray import DISCLAIMER
from covidxray.checkpoint import copy_model, default_model_path
from covidxray.cli import main
from covidxray.data import load_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_copy(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained run's model files in a folder of its own, so reports written here touch no other test."""
    run = tmp_path_factory.mktemp("card") / "run"
    return copy_model(trained_run, run)


@pytest.fixture(scope="module")
def external_tree(manifest: Path, split_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder tree ``ext/{COVID-19,NORMAL}/`` of 30 + 30 real test-split X-rays (symlinks, in tmp)."""
    root = tmp_path_factory.mktemp("hospital") / "ext"
    test = [s for s in load_samples(manifest, split_file) if s.split == "test"]
    rng = np.random.default_rng(0)
    for label, folder in ((1, "COVID-19"), (0, "NORMAL")):
        (root / folder).mkdir(parents=True)
        pool = [s for s in test if s.label == label]
        for i in rng.choice(len(pool), 30, replace=False):
            (root / folder / f"{i:05d}.jpg").symlink_to(pool[i].path)
    return root


def _take_test_report(run: Path, evaluated: Path) -> None:
    """Give ``run`` the test report of ``evaluated``, a copy of the same model (same weights, threshold, temperature)."""
    assert json.loads((run / "model.json").read_text()) == json.loads((evaluated / "model.json").read_text())
    shutil.copytree(evaluated / "eval-test", run / "eval-test")


def test_external_evaluation_reports_metrics_and_the_gap(run_copy: Path, external_tree: Path, cache_dir: Path,
                                                        test_evaluation: Path, capsys):
    assert main(["evaluate", str(run_copy), "--external", str(external_tree), "--bootstrap", "100",
                 "--cache-dir", str(cache_dir)]) == 0
    assert "gap vs internal test" in capsys.readouterr().out
    out = run_copy / "eval-external-ext"
    report = json.loads((out / "report.json").read_text())
    assert (report["n"], report["n_covid"]) == (60, 30)
    internal = report["internal"]
    assert internal["n"] > 1000 and "test split" in internal["from"]  # no stored test report yet: computed
    for name, gap in report["gap"].items():
        assert gap == pytest.approx(report["metrics"][name]["value"] - internal["metrics"][name]["value"]), name
    md = (out / "report.md").read_text()
    assert "## External vs internal" in md and "| Gap |" in md and "external" in md.splitlines()[0]

    # Once a current internal test report exists it is reused, not recomputed: here the one
    # `covidxray evaluate --split test` wrote for the same model (see `test_evaluation`).
    _take_test_report(run_copy, test_evaluation)
    assert main(["evaluate", str(run_copy), "--external", str(external_tree), "--bootstrap", "100",
                 "--cache-dir", str(cache_dir)]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["internal"]["from"].endswith("eval-test/report.json")
    assert again["internal"]["metrics"]["roc_auc"]["value"] == pytest.approx(internal["metrics"]["roc_auc"]["value"])


def test_external_needs_labels(run_copy: Path, tmp_path: Path):
    (tmp_path / "unlabelled" / "scans").mkdir(parents=True)
    assert main(["evaluate", str(run_copy), "--external", str(tmp_path / "unlabelled")]) == 2


def test_card_writes_markdown_and_self_contained_html(run_copy: Path, external_tree: Path, cache_dir: Path,
                                                     test_evaluation: Path, tmp_path: Path):
    if not (run_copy / "eval-test" / "report.json").is_file():
        _take_test_report(run_copy, test_evaluation)
    if not (run_copy / "eval-external-ext" / "report.json").is_file():
        assert main(["evaluate", str(run_copy), "--external", str(external_tree), "--bootstrap", "100",
                     "--cache-dir", str(cache_dir)]) == 0
    assert main(["audit", str(run_copy), "--split", "test", "--limit", "16", "--probe-limit", "120",
                 "--cache-dir", str(cache_dir)]) == 0
    md_path = tmp_path / "cards" / "CARD.md"
    assert main(["card", str(run_copy), "--out", str(md_path)]) == 0
    md, page = md_path.read_text(), md_path.with_suffix(".html").read_text()
    meta = json.loads((run_copy / "model.json").read_text())
    test = json.loads((run_copy / "eval-test" / "report.json").read_text())

    for text in (md, page):
        assert "Not for diagnosis" in text and "COVID-19 (" in text
        assert f"{meta['threshold']:.4f}" in text and f"{meta['temperature']:.4f}" in text
        assert f"{test['metrics']['roc_auc']['value']:.4f}" in text
        assert "Source probe" in text and "external: ext" in text and "radiography-db" in text
    assert DISCLAIMER in md and f"<strong>{DISCLAIMER}</strong>" in page
    # Markdown links pictures that exist; HTML embeds every picture, so the page stands alone.
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert len(links) >= 4 and all((md_path.parent / link).is_file() for link in links)
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(links)
    assert "src=\"http" not in page and "src=\"/" not in page
    assert all(base64.b64decode(b)[:4] == b"\x89PNG" for b in images)


def test_the_bundled_card_scores_every_origin(tmp_path: Path):
    """The shipped model's card carries its scores on every shared origin, the ones it never saw included."""
    bundled = Path(default_model_path())
    origins = json.loads((bundled / "origins.json").read_text())["results"]
    assert main(["card", str(bundled), "--out", str(tmp_path / "CARD.md")]) == 0
    md = (tmp_path / "CARD.md").read_text()
    assert "Every origin of the shared data" in md
    for key in ("shenzhen/normal", "shenzhen/tuberculosis", "montgomery/normal", "jsrt/normal"):
        r = origins[key]
        assert f"| `{r['origin']}` {r['finding']} | {r['n']} | {r['metric']} | {r['at_threshold']['value']:.3f}" in md
