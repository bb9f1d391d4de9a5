"""Shared fixtures: the real data set from ../shared (or $COVIDXRAY_DATA) and one small trained run.

Every test runs torch on one thread (`_one_torch_thread_everywhere`): on CPU a float result depends on
how a reduction is split over threads, so a model trained or evaluated with the machine's default
thread count differs from machine to machine; and on two busy cores a second OpenMP thread spins
against the other work instead of helping.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="session", autouse=True)
def _session_image_cache(cache_dir: Path) -> Iterator[None]:
    """Code that decodes with the default cache (export's int8 check, CLI runs without --cache-dir) uses
    the session's cache: a run decodes each split once, and no test writes into ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COVIDXRAY_CACHE", str(cache_dir))
        yield


@pytest.fixture(scope="session", autouse=True)
def _empty_site_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Commands that read the default site registry read an empty folder of the session's, never ~/.local."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COVIDXRAY_SITES", str(tmp_path_factory.mktemp("sites")))
        yield


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` intra-op threads inside the block, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_everywhere() -> Iterator[None]:
    """One torch thread for the whole session (see the module docstring), and for the programs tests start."""
    with torch_threads(1), pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("MKL_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module; kept explicit where a module depends on it (e.g. parity tolerances)."""
    with torch_threads(1):
        yield


@pytest.fixture
def crash_in_second_epoch(monkeypatch: pytest.MonkeyPatch):
    """A context manager: training inside it raises KeyboardInterrupt as its second epoch starts (a simulated crash,
    for the resume tests); outside it training runs as usual."""
    from covidxray import engine  # training code: only these tests need it

    @contextmanager
    def crashing() -> Iterator[None]:
        real = engine.train_one_epoch

        def crash(*args, **kwargs):
            if args[7] == 1:  # epoch index
                raise KeyboardInterrupt("simulated crash")
            return real(*args, **kwargs)

        monkeypatch.setattr(engine, "train_one_epoch", crash)
        try:
            yield
        finally:
            monkeypatch.setattr(engine, "train_one_epoch", real)

    return crashing


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, manifest: Path, split_file: Path, cache_dir: Path) -> Path:
    """A real (small) training run on shared X-rays: 400 train / 400 val images at 96 px, 3 epochs.

    Bit-for-bit the same run on every machine with the same CPU kind: seeded, deterministic kernels
    and one thread, set here because a session fixture is built before any module's thread fixture.
    """
    from covidxray.config import config_for
    from covidxray.engine import train

    out = tmp_path_factory.mktemp("run") / "small"
    cfg = config_for("default", data=str(manifest), splits=str(split_file), out=str(out), size=96, epochs=3,
                     limit=400, cache_dir=str(cache_dir), seed=1, deterministic=True)
    with torch_threads(1):
        return train(cfg)


@pytest.fixture(scope="session")
def test_evaluation(trained_run: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A copy of the trained run after `covidxray evaluate --split test`: its ``eval-test/`` holds the report.

    Evaluating the whole test split (1,111 films through the input gate and the model) is among the
    suite's dearest steps, so the tests that need a test report (the model cards) share this one.
    """
    from covidxray.checkpoint import copy_model
    from covidxray.cli import main

    run = copy_model(trained_run, tmp_path_factory.mktemp("evaluated") / "run")
    assert main(["evaluate", str(run), "--split", "test", "--bootstrap", "100", "--cache-dir", str(cache_dir)]) == 0
    return run


@pytest.fixture(scope="session")
def val_evaluation(trained_run: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """`covidxray evaluate --split val` of a copy of the trained run whose temperature is set to 2.5: the report folder.

    The temperature is deliberately off (the fitted one is near 1), so the report's calibrated and
    uncalibrated numbers differ; the report's other contents do not depend on it. Shared by the
    calibration and evaluation tests for the same reason as `test_evaluation`.
    """
    from covidxray.checkpoint import copy_model, update_model_meta
    from covidxray.cli import main

    run = copy_model(trained_run, tmp_path_factory.mktemp("val-evaluated") / "run")
    update_model_meta(run, {"temperature": 2.5})
    out = run / "eval-val"
    assert main(["evaluate", str(run), "--split", "val", "--out", str(out), "--bootstrap", "200",
                 "--cache-dir", str(cache_dir)]) == 0
    return out


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
