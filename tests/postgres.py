"""A real PostgreSQL server for tests: Debian's postgresql, in a temporary folder, on a free port.

Tests run as root here; PostgreSQL refuses to, so as root the server runs as the ``postgres``
user (``runuser``) in a folder that user owns. One server per test session (a few seconds to
start); each test gets a database of its own from `PostgresServer.new_database`.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg

HINT = "Debian's postgresql is needed: `make systemdeps` (which `make test` runs) or `apt-get install postgresql`"


def _pg_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)), None)
    return Path(found).parent if found else None


class PostgresServer:
    """A PostgreSQL started with `start`, stopped (and its folder removed) with `stop`."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        if self.bin is None:
            raise FileNotFoundError(HINT)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.home = Path(tempfile.mkdtemp(prefix="covidxray-pg-"))  # not under pytest's root-only folders
        self._as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_user:
            shutil.chown(self.home, "postgres", "postgres")
        self._names = itertools.count()

    def _pg(self, *args: str) -> None:
        subprocess.run([*self._as_user, *args], check=True, capture_output=True, timeout=120)

    def start(self, fsync: bool = False) -> "PostgresServer":
        """Start the server; ``fsync`` off by default (the tests kill listeners, never this server; it saves
        seconds on a busy disk), on for benchmarks that compare it with SQLite's durable commits."""
        data = self.home / "data"
        self._pg(str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        self._pg(str(self.bin / "pg_ctl"), "-D", str(data), "-w", "-l", str(self.home / "log"), "-o",
                 f"-p {self.port} -k {self.home} -h 127.0.0.1 {'' if fsync else '-F '}-c max_connections=50", "start")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"t{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._pg(str(self.bin / "pg_ctl"), "-D", str(self.home / "data"), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.home, ignore_errors=True)
