"""The package's shape: one-way layers (import-linter), small modules, a torch-free command-line parser."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from covidxray.config import ARCHITECTURES, TrainConfig, config_for
from covidxray.errors import DataError

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "covidxray"
LINT = Path(sys.executable).with_name("lint-imports")
MAX_LINES = 400  # per module
MAX_FUNCTION_LINES = 80  # per function or method, decorators and docstring included


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _lint_with(tmp_path: Path, module: str, text: str) -> subprocess.CompletedProcess:
    """import-linter on a copy of the package with ``text`` appended to ``module``."""
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "covidxray", ignore=shutil.ignore_patterns("__pycache__", "web", "bundled"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(src / "covidxray" / module, "a") as f:
        f.write(text)
    return _lint(tmp_path, src)


def test_layers_and_serving_contracts_are_kept():
    r = _lint(REPO, REPO / "src")
    assert r.returncode == 0, r.stdout + r.stderr
    for contract in ("covidxray layers", "serving imports nothing of training", "the predictor needs no plotting"):
        assert contract in r.stdout, r.stdout
    assert "3 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module, cycle", [
    # A function-level import still counts: this is how the old six-module cycle hid.
    ("imaging.py", "\n\ndef _late():\n    from .predictor import Predictor\n    return Predictor\n"),
    ("calibration.py", "\nfrom .evaluate import evaluate_run  # noqa\n"),
])
def test_an_import_that_closes_a_cycle_fails(tmp_path: Path, module: str, cycle: str):
    r = _lint_with(tmp_path, module, cycle)
    assert r.returncode != 0 and "BROKEN" in r.stdout, r.stdout + r.stderr
    assert f"covidxray.{module.removesuffix('.py')} is not allowed to import" in r.stdout


@pytest.mark.parametrize("module, line, contract", [
    # Indirect: explain may import report (a lower layer), but the server and the DICOM node import explain.
    ("explain.py", "\nfrom .report import json_safe  # noqa\n", "serving imports nothing of training"),
    ("predictor.py", "\nfrom .cache import readable_images  # noqa\n", "serving imports nothing of training"),
    ("familiarity.py", "\n\ndef _late():\n    import sklearn  # noqa\n", "the predictor needs no plotting"),
    ("segment.py", "\nimport matplotlib  # noqa\n", "the predictor needs no plotting"),
])
def test_a_training_import_on_the_serving_path_fails(tmp_path: Path, module: str, line: str, contract: str):
    """Serving (predictor, server, DICOM node, batch) reaches no training module or plotting, even through a helper."""
    r = _lint_with(tmp_path, module, line)
    assert r.returncode != 0, r.stdout + r.stderr
    assert contract in r.stdout and "BROKEN" in r.stdout.split(contract)[1].splitlines()[0], r.stdout


def test_importing_the_predictor_loads_no_training_code():
    """What `import covidxray.predictor` really loads (the contracts see only covidxray's own imports)."""
    code = ("import sys, covidxray.predictor; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'imagehash', 'sklearn') "
            "or m in ('covidxray.data', 'covidxray.cache', 'covidxray.engine', 'covidxray.report')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert r.stdout.strip() == "[]"


def test_every_module_is_small():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_function_is_short():
    """A function over 80 lines is steps without names: split it into named steps (no exceptions listed here)."""
    long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if (n := node.end_lineno - first + 1) > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(PACKAGE)}:{node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_environment_is_read_in_one_place():
    """`covidxray.config.settings` reads $COVIDXRAY_*; `distributed` reads torchrun's own variables (RANK, WORLD_SIZE)."""
    readers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if re.search(r"os\.environ|os\.getenv|getenv\(", p.read_text()))
    assert readers == ["config.py", "distributed.py"], readers
    assert "COVIDXRAY_" not in (PACKAGE / "distributed.py").read_text()


def test_settings_read_the_environment_given():
    from covidxray.config import Settings, settings

    assert settings({}) == Settings(None, None, None, None, None)
    env = {"COVIDXRAY_DATA": "/d", "COVIDXRAY_MODEL": "/m", "COVIDXRAY_CACHE": "", "COVIDXRAY_API_KEY": "k",
           "COVIDXRAY_MAX_UPLOAD_MB": "2.5"}
    assert settings(env) == Settings(data="/d", model="/m", cache=None, api_key="k", max_upload_mb=2.5)  # empty is unset
    with pytest.raises(DataError, match="COVIDXRAY_MAX_UPLOAD_MB='lots' is not a number"):
        settings({"COVIDXRAY_MAX_UPLOAD_MB": "lots"})


def test_help_does_not_import_torch():
    code = ("import sys; from covidxray.cli import build_parser; p = build_parser(); "
            "p.format_help(); [a.choices[c].format_help() for a in p._subparsers._group_actions for c in a.choices]; "
            "print(sorted(m for m in ('torch', 'numpy', 'sklearn', 'matplotlib', 'PIL') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.strip() == "[]"


def test_architectures_listed_for_the_parser_are_the_registry():
    from covidxray.models import REGISTRY

    assert set(ARCHITECTURES) == set(REGISTRY)


def test_every_train_config_field_has_exactly_one_flag():
    from covidxray.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    dests = [a.dest for a in train._actions if a.dest not in ("help", "resume")]
    assert sorted(dests) == sorted(f.name for f in fields(TrainConfig))
    args = train.parse_args(["--data", "d.csv", "--no-freeze", "--size", "96", "--weights", "none", "--label-smoothing", "0"])
    cfg = config_for(args.recipe, **{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "recipe"})
    assert (cfg.freeze, cfg.size, cfg.weights, cfg.label_smoothing, cfg.lr) == (False, 96, "none", 0.0, 1e-3)


def test_config_for_refuses_a_misspelt_option():
    with pytest.raises(DataError, match="unknown training option.*lerning_rate"):
        config_for("default", lerning_rate=0.1)
