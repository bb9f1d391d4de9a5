"""Shared fixtures: the real data set from ../shared (or $COVIDXRAY_DATA) and one small trained run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from postgres import HINT, PostgresServer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("COVIDXRAY_DATA", REPO.parent / "shared" / "datasets" / "covid-cxr"))
    if not (root / "manifest.csv").is_file():
        pytest.fail(f"the shared X-ray data set is missing: {root}/manifest.csv (set COVIDXRAY_DATA)")
    return root


@pytest.fixture(scope="session")
def manifest(data_root: Path) -> Path:
    return data_root / "manifest.csv"


@pytest.fixture(scope="session")
def split_file() -> Path:
    return REPO / "splits" / "covid-cxr.csv"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, manifest: Path, split_file: Path, cache_dir: Path) -> Path:
    """A real (small) training run on shared X-rays: 400 train / 400 val images at 96 px, 3 epochs."""
    from covidxray.config import config_for
    from covidxray.engine import train

    out = tmp_path_factory.mktemp("run") / "small"
    cfg = config_for("default", data=str(manifest), splits=str(split_file), out=str(out), size=96, epochs=3,
                     limit=400, cache_dir=str(cache_dir), seed=1)
    return train(cfg)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one thread avoids spinning against other work on the same two cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def postgres():
    """One real PostgreSQL server for the session (`tests/postgres.py`); ``new_database()`` gives a test its own."""
    try:
        server = PostgresServer().start()
    except FileNotFoundError:
        pytest.fail(HINT)
    except subprocess.CalledProcessError as exc:  # initdb or pg_ctl refused: say what they said
        pytest.fail(f"PostgreSQL did not start: {exc.cmd[-1]}: {exc.stderr.decode(errors='replace')[-2000:]}")
    try:
        yield server
    finally:
        server.stop()
