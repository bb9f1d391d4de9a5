"""Crash safety: a training run killed with SIGKILL resumes to the very same result, and a kill in
the middle of a checkpoint write never leaves a broken checkpoint behind.

Both tests use real processes and real signals (no exception raised in-process, as
test_engine.py does): SIGKILL cannot be caught, so nothing after it runs — no ``finally``, no
cleanup, no flush.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from covidxray.checkpoint import load_model, load_state, read_state_header

pytestmark = pytest.mark.slow

EXE = Path(sys.executable).with_name("covidxray")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
EPOCHS, STEPS = 3, 40  # 160 training images in batches of 4: long enough an epoch to kill inside it
TIMING = {"train_seconds", "val_seconds", "img_per_s"}  # wall-clock fields, the only ones allowed to differ


def _train_args(manifest: Path, split_file: Path, out: Path, cache: Path) -> list[str]:
    return [str(EXE), "train", "--data", str(manifest), "--splits", str(split_file), "--recipe", "fast",
            "--limit", "160", "--size", "64", "--batch-size", "4", "--epochs", str(EPOCHS), "--patience", "0",
            "--seed", "7", "--deterministic", "--out", str(out), "--cache-dir", str(cache)]


def _kill_during_epoch_2(args: list[str]) -> str:
    """Run ``args``, SIGKILL it once its progress bar shows a few steps of epoch 2; returns its stderr."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    progress = re.compile(rf"epoch 2/{EPOCHS}:.*?\|\s*(\d+)/{STEPS}\b")
    seen = bytearray()

    def watch() -> None:
        while chunk := proc.stderr.read1(4096):
            seen.extend(chunk)
            tail = seen[-400:].decode(errors="replace")
            if any(int(m) >= 4 for m in progress.findall(tail)) and proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    proc.wait(timeout=600)
    reader.join(timeout=10)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed mid-training:\n{seen.decode()[-2000:]}"
    return seen.decode(errors="replace")


def _comparable(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path: Path, manifest: Path, split_file: Path):
    cache = tmp_path / "cache"
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    subprocess.run(_train_args(manifest, split_file, full, cache), check=True, env=ENV, capture_output=True, timeout=600)

    _kill_during_epoch_2(_train_args(manifest, split_file, crashed, cache))
    # Killed inside epoch 2: epoch 1's files are on disk, complete and loadable; nothing of epoch 2 is.
    assert [h["epoch"] for h in json.loads((crashed / "history.json").read_text())] == [1]
    assert read_state_header(crashed / "last.safetensors")["epoch"] == 0
    assert load_model(crashed)[1]["epoch"] == 1

    resumed = subprocess.run([str(EXE), "train", "--resume", str(crashed)], env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "Traceback" not in resumed.stderr

    h_full = json.loads((full / "history.json").read_text())
    h_res = json.loads((crashed / "history.json").read_text())
    assert [h["epoch"] for h in h_res] == list(range(1, EPOCHS + 1))
    assert _comparable(h_res) == _comparable(h_full)  # losses, AUCs, accuracies, learning rates: bit for bit

    m_full = json.loads((full / "model.json").read_text())
    m_res = json.loads((crashed / "model.json").read_text())
    for key in ("epoch", "val_auc", "threshold", "temperature", "weights_sha256"):
        assert m_res.get(key) == m_full.get(key), key
    w_full, w_res = load_file(full / "model.safetensors"), load_file(crashed / "model.safetensors")
    assert w_full.keys() == w_res.keys() and all(torch.equal(w_full[k], w_res[k]) for k in w_full)


# ---------------------------------------------------------------------------------------------- killed while writing

WRITER = textwrap.dedent("""
    import os, sys, time
    import torch
    from covidxray.checkpoint import save_state

    path, mode = sys.argv[1], sys.argv[2]
    model = torch.nn.Linear(4096, 4096)  # 64 MiB of weights: each write takes a while
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    i = 0
    while True:
        with torch.no_grad():
            model.weight.fill_(i)  # the tensors say which write they came from, like the header
        save_state(path, {"model": model}, opt, {"epoch": i})
        print(f"saved {i}", flush=True)
        if mode == "stall":  # from the second write on, hang after the bytes are written, before the rename
            def stall(fd):
                print("in-fsync", flush=True)
                time.sleep(3600)
            os.fsync = stall
        i += 1
""")


def _writer(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "state" / "last.safetensors"
    path.parent.mkdir(exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(script), str(path), mode], stdout=subprocess.PIPE, text=True, env=ENV)
    return proc, path


def _check_state(path: Path, written: set[int]) -> int:
    """The file at ``path`` loads, and its header and tensors come from one and the same write."""
    model = torch.nn.Linear(4096, 4096)
    header = load_state(path, {"model": model}, torch.optim.SGD(model.parameters(), lr=0.1))
    epoch = header["epoch"]
    assert epoch in written
    assert torch.all(model.weight == epoch)
    return epoch


def test_kill_inside_a_checkpoint_write_keeps_the_previous_one(tmp_path: Path):
    proc, path = _writer(tmp_path, "stall")
    try:
        assert proc.stdout.readline().strip() == "saved 0"
        assert proc.stdout.readline().strip() == "in-fsync"  # write 1 is complete in its temp file
    finally:
        proc.kill()
        proc.wait()
    assert _check_state(path, {0}) == 0
    leftovers = [p.name for p in path.parent.iterdir() if p != path]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.safetensors.") and leftovers[0].endswith(".tmp")


@pytest.mark.parametrize("seed", range(4))
def test_kill_at_a_random_moment_leaves_a_loadable_checkpoint(tmp_path: Path, seed: int):
    proc, path = _writer(tmp_path, "loop")
    written: set[int] = set()
    try:
        assert proc.stdout.readline().strip() == "saved 0"
        written.add(0)
        timer = threading.Timer(random.Random(seed).uniform(0.0, 1.5), proc.kill)
        timer.start()
        for line in proc.stdout:  # ends when the kill closes the pipe
            written.add(int(line.split()[1]))
        timer.join()
    finally:
        proc.kill()
        proc.wait()
    # The write in flight may have been renamed into place before the kill, but not reported yet.
    assert _check_state(path, written | {max(written) + 1}) >= max(written)
