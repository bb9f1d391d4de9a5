"""``serve --workers N``: N uvicorn processes, each accepting connections on a listening socket of its own.

uvicorn's own workers share one listening socket, and the process that wakes first accepts every connection that is
waiting. A client's 8 keep-alive connections, opened together, then often all went to one of two workers, which
served them alone for the whole run: 164 requests/s on 1.5 of 2 cores, against 199 on 1.9 with a socket each
(`bench/load.py` on an idle 2-core machine; README, *REST API*). Here each worker gets its own socket, bound to the same port with ``SO_REUSEPORT``, and the
kernel spreads new connections over the sockets by their addresses. Elsewhere than on Linux (BSD's and macOS's
``SO_REUSEPORT`` does not spread them), or without it, the workers share one socket, as uvicorn's do.

A worker that dies is started again on its socket (the connections the kernel gave that socket meanwhile wait in its
queue); a worker that fails before it serves, or dies soon after its start three times running, stops them all. The
sockets listen from the start, so connections made while the workers load their models wait rather than fail, and a
second ``serve`` on the same port is refused at once.

A worker that hangs (its event loop stuck, so it answers nothing, while the kernel still gives its socket a share of
the new connections) is killed and started again: each worker also serves on a Unix socket of its own, in a private
folder, and ``GET /healthz`` is asked there, of every worker at once, `HEALTH_EVERY_S` after the last round. A worker
that answered before and does not within `HEALTH_TIMEOUT_S`, or has not answered once `STARTUP_S` after its start, is
killed (SIGKILL); it is then started again like any worker that died.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from uvicorn.config import STARTUP_FAILURE

__all__ = ["close", "listening_sockets", "run_workers"]

log = logging.getLogger(__name__)

QUICK_DEATH_S, QUICK_DEATHS = 10.0, 3  # a worker that dies this soon after its start, this many times running, stops all
# A health check every 10 s; 30 s to answer (the event loop only hands work to threads: the API's decoding and model
# calls run in them); 300 s to answer a first time (loading the model takes seconds).
HEALTH_EVERY_S, HEALTH_TIMEOUT_S, STARTUP_S = 10.0, 30.0, 300.0


def listening_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """``n`` sockets bound to ``host:port`` with ``SO_REUSEPORT``, one per worker (Linux); elsewhere one socket ``n`` times.

    The port is first bound alone, without ``SO_REUSEPORT``: a port in use (by another ``serve`` too, which the kernel
    would otherwise let share it) is an `OSError` here, as with one socket. Port 0: a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def bound(port: int, reuse_port: bool) -> socket.socket | None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            except (AttributeError, OSError):  # no SO_REUSEPORT on this platform
                sock.close()
                return None
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        return sock

    alone = bound(port, reuse_port=False)
    if n > 1 and sys.platform.startswith("linux"):  # BSD's and macOS's SO_REUSEPORT give every connection to one socket
        port = alone.getsockname()[1]
        alone.close()
        socks: list[socket.socket | None] = []
        try:
            for _ in range(n):
                socks.append(bound(port, reuse_port=True))
        except OSError:
            close(socks)
            raise
        if all(socks):
            return _listening(socks)  # type: ignore[arg-type]
        close(socks)
        log.warning("no SO_REUSEPORT here: the %d workers share one listening socket", n)
        alone = bound(port, reuse_port=False)
    return _listening([alone] * n)  # type: ignore[list-item]


def _listening(socks: list[socket.socket]) -> list[socket.socket]:
    """``socks``, listening at once: connections made while the workers load their models wait in the queue, and
    another ``serve``'s first bind to the port fails meanwhile (two bound sockets that do not listen may share it)."""
    for sock in {id(s): s for s in socks}.values():
        sock.listen(2048)
    return socks


def close(socks: list[socket.socket | None]) -> None:
    for sock in socks:
        if sock is not None:
            sock.close()


def _stop_with_parent() -> None:
    """SIGTERM this worker once the process that started it is gone (killed: nothing else would stop the worker)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGTERM)


def _answers(path: Path, timeout_s: float) -> bool:
    """Whether the worker behind the Unix socket ``path`` answers ``GET /healthz`` with 200 within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n")
            head = b""
            while len(head) < 12 and (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if not (chunk := sock.recv(12 - len(head))):
                    break
                head += chunk
            return head == b"HTTP/1.1 200"
    except OSError:  # refused, reset, timed out
        return False


def _check_health(processes: dict, started_at: dict[int, float], controls: list[Path], done: threading.Event,
                  every_s: float, timeout_s: float) -> None:
    """Until ``done``: ``every_s`` after each round, ask every worker's control socket for ``/healthz`` (all at once),
    and kill a worker that does not answer within ``timeout_s`` though it answered before, or has not answered
    `STARTUP_S` after its start. The main loop then starts another, as for any worker that died."""
    served: set = set()  # the worker processes that have answered once
    with ThreadPoolExecutor(len(controls), thread_name_prefix="covidxray-health") as pool:
        while not done.wait(every_s):
            try:
                now = dict(processes)
                answered = dict(zip(now, pool.map(lambda i: _answers(controls[i], timeout_s), now)))
                for i, process in now.items():
                    if answered[i]:
                        if process not in served:
                            log.debug("worker process %d answers its health checks", process.pid)
                        served.add(process)
                    elif (not done.is_set() and process.exitcode is None and processes.get(i) is process  # not gone
                          and (process in served or time.monotonic() - started_at[i] > STARTUP_S)):
                        log.error("worker process %d did not answer a health check within %g s: killing it",
                                  process.pid, timeout_s)
                        process.kill()
                served &= set(processes.values())
            except Exception:  # noqa: BLE001 - the checks must go on; a dead thread would end them without a word
                log.exception("the workers' health check failed; trying again in %g s", every_s)


@contextlib.contextmanager
def _control_sockets(n: int) -> Iterator[list[socket.socket]]:
    """A listening Unix socket per worker, where its health is asked, in a folder of this user's only (0700); both are
    gone afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="covidxray-workers-"))
    if len(os.fsencode(folder / f"worker-{n}.sock")) > 100:  # a Unix socket's path holds 107 bytes: a long TMPDIR
        shutil.rmtree(folder)
        folder = Path(tempfile.mkdtemp(prefix="covidxray-workers-", dir="/tmp"))
    socks: list[socket.socket] = []
    try:
        for i in range(n):
            socks.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            socks[-1].bind(str(folder / f"worker-{i}.sock"))
            socks[-1].listen()
        yield socks
    finally:
        close(socks)  # type: ignore[arg-type]
        shutil.rmtree(folder, ignore_errors=True)


def _worker(options: dict[str, Any], sock: socket.socket, control: socket.socket) -> None:
    """One worker process: a uvicorn server on ``sock`` and its ``control`` socket (uvicorn handles SIGINT and SIGTERM:
    a graceful stop)."""
    import uvicorn

    threading.Thread(target=_stop_with_parent, name="covidxray-parent-watch", daemon=True).start()
    config = uvicorn.Config(**options)
    try:  # the app (its factory opens the results database): what fails here would fail in every worker started again
        config.load()
    except (Exception, SystemExit):
        logging.getLogger("uvicorn.error").exception("the app could not be loaded")
        sys.exit(STARTUP_FAILURE)
    try:
        uvicorn.Server(config).run(sockets=[sock, control])
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C's SIGINT again after its graceful stop
        pass


def run_workers(options: dict[str, Any], socks: list[socket.socket], health_every_s: float = HEALTH_EVERY_S,
                health_timeout_s: float = HEALTH_TIMEOUT_S) -> bool:
    """Run a uvicorn worker per socket until SIGINT, SIGTERM or SIGHUP; False when one could not start (the others are
    then stopped): it failed before serving, or died within `QUICK_DEATH_S` of its start `QUICK_DEATHS` times in a row.
    A worker that stops answering its health checks is killed and started again (`_check_health`).

    Args:
        options: `uvicorn.Config`'s arguments (the app as an import string: workers are spawned processes).
        socks: from `listening_sockets`.
        health_every_s, health_timeout_s: how often each worker is asked for ``/healthz``, and how long it has to answer.
    """
    context = multiprocessing.get_context("spawn")
    processes: dict[int, multiprocessing.process.BaseProcess] = {}  # by socket
    started_at: dict[int, float] = {}
    quick = dict.fromkeys(range(len(socks)), 0)  # deaths soon after a start, in a row

    def start(i: int) -> None:
        process = context.Process(target=_worker, args=(options, socks[i], controls[i]), name=f"covidxray-worker-{i}")
        process.start()
        started_at[i], processes[i] = time.monotonic(), process  # in this order: the health checks read both

    def failed(i: int) -> bool:
        """Whether worker ``i``'s exit ends the server (else it is started again)."""
        process = processes[i]
        quick[i] = quick[i] + 1 if time.monotonic() - started_at[i] < QUICK_DEATH_S else 0
        if process.exitcode == STARTUP_FAILURE or quick[i] >= QUICK_DEATHS:
            log.error("worker process %d %s: stopping the others", process.pid, "could not start"
                      if process.exitcode == STARTUP_FAILURE else f"exited with {process.exitcode} {quick[i]} times running")
            return True
        log.error("worker process %d exited with %s; starting another on its socket", process.pid, process.exitcode)
        return False

    with _control_sockets(len(socks)) as controls:
        stopping: list[int] = []
        previous = {sig: signal.signal(sig, lambda sig, _: stopping.append(sig))
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        done, ok = threading.Event(), True
        try:
            for i in range(len(socks)):
                start(i)
            threading.Thread(target=_check_health, args=(processes, started_at, [Path(c.getsockname()) for c in controls],
                                                         done, health_every_s, health_timeout_s),
                             name="covidxray-worker-health", daemon=True).start()
            while not stopping:
                wait([p.sentinel for p in processes.values()], timeout=0.5)
                for i, process in list(processes.items()):
                    if process.exitcode is None or stopping:
                        continue
                    if failed(i):
                        stopping.append(0)
                        ok = False
                    else:
                        start(i)
        finally:
            done.set()
            _stop(list(processes.values()))
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return ok


def _stop(processes: list[multiprocessing.process.BaseProcess]) -> None:
    """SIGTERM (uvicorn's graceful stop), then SIGKILL what is still running 30 s later."""
    for process in processes:
        if process.exitcode is None:
            process.terminate()
    deadline = time.monotonic() + 30
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.exitcode is None:
            process.kill()
            process.join()
