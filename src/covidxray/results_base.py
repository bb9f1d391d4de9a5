"""What every results store shares: the row, the store protocol, the schema and its migrations, and times.

The SQLite store (`covidxray.results`) and the PostgreSQL store (`covidxray.results_pg`) both build
their tables from `MIGRATIONS`, one step per schema version, written once with two type words
that differ between the engines (``{real}``, ``{blob}``). A database records which version it is
at; opening one applies the steps it lacks, in order, and refuses one newer than this covidxray.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Iterable, Mapping, Protocol, Sequence

from .errors import ResultsError

__all__ = ["COLUMNS", "MIGRATIONS", "SCHEMA_VERSION", "ResultRow", "ResultsStore", "RowQueries", "iso_utc", "migration_sql",
           "parse_since", "redact", "utc_now"]

# One entry per schema version: the DDL that takes a database from the version before to this one.
MIGRATIONS: tuple[str, ...] = (
    """
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
        probability {real},
        threshold {real},
        model TEXT,
        weights_sha256 TEXT,
        unfamiliarity {real},
        report_status TEXT
    );
    CREATE INDEX results_received_at ON results (received_at);
    CREATE TABLE heatmaps (
        sop_instance_uid TEXT PRIMARY KEY REFERENCES results (sop_instance_uid),
        png {blob} NOT NULL
    );
    """,
    # 2: the onboarded site whose threshold decided (covidxray.sites); NULL: site not onboarded, the model's threshold.
    """
    ALTER TABLE results ADD COLUMN site TEXT
    """,
    # 3: how the site decided: 'head' (its own head gave P(COVID-19), site add --refit-head) or 'threshold'; NULL: no site.
    """
    ALTER TABLE results ADD COLUMN site_decision TEXT
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
_TYPES = {"sqlite": {"real": "REAL", "blob": "BLOB"}, "postgresql": {"real": "DOUBLE PRECISION", "blob": "BYTEA"}}
_PASSWORD = re.compile(r"(://[^:/@]+:)[^@]*@")
_SINCE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def migration_sql(engine: str, version: int) -> list[str]:
    """The statements of migration step ``version`` (1 = create the first schema) for ``engine``."""
    text = MIGRATIONS[version - 1].format(**_TYPES[engine])
    return [statement.strip() for statement in text.split(";") if statement.strip()]


def redact(url: str) -> str:
    """A database URL fit for messages and logs: the password, if any, masked."""
    return _PASSWORD.sub(r"\1***@", url)


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
    site: str | None = None  # the onboarded site whose threshold decided; None: site not onboarded (the model's threshold)
    site_decision: str | None = None  # "head": the site's own head gave P(COVID-19); "threshold": only its threshold

    def to_dict(self) -> dict:
        return asdict(self)


COLUMNS = tuple(f.name for f in fields(ResultRow))


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


class RowQueries:
    """The reads both stores phrase alike, over their own ``_select(tail, args)``; ``_param`` is the engine's placeholder."""

    _param = "?"

    def _select(self, tail: str, args: Sequence) -> list[ResultRow]:
        raise NotImplementedError

    def get(self, sop_instance_uid: str) -> ResultRow | None:
        rows = self._select(f"WHERE sop_instance_uid = {self._param}", (sop_instance_uid,))
        return rows[0] if rows else None

    def recent(self, since: str | None = None, limit: int | None = None) -> list[ResultRow]:
        """Rows received at or after ``since`` (see `parse_since`), newest first; at most ``limit``."""
        where, args = (f"WHERE received_at >= {self._param}", [parse_since(since)]) if since else ("", [])
        tail = f" LIMIT {self._param}" if limit is not None else ""
        return self._select(f"{where} ORDER BY received_at DESC, sop_instance_uid{tail}",
                            (*args, *([limit] if limit is not None else [])))


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
