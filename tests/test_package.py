"""The package as users get it: the bundled model and the web page are package data, found through
``importlib.resources``; a wheel built from the source tree carries them and nothing else, and once
installed in a fresh virtual environment it classifies an X-ray from any folder."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import covidxray
from covidxray.checkpoint import default_model_path, model_files, read_model_meta
from covidxray.data import data_fingerprint, load_samples
from covidxray.server.app import WEB_DIR

REPO = Path(__file__).resolve().parents[1]
PACKAGE = Path(covidxray.__file__).resolve().parent
BUNDLED = PACKAGE / "bundled"
WEB_FILES = {"index.html", "app.js", "app.css"}
# Built from a copy, so that setuptools' build/ and egg-info never land in (or leak stale files from) the checkout.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                     "cache", ".cache", ".whl", ".gl")


def test_default_model_is_package_data(monkeypatch):
    monkeypatch.delenv("COVIDXRAY_MODEL", raising=False)
    assert default_model_path() == BUNDLED
    assert all(f.is_file() for f in model_files(BUNDLED))
    monkeypatch.setenv("COVIDXRAY_MODEL", "/elsewhere/run")
    assert default_model_path() == Path("/elsewhere/run")


def test_web_page_is_package_data():
    assert WEB_DIR == PACKAGE / "web"
    assert WEB_FILES <= {p.name for p in WEB_DIR.iterdir()}


def test_bundled_split_is_the_one_the_model_was_trained_on(manifest: Path):
    # `covidxray demo` calls the bundled splits.csv's test images held out only because this holds.
    meta, _ = read_model_meta(BUNDLED)
    assert data_fingerprint(manifest, BUNDLED / "splits.csv") == meta["data_fingerprint"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of a copy of this checkout, built offline with the installed setuptools."""
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, tmp / "src-tree", ignore=_NOT_SOURCE)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
         str(tmp / "src-tree")],
        capture_output=True, text=True, timeout=600, env=_env(PIP_DISABLE_PIP_VERSION_CHECK="1"),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (found,) = (tmp / "dist").glob("covidxray-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; torch & co come from this interpreter's site-packages via a .pth file."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=60, env=_env()).stdout.strip()
    # Lines of a .pth file are appended to sys.path; .pth files inside those folders (the checkout's editable
    # install among them) are not run, so the only covidxray this venv can import is the one from the wheel.
    Path(purelib, "heavy_dependencies.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, timeout=300, env=_env(PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return env_dir


def _env(**extra: str) -> dict[str, str]:
    """This environment without anything that could point an installed covidxray back at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COVIDXRAY_MODEL", "PYTHONHOME")}
    return {**env, **extra}


@pytest.mark.slow
def test_wheel_carries_the_model_and_web_page_and_nothing_else(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names} == {"covidxray", f"covidxray-{covidxray.__version__}.dist-info"}  # no tests/, runs/
    assert {f"covidxray/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.py")} <= names
    assert {f"covidxray/web/{f}" for f in WEB_FILES} <= names
    shipped = {n.removeprefix("covidxray/bundled/") for n in names if n.startswith("covidxray/bundled/")}
    model = {p.name for p in BUNDLED.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".onnx")}
    assert {f.name for f in model_files(BUNDLED)} <= model
    assert shipped == model | {"splits.csv"}  # the reports, curves and audit beside them stay in the source tree
    assert not [n for n in names if n.endswith((".png", ".md"))]


@pytest.mark.slow
def test_installed_wheel_predicts_from_any_folder_with_its_own_model(venv: Path, manifest: Path, split_file: Path,
                                                                      tmp_path: Path):
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    python, cli = venv / "bin" / "python", venv / "bin" / "covidxray"

    def run(*cmd: str | Path, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300, env=_env(**env))

    assert run(cli, "--version").stdout.strip() == f"covidxray {covidxray.__version__}"
    r = run(python, "-m", "covidxray", "--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("predict", "demo", "serve"))

    where = json.loads(run(python, "-c", "import covidxray, json, sys; from covidxray.checkpoint import default_model_path; "
                                         "from covidxray.server.app import WEB_DIR; print(json.dumps({'file': covidxray.__file__, "
                                         "'model': str(default_model_path()), 'web': str(WEB_DIR), 'path': sys.path}))").stdout)
    installed = Path(where["file"]).parent
    assert installed.is_relative_to(venv) and Path(where["model"]) == installed / "bundled"
    assert Path(where["web"]) == installed / "web" and WEB_FILES <= {p.name for p in Path(where["web"]).iterdir()}
    assert not [p for p in where["path"] if p and Path(p).resolve().is_relative_to(REPO / "src")]

    # Change the installed copy's threshold: the answer must carry it, so it came from the package's own model.json.
    meta_file = installed / "bundled" / "model.json"
    meta = json.loads(meta_file.read_text())
    assert meta == json.loads((BUNDLED / "model.json").read_text())
    meta_file.write_text(json.dumps({**meta, "threshold": 0.4321}))
    image = next(s for s in load_samples(manifest, split_file) if s.split == "test")
    r = run(cli, "predict", image.path, "--format", "json")
    assert r.returncode == 0, r.stderr
    (answer,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert answer["threshold"] == 0.4321 and answer["label"] in ("covid", "normal") and 0 <= answer["probability"] <= 1

    # The demo finds the data through $COVIDXRAY_DATA and the held-out split through the shipped splits.csv.
    r = run(cli, "demo", "-n", "2", COVIDXRAY_DATA=str(manifest.parent))
    assert r.returncode == 0 and "correct on held-out test images" in r.stdout, r.stdout + r.stderr
