"""The results database: one row per DICOM instance covidxray received, what it answered, and nothing about the patient.

A row holds the instance's SOP, study and series UIDs, when it was received and classified, the
answer (``covid``, ``normal``, ``not_answered`` with a reason, or ``error`` when the file could not
be read, with a reason), P(COVID-19), the threshold, the model and its weights hash, and the
unfamiliarity score when the model gives one. There is no column for a patient's name, ID, birth
date or any other identifying tag, and none is ever written: the DICOM header stays in the
listener's memory and spool.

Stores are reached through the small `ResultsStore` protocol, chosen by `open_results` from a URL
or a path: SQLite today (a file, WAL mode, so the listener writes while ``covidxray results`` and
the REST API read), a server database such as PostgreSQL later behind the same methods. The schema
has no migrations but a version (SQLite's ``user_version``): a file of another version is refused
with a message rather than misread.

Example:
    >>> store = open_results("results.db")
    >>> [row.label for row in store.recent(since="24h")]  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

from .errors import ResultsError

__all__ = ["SCHEMA_VERSION", "ResultRow", "ResultsStore", "SqliteResults", "open_results", "iso_utc", "parse_since", "utc_now"]

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE results (
    sop_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    received_at TEXT NOT NULL,
    classified_at TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('covid', 'normal', 'not_answered', 'error')),
    reason TEXT,
    message TEXT,
    probability REAL,
    threshold REAL,
    model TEXT,
    weights_sha256 TEXT,
    unfamiliarity REAL,
    report_status TEXT
);
CREATE INDEX results_received_at ON results (received_at);
CREATE TABLE heatmaps (
    sop_instance_uid TEXT PRIMARY KEY REFERENCES results (sop_instance_uid),
    png BLOB NOT NULL
);
"""
_SINCE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def utc_now() -> str:
    """The current time as the database stores times: ISO 8601 in UTC, milliseconds (sorts as text)."""
    return iso_utc(datetime.now(timezone.utc))


def iso_utc(when: datetime) -> str:
    """``when`` as the database stores times: ISO 8601 in UTC, milliseconds."""
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class ResultRow:
    """What covidxray made of one received instance. Identifiers are DICOM UIDs only; no patient data."""

    sop_instance_uid: str  # the key: a resent instance is recorded once
    study_instance_uid: str
    series_instance_uid: str
    modality: str  # the header's Modality (CR, DX, CT, ...); empty when there is none
    received_at: str  # ISO 8601 UTC: when the instance was safely spooled (before the C-STORE answer)
    classified_at: str  # ISO 8601 UTC
    label: str  # covid (COVID-19 positive), normal, not_answered (see reason) or error (unreadable; see reason)
    reason: str | None = None  # a word: wrong_modality, lateral_view, no_pixel_data, undecodable, ...
    message: str | None = None  # the reason for people (no file name, no patient data)
    probability: float | None = None  # P(COVID-19); None when not answered
    threshold: float | None = None
    model: str | None = None  # architecture@input size
    weights_sha256: str | None = None
    unfamiliarity: float | None = None  # 0: typical of the training films ... 1: unlike any; None if not given
    report_status: str | None = None  # the structured report sent back: "sent", "failed: ...", None (not asked)

    def to_dict(self) -> dict:
        return asdict(self)


_COLUMNS = tuple(f.name for f in fields(ResultRow))


class ResultsStore(Protocol):
    """What the listener, ``covidxray results`` and the REST API need from a results database."""

    def record(self, rows: Sequence[ResultRow], heatmaps: Mapping[str, bytes] = ...) -> int:
        """Insert rows not yet present (by SOP Instance UID) in one transaction; returns how many were new."""

    def known(self, sop_instance_uids: Iterable[str]) -> set[str]:
        """The given UIDs that already have a row."""

    def get(self, sop_instance_uid: str) -> ResultRow | None: ...

    def recent(self, since: str | None = None, limit: int | None = None) -> list[ResultRow]:
        """Rows received at or after ``since`` (see `parse_since`), newest first."""

    def heatmap(self, sop_instance_uid: str) -> bytes | None:
        """The Grad-CAM overlay PNG stored with the row, if the listener made one."""

    def has_heatmaps(self, sop_instance_uids: Iterable[str]) -> set[str]:
        """The given UIDs that have a stored heat map."""

    def set_report_status(self, sop_instance_uid: str, status: str) -> None: ...

    def close(self) -> None: ...


class SqliteResults:
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
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            tables = self._db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
            if tables:
                raise ResultsError(f"{self.path}: an SQLite file with other tables, not a covidxray results database")
            self._db.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        elif version != SCHEMA_VERSION:
            raise ResultsError(f"{self.path}: results schema version {version}; this covidxray reads version "
                               f"{SCHEMA_VERSION} (use the covidxray that wrote it, or a new --db file)")

    def record(self, rows: Sequence[ResultRow], heatmaps: Mapping[str, bytes] | None = None) -> int:
        insert = f"INSERT OR IGNORE INTO results ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                self._db.executemany(insert, [tuple(getattr(r, c) for c in _COLUMNS) for r in rows])
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

    def get(self, sop_instance_uid: str) -> ResultRow | None:
        rows = self._select("WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return rows[0] if rows else None

    def recent(self, since: str | None = None, limit: int | None = None) -> list[ResultRow]:
        where, args = ("WHERE received_at >= ?", [parse_since(since)]) if since else ("", [])
        tail = " LIMIT ?" if limit is not None else ""
        return self._select(f"{where} ORDER BY received_at DESC, sop_instance_uid{tail}",
                            (*args, *([limit] if limit is not None else [])))

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
            cursor = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM results {tail}", tuple(args))
            return [ResultRow(*values) for values in cursor]


def open_results(url: str | os.PathLike, create: bool = True) -> SqliteResults:
    """The results store that ``url`` names: a file path or ``sqlite:///path`` (SQLite).

    Args:
        url: where the results live. A server database (``postgresql://...``) is not built in yet;
            it plugs in as another `ResultsStore` implementation here.
        create: create a missing SQLite file (False: refuse it).

    Raises:
        ResultsError: an unknown URL scheme, a missing file with ``create=False``, or a file that
            is not a covidxray results database of this schema version.
    """
    text = os.fspath(url)
    scheme, sep, rest = text.partition("://")
    if not sep or len(scheme) < 2:  # a plain path (a Windows drive letter is no scheme either)
        return SqliteResults(text, create)
    if scheme == "sqlite":
        return SqliteResults(rest[1:] if rest.startswith("/") else rest, create)
    raise ResultsError(f"{text}: no results store for '{scheme}://' (supported: a file path or sqlite:///PATH); "
                       "a server database plugs in as another ResultsStore in covidxray.results")


def parse_since(since: str) -> str:
    """A lower time bound as the database stores times (ISO 8601 UTC).

    Args:
        since: an ISO 8601 date or time (``2024-03-01``, ``2024-03-01T08:00``, with or without a UTC
            offset; without one it is UTC), or an age such as ``30m``, ``24h``, ``7d``, ``2w``.

    Raises:
        ResultsError: a value that is neither.
    """
    text = since.strip()
    age = _SINCE.fullmatch(text)
    if age:
        return iso_utc(datetime.now(timezone.utc) - timedelta(**{_UNITS[age.group(2)]: float(age.group(1))}))
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ResultsError(f"--since {since!r}: give an ISO date or time (2024-03-01, 2024-03-01T08:00Z) "
                           "or an age (30m, 24h, 7d)") from None
    return iso_utc(when if when.tzinfo else when.replace(tzinfo=timezone.utc))
