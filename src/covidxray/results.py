"""The results database: one row per DICOM instance covidxray received, what it answered, and nothing about the patient.

A row holds the instance's SOP, study and series UIDs, when it was received and classified, the
answer (``covid``, ``normal``, ``not_answered`` with a reason, or ``error`` when the file could not
be read, with a reason), P(COVID-19), the threshold, the model and its weights hash, and the
unfamiliarity score when the model gives one. There is no column for a patient's name, ID, birth
date or any other identifying tag, and none is ever written: the DICOM header stays in the
listener's memory and spool.

Stores are reached through the small `ResultsStore` protocol (`covidxray.results_base`), chosen by
`open_results` from a URL or a path: SQLite, the embedded default (a file, WAL mode, so the
listener writes while ``covidxray results`` and the REST API read), or PostgreSQL
(`covidxray.results_pg`), for several listeners writing one database. Both build the same tables
by the same versioned migrations; a database newer than this covidxray is refused with a message
rather than misread.

Example:
    >>> store = open_results("results.db")
    >>> [row.label for row in store.recent(since="24h")]  # doctest: +SKIP
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .errors import ResultsError
from .results_base import (
    COLUMNS, SCHEMA_VERSION, ResultRow, ResultsStore, RowQueries, iso_utc, migration_sql, parse_since, utc_now,
)
from .results_pg import PostgresResults

__all__ = ["SCHEMA_VERSION", "ResultRow", "ResultsStore", "SqliteResults", "PostgresResults", "open_results",
           "iso_utc", "parse_since", "utc_now"]


class SqliteResults(RowQueries):
    """`ResultsStore` in an SQLite file (WAL journal; full sync, so a committed row survives a power cut).

    One connection, shared by the threads of a process under a lock; other processes read and
    write the same file concurrently (WAL readers never block the writer).

    Args:
        path: the database file; created with the current schema when missing, unless ``create`` is False.
        create: False to refuse a missing file (``covidxray results`` on a mistyped path).
    """

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise ResultsError(f"{self.path}: no results database here (`covidxray listen --db {self.path}` creates it)")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise ResultsError(f"{self.path}: not a usable SQLite results database ({exc})") from None
        self._lock = threading.Lock()

    def _migrate(self) -> None:
        if self._version() == SCHEMA_VERSION:
            return
        # Migrated under the write lock, the version read again there: a second process opening the file at the same
        # time (a listener and `serve --db`) waits, then finds it migrated, instead of running the same steps again.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for step in range(self._version() + 1, SCHEMA_VERSION + 1):  # the steps this file lacks, and the new version
                for statement in migration_sql("sqlite", step):
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _version(self) -> int:
        """The file's schema version; `ResultsError` for a file of other tables or of a newer covidxray."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and self._db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]:
            raise ResultsError(f"{self.path}: an SQLite file with other tables, not a covidxray results database")
        if version > SCHEMA_VERSION:
            raise ResultsError(f"{self.path}: results schema version {version}; this covidxray reads version "
                               f"{SCHEMA_VERSION} (use the covidxray that wrote it, or a new --db file)")
        return version

    def record(self, rows: Sequence[ResultRow], heatmaps: Mapping[str, bytes] | None = None) -> int:
        insert = f"INSERT OR IGNORE INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                self._db.executemany(insert, [tuple(getattr(r, c) for c in COLUMNS) for r in rows])
                added = self._db.total_changes - before
                self._db.executemany("INSERT OR IGNORE INTO heatmaps VALUES (?, ?)", list((heatmaps or {}).items()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return added

    def known(self, sop_instance_uids: Iterable[str]) -> set[str]:
        uids = list(sop_instance_uids)
        found: set[str] = set()
        with self._lock:
            for start in range(0, len(uids), 500):  # SQLite limits the number of parameters
                chunk = uids[start:start + 500]
                query = f"SELECT sop_instance_uid FROM results WHERE sop_instance_uid IN ({', '.join('?' * len(chunk))})"
                found.update(uid for uid, in self._db.execute(query, chunk))
        return found

    def heatmap(self, sop_instance_uid: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT png FROM heatmaps WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
        return row[0] if row else None

    def has_heatmaps(self, sop_instance_uids: Iterable[str]) -> set[str]:
        """The given UIDs that have a stored heat map."""
        uids = list(sop_instance_uids)
        with self._lock:
            query = f"SELECT sop_instance_uid FROM heatmaps WHERE sop_instance_uid IN ({', '.join('?' * len(uids))})"
            return {uid for uid, in self._db.execute(query, uids)} if uids else set()

    def set_report_status(self, sop_instance_uid: str, status: str) -> None:
        with self._lock:
            self._db.execute("UPDATE results SET report_status = ? WHERE sop_instance_uid = ?", (status, sop_instance_uid))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _select(self, tail: str, args: Sequence) -> list[ResultRow]:
        with self._lock:
            cursor = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM results {tail}", tuple(args))
            return [ResultRow(*values) for values in cursor]


def open_results(url: str | os.PathLike, create: bool = True) -> ResultsStore:
    """The results store that ``url`` names: a file path or ``sqlite:///path`` (SQLite, the embedded default),
    or ``postgresql://user@host/dbname`` (PostgreSQL, for several listeners or a hospital's database server).

    Args:
        url: where the results live.
        create: create a missing SQLite file or the tables in an empty PostgreSQL database (False: refuse).

    Raises:
        ResultsError: an unknown URL scheme, a missing file or empty database with ``create=False``, a
            database that is not a covidxray results database of this schema version, or a server
            that cannot be reached.
    """
    text = os.fspath(url)
    scheme, sep, rest = text.partition("://")
    if not sep or len(scheme) < 2:  # a plain path (a Windows drive letter is no scheme either)
        return SqliteResults(text, create)
    if scheme == "sqlite":
        return SqliteResults(rest[1:] if rest.startswith("/") else rest, create)
    if scheme in ("postgresql", "postgres"):
        return PostgresResults(text, create)
    raise ResultsError(f"{text}: no results store for '{scheme}://' "
                       "(supported: a file path, sqlite:///PATH or postgresql://USER@HOST/DBNAME)")
