"""``serve --workers N``: a listening socket per worker process, so the kernel spreads keep-alive connections."""

from __future__ import annotations

import csv
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from processes import free_port, spawned_pids
from covidxray.cli import main
from covidxray.server.workers import close, listening_sockets, run_workers


def test_each_worker_gets_a_socket_of_its_own_on_one_port():
    socks = listening_sockets("127.0.0.1", 0, 3)
    try:
        assert len({id(s) for s in socks}) == 3 and len({s.getsockname() for s in socks}) == 1
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in socks)
        for s in socks:
            s.listen()
        # A port in use, by another serve with SO_REUSEPORT too, is refused rather than shared with it.
        with pytest.raises(OSError):
            listening_sockets("127.0.0.1", socks[0].getsockname()[1], 2)
    finally:
        for s in socks:
            s.close()
    one, = listening_sockets("127.0.0.1", 0, 1)
    with one:
        assert not one.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)


def test_serve_with_workers_names_a_port_in_use(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--workers", "2", "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err


def connections_of(pid: int, port: int) -> int:
    """Established TCP connections to ``port`` whose socket process ``pid`` holds (Linux /proc)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            inodes.add(fields[9])
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            held.add(os.readlink(fd))
        except OSError:
            continue
    return sum(f"socket:[{inode}]" in held for inode in inodes)


@pytest.mark.slow
def test_keep_alive_connections_opened_together_reach_every_worker(manifest: Path, tmp_path: Path):
    """32 clients connect at once and keep their connections: with one shared socket the first worker to wake took
    them all; with a socket each, both workers serve some. A killed worker is started again on its socket."""
    with open(manifest, newline="") as f:
        film = (manifest.parent / next(csv.DictReader(f))["path"]).read_bytes()
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "covidxray", "serve", "--port", str(port), "--workers", "2"],
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready(started: int) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if log.read_text().count("Application startup complete") >= started and len(spawned_pids(proc.pid)) == 2:
                return
            time.sleep(0.25)
        raise AssertionError(log.read_text())

    try:
        ready(2)
        clients = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(32)]
        try:
            for c in clients:  # all connected within a millisecond, before any request: as a load's clients do
                c.connect()

            def post(c: http.client.HTTPConnection) -> int:
                c.request("POST", "/v1/predict?filename=a.png", film, {"Content-Type": "application/octet-stream"})
                response = c.getresponse()
                response.read()
                return response.status

            workers = spawned_pids(proc.pid)
            deadline = time.monotonic() + 60  # counted once every connection is accepted: before any request
            held = {pid: connections_of(pid, port) for pid in workers}
            while sum(held.values()) < 32 and time.monotonic() < deadline:
                time.sleep(0.1)
                held = {pid: connections_of(pid, port) for pid in workers}
            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(post, clients))
        finally:
            for c in clients:
                c.close()
        assert codes == [200] * 32
        # The kernel hashes each connection to a socket: 5 or fewer of 32 on one of two has a chance of 1 in 9,000.
        # One shared socket gave 31 and 1, twice (the first worker to wake accepts every connection waiting).
        assert sum(held.values()) == 32 and min(held.values()) >= 6, held

        os.kill(workers[0], signal.SIGKILL)
        ready(3)
        assert workers[0] not in spawned_pids(proc.pid)
        with ThreadPoolExecutor(8) as pool:  # new connections, some hashed to the new worker's socket
            codes = list(pool.map(lambda _: httpx.post(f"{url}/v1/predict", files={"file": ("a.png", film)},
                                                       timeout=60).status_code, range(16)))
        assert codes == [200] * 16
        assert "exited with -9; starting another on its socket" in log.read_text()
        workers += spawned_pids(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
    assert proc.returncode == 0 and not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_workers_that_cannot_load_the_app_stop_the_server(caplog):
    """A worker whose app fails to load exits with uvicorn's start-up failure, and every worker stops: it would fail
    again each time it was started (a bad results database, say), so it is not started again and again."""
    socks = listening_sockets("127.0.0.1", 0, 2)
    try:
        started = time.monotonic()
        assert run_workers({"app": "no_such_module_here:app", "log_level": "warning"}, socks) is False
    finally:
        close(socks)
    assert time.monotonic() - started < 60
    assert "could not start: stopping the others" in caplog.text


def _pid_of_a_worker(port: int) -> int | None:
    """The process ID a new connection to ``port`` is answered with (None: no answer within 5 s)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /pid HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
        return int(answer.rsplit(b"\r\n\r\n", 1)[1])
    except (OSError, ValueError, IndexError):
        return None


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie not yet reaped counts: it has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _until(condition, timeout_s: float = 60, stop: threading.Event | None = None):
    """``condition()``'s first true value, asked every 0.1 s; AssertionError after ``timeout_s`` or once ``stop`` is set."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_a_worker_that_hangs_is_killed_and_started_again(caplog):
    """A worker whose event loop is stuck answers nothing, yet the kernel keeps giving its socket a share of the new
    connections: its health checks go unanswered, so it is killed and another is started on its socket."""
    caplog.set_level("DEBUG", "covidxray.server.workers")
    socks = listening_sockets("127.0.0.1", 0, 2)
    port, seen, hung, returned = socks[0].getsockname()[1], {}, [], threading.Event()

    def drive() -> None:
        stuck = None
        try:
            first = _until(lambda: len(pids := {_pid_of_a_worker(port) for _ in range(8)} - {None}) == 2 and pids,
                           stop=returned)
            seen["first"] = first
            # Both have answered a health check (one that hangs before its first is given STARTUP_S to answer).
            _until(lambda: all(f"worker process {p} answers its health checks" in caplog.text for p in first), stop=returned)
            stuck = socket.create_connection(("127.0.0.1", port), timeout=5)  # a worker takes it, then hangs
            stuck.sendall(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
            hung.append(_until(lambda: next((p for p in first if connections_of(p, port)), None), stop=returned))
            _until(lambda: _gone(hung[0]), stop=returned)
            # Every new connection is answered again, by the worker left and the one started in its place.
            seen["after"] = _until(lambda: len(p := [_pid_of_a_worker(port) for _ in range(16)]) == 16 and None not in p
                                   and len(set(p)) == 2 and p, stop=returned)
        finally:
            if stuck is not None:
                stuck.close()
            if not returned.is_set():
                os.kill(os.getpid(), signal.SIGTERM)  # run_workers takes it: a graceful stop

    # A SIGTERM that arrives after run_workers has put the handler back is ignored, not the end of the test session.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    driver = threading.Thread(target=drive)
    try:
        driver.start()
        assert run_workers({"app": "workers_app:app", "log_level": "warning"}, socks, health_every_s=0.5,
                           health_timeout_s=3) is True
    finally:
        returned.set()
        driver.join()
        signal.signal(signal.SIGTERM, previous)
        close(socks)
    assert hung and f"worker process {hung[0]} did not answer a health check within 3 s: killing it" in caplog.text
    assert f"worker process {hung[0]} exited with -9; starting another on its socket" in caplog.text
    survivor = seen["first"] - {hung[0]}
    assert len(survivor) == 1 and survivor <= set(seen["after"]) and hung[0] not in seen["after"]
