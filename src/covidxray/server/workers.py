"""``serve --workers N``: N uvicorn processes, each accepting connections on a listening socket of its own.

uvicorn's own workers share one listening socket, and the process that wakes first accepts every connection that is
waiting. A client's 8 keep-alive connections, opened together, then often all went to one of two workers, which
served them alone for the whole run: 164 requests/s on 1.5 of 2 cores, against 199 on 1.9 with a socket each
(`bench/load.py` on an idle 2-core machine; README, *REST API*). Here each worker gets its own socket, bound to the same port with ``SO_REUSEPORT``, and the
kernel spreads new connections over the sockets by their addresses. Elsewhere than on Linux (BSD's and macOS's
``SO_REUSEPORT`` does not spread them), or without it, the workers share one socket, as uvicorn's do.

A worker that dies is started again on its socket (the connections the kernel gave that socket meanwhile wait in its
queue); a worker that fails before it serves (uvicorn's exit code for that) stops them all.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import sys
from multiprocessing.connection import wait
from typing import Any

from uvicorn.config import STARTUP_FAILURE

__all__ = ["listening_sockets", "run_workers"]

log = logging.getLogger(__name__)


def listening_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """``n`` sockets bound to ``host:port`` with ``SO_REUSEPORT``, one per worker (Linux); elsewhere one socket ``n`` times.

    The port is first bound alone, without ``SO_REUSEPORT``: a port in use (by another ``serve`` too, which the kernel
    would otherwise let share it) is an `OSError` here, as with one socket. Port 0: a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def bound(port: int, reuse_port: bool) -> socket.socket | None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        except (AttributeError, OSError):  # no SO_REUSEPORT on this platform
            sock.close()
            return None
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(True)
        return sock

    alone = bound(port, reuse_port=False)
    if n == 1 or not sys.platform.startswith("linux"):  # BSD and macOS give every connection to one of the sockets
        return [alone] * n
    port = alone.getsockname()[1]
    alone.close()
    socks = [bound(port, reuse_port=True) for _ in range(n)]
    if all(socks):
        return socks
    for sock in filter(None, socks):
        sock.close()
    log.warning("no SO_REUSEPORT here: the %d workers share one listening socket", n)
    return [bound(port, reuse_port=False)] * n


def _worker(options: dict[str, Any], sock: socket.socket) -> None:
    """One worker process: a uvicorn server on ``sock`` (uvicorn handles SIGINT and SIGTERM: a graceful stop)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(**options)).run(sockets=[sock])


def run_workers(options: dict[str, Any], socks: list[socket.socket]) -> bool:
    """Run a uvicorn worker per socket until SIGINT or SIGTERM; False when one could not start (the others are stopped).

    Args:
        options: `uvicorn.Config`'s arguments (the app as an import string: workers are spawned processes).
        socks: from `listening_sockets`.
    """
    context = multiprocessing.get_context("spawn")
    stopping: list[int] = []
    previous = {sig: signal.signal(sig, lambda sig, _: stopping.append(sig)) for sig in (signal.SIGINT, signal.SIGTERM)}

    def start(i: int) -> multiprocessing.process.BaseProcess:
        process = context.Process(target=_worker, args=(options, socks[i]), name=f"covidxray-worker-{i}")
        process.start()
        return process

    processes, started = [start(i) for i in range(len(socks))], True
    try:
        while not stopping:
            wait([p.sentinel for p in processes], timeout=0.5)
            for i, process in enumerate(processes):
                if process.exitcode is None or stopping:
                    continue
                if process.exitcode == STARTUP_FAILURE:
                    log.error("worker process %d could not start: stopping the others", process.pid)
                    stopping.append(0)
                    started = False
                    break
                log.error("worker process %d exited with %s; starting another on its socket", process.pid, process.exitcode)
                processes[i] = start(i)
    finally:
        for process in processes:
            if process.exitcode is None:
                process.terminate()
        for process in processes:
            process.join(30)
            if process.exitcode is None:
                process.kill()
                process.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return started
