"""`ResultsStore` in PostgreSQL: one results database for several listeners, the REST API and ``covidxray results``.

The tables are those of the SQLite store (`covidxray.results_base.MIGRATIONS`), so a site can
start on the embedded file and move to the hospital's PostgreSQL without a new schema. The
version lives in a one-row table, ``covidxray_schema``; migrations run under an advisory lock, so
two listeners starting together do not both create the tables. Writes are idempotent by SOP
Instance UID (``ON CONFLICT DO NOTHING``): when a PACS sends one instance to two listeners, the
first committed answer is the one row, exactly as with SQLite.

Example:
    >>> store = PostgresResults("postgresql://covidxray@db.hospital/results")  # doctest: +SKIP
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import psycopg

from .errors import ResultsError
from .results_base import COLUMNS, SCHEMA_VERSION, ResultRow, RowQueries, migration_sql, redact

__all__ = ["PostgresResults"]

T = TypeVar("T")
_MIGRATION_LOCK = 0x636F7669  # pg_advisory_xact_lock key: "covi"; one migrating process at a time
_ROWS_PER_INSERT = 1000  # rows per INSERT statement: 16,000 parameters (16 columns), well below PostgreSQL's 65,535


class PostgresResults(RowQueries):
    """`ResultsStore` in a PostgreSQL database (``postgresql://user[:password]@host[:port]/dbname``).

    One connection per store, shared by a process's threads under a lock; every write is one
    transaction, every read one statement (atomic in autocommit). A broken connection (the server
    restarted) is replaced on the next call, so the listener's retry of a failed batch succeeds once
    the server is back.

    Args:
        url: a libpq connection URL.
        create: create the tables in an empty database (False: refuse one without them).
    """

    _param = "%s"

    def __init__(self, url: str, create: bool = True):
        self.url = url
        self._lock = threading.Lock()
        self._db = self._connect()
        try:
            self._migrate(create)
        except psycopg.Error as exc:  # e.g. a read-only role on the database of an earlier covidxray
            self._db.close()
            raise ResultsError(f"{redact(url)}: cannot bring the covidxray tables up to date "
                               f"({str(exc).strip().splitlines()[0]}); start `covidxray listen --db` on it once as "
                               "the role that owns them") from None
        except BaseException:
            self._db.close()
            raise

    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise ResultsError(f"{redact(self.url)}: cannot connect to the PostgreSQL results database "
                               f"({str(exc).strip().splitlines()[0]})") from None

    def _migrate(self, create: bool) -> None:
        with self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            has_table = self._db.execute("SELECT to_regclass('covidxray_schema') IS NOT NULL").fetchone()[0]
            version = self._db.execute("SELECT version FROM covidxray_schema").fetchone()[0] if has_table else 0
            if version > SCHEMA_VERSION:
                raise ResultsError(f"{redact(self.url)}: results schema version {version}; this covidxray reads "
                                   f"version {SCHEMA_VERSION} (use the covidxray that wrote it, or another database)")
            if version == SCHEMA_VERSION:
                return
            if not create and not has_table:  # an older schema is migrated, as SQLite's is; only an empty one refused
                raise ResultsError(f"{redact(self.url)}: no covidxray results here "
                                   f"(`covidxray listen --db {redact(self.url)}` creates them)")
            if not has_table:
                if self._db.execute("SELECT to_regclass('results') IS NOT NULL").fetchone()[0]:
                    raise ResultsError(f"{redact(self.url)}: a 'results' table that covidxray did not make; "
                                       "give covidxray a database of its own")
                self._db.execute("CREATE TABLE covidxray_schema (version INTEGER NOT NULL)")
                self._db.execute("INSERT INTO covidxray_schema VALUES (0)")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in migration_sql("postgresql", step):
                    self._db.execute(statement)
            self._db.execute("UPDATE covidxray_schema SET version = %s", (SCHEMA_VERSION,))

    def _run(self, work: Callable[[psycopg.Connection], T], write: bool = False) -> T:
        """``work(connection)``, on a fresh connection if the last one broke; a write in one transaction.

        A read is one statement, atomic by itself in autocommit: no BEGIN and COMMIT round trips.
        """
        with self._lock:
            if self._db.broken or self._db.closed:
                self._db = self._connect()
            if not write:
                return work(self._db)
            with self._db.transaction():
                return work(self._db)

    def record(self, rows: Sequence[ResultRow], heatmaps: Mapping[str, bytes] | None = None) -> int:
        values = [tuple(getattr(row, c) for c in COLUMNS) for row in rows]
        one = f"({', '.join(['%s'] * len(COLUMNS))})"

        def write(db: psycopg.Connection) -> int:
            added = 0
            # One multi-row INSERT per chunk, not one round trip per row: on a busy machine each round trip
            # waits for the server process to be scheduled (PostgreSQL's limit is 65,535 parameters a statement).
            for start in range(0, len(values), _ROWS_PER_INSERT):
                chunk = values[start:start + _ROWS_PER_INSERT]
                query = (f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES {', '.join([one] * len(chunk))} "
                         "ON CONFLICT (sop_instance_uid) DO NOTHING RETURNING sop_instance_uid")
                added += len(db.execute(query, [v for row in chunk for v in row]).fetchall())
            if heatmaps:
                with db.cursor() as cur:  # executemany pipelines the statements: one round trip
                    cur.executemany("INSERT INTO heatmaps VALUES (%s, %s) ON CONFLICT DO NOTHING", list(heatmaps.items()))
            return added
        return self._run(write, write=True)

    def known(self, sop_instance_uids: Iterable[str]) -> set[str]:
        return self._uids("results", sop_instance_uids)

    def has_heatmaps(self, sop_instance_uids: Iterable[str]) -> set[str]:
        """The given UIDs that have a stored heat map."""
        return self._uids("heatmaps", sop_instance_uids)

    def heatmap(self, sop_instance_uid: str) -> bytes | None:
        row = self._run(lambda db: db.execute("SELECT png FROM heatmaps WHERE sop_instance_uid = %s",
                                              (sop_instance_uid,)).fetchone())
        return bytes(row[0]) if row else None

    def set_report_status(self, sop_instance_uid: str, status: str) -> None:
        self._run(lambda db: db.execute("UPDATE results SET report_status = %s WHERE sop_instance_uid = %s",
                                        (status, sop_instance_uid)), write=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _uids(self, table: str, sop_instance_uids: Iterable[str]) -> set[str]:
        uids = list(sop_instance_uids)
        if not uids:
            return set()
        query = f"SELECT sop_instance_uid FROM {table} WHERE sop_instance_uid = ANY(%s)"
        return self._run(lambda db: {uid for uid, in db.execute(query, (uids,))})

    def _select(self, tail: str, args: Sequence[Any]) -> list[ResultRow]:
        query = f"SELECT {', '.join(COLUMNS)} FROM results {tail}"
        return self._run(lambda db: [ResultRow(*values) for values in db.execute(query, tuple(args))])
