"""The results database (`covidxray.results`) and ``covidxray results``: one row per instance, versioned, no patient data.

The store's behaviour is tested on both backends, SQLite (a file) and PostgreSQL (a real server
the `postgres` fixture starts once per session); the engine-specific checks follow.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
from dataclasses import fields, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest

from covidxray.cli import main
from covidxray.errors import ResultsError
from covidxray.results import SCHEMA_VERSION, ResultRow, iso_utc, open_results, parse_since
from covidxray.results_base import MIGRATIONS, migration_sql


def _row(n: int, label: str = "normal", hours_ago: float = 0.0, **extra) -> ResultRow:
    when = iso_utc(datetime.now(timezone.utc) - timedelta(hours=hours_ago))
    answered = label in ("covid", "normal")
    return ResultRow(sop_instance_uid=f"1.2.3.{n}", study_instance_uid=f"1.2.4.{n}", series_instance_uid=f"1.2.5.{n}",
                     modality="CR", received_at=when, classified_at=when, label=label,
                     probability=0.9 if label == "covid" else 0.1 if answered else None, threshold=0.5,
                     model="tf_efficientnet_lite0@192px", weights_sha256="ab" * 32, **extra)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's results store lives: a new SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "r.db")
    return request.getfixturevalue("postgres").new_database()


def test_rows_round_trip_and_a_resend_is_recorded_once(url: str):
    store = open_results(url)
    rows = [_row(1, "covid"), _row(2), _row(3, "not_answered", reason="wrong_modality", message="CT, not a radiograph"),
            _row(4, "error", reason="no_pixel_data", message="DICOM file has no pixel data")]
    assert store.record(rows, {"1.2.3.1": b"\x89PNG fake"}) == 4
    assert store.record([replace(rows[0], label="normal", probability=0.2)]) == 0  # the first answer stays
    assert store.get("1.2.3.1") == rows[0] and store.get("9.9") is None
    assert store.known(["1.2.3.1", "1.2.3.4", "7.7.7"]) == {"1.2.3.1", "1.2.3.4"}
    assert store.heatmap("1.2.3.1") == b"\x89PNG fake" and store.heatmap("1.2.3.2") is None
    assert store.has_heatmaps(["1.2.3.1", "1.2.3.2"]) == {"1.2.3.1"}
    store.set_report_status("1.2.3.2", "sent")
    assert store.get("1.2.3.2").report_status == "sent"
    store.close()
    assert sorted(r.sop_instance_uid for r in open_results(url).recent()) == [f"1.2.3.{i}" for i in range(1, 5)]


def test_a_batch_larger_than_one_statement_is_recorded_whole(url: str):
    """PostgreSQL writes a batch as multi-row INSERTs of at most 1,000 rows: each chunk counts, resends do not."""
    store = open_results(url)
    assert store.record([_row(i) for i in range(1, 2502)]) == 2501
    assert store.record([_row(i) for i in range(2490, 2510)]) == 8  # 2502..2509 are new
    assert len(store.known(f"1.2.3.{i}" for i in range(1, 2600))) == 2509
    store.close()


def test_sqlite_file_is_wal_versioned_and_refuses_other_files(tmp_path: Path):
    open_results(tmp_path / "r.db").close()
    with sqlite3.connect(tmp_path / "r.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(ResultsError, match=rf"r\.db: results schema version 99; this covidxray reads version {SCHEMA_VERSION}"):
        open_results(tmp_path / "r.db")
    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(ResultsError, match="other tables"):
        open_results(tmp_path / "other.db")
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(ResultsError, match=r"junk\.db: not a usable SQLite"):
        open_results(tmp_path / "junk.db")


def test_store_is_chosen_by_url(tmp_path: Path):
    store = open_results(f"sqlite:///{tmp_path}/u.db")
    assert store.path == tmp_path / "u.db"
    store.close()
    with pytest.raises(ResultsError, match=r"mysql://.*postgresql://USER@HOST/DBNAME"):
        open_results("mysql://pacs-db/results")
    with pytest.raises(ResultsError, match="covidxray listen --db"):
        open_results(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_a_second_connection_reads_while_the_first_writes(url: str):
    writer, reader = open_results(url), open_results(url)
    for n in range(5):
        writer.record([_row(n)])
        assert len(reader.recent()) == n + 1


def test_recent_filters_by_time_and_limit(url: str):
    store = open_results(url)
    store.record([_row(1, hours_ago=50), _row(2, hours_ago=5), _row(3, hours_ago=0.1)])
    assert [r.sop_instance_uid for r in store.recent()] == ["1.2.3.3", "1.2.3.2", "1.2.3.1"]  # newest first
    assert [r.sop_instance_uid for r in store.recent(since="24h")] == ["1.2.3.3", "1.2.3.2"]
    assert [r.sop_instance_uid for r in store.recent(since="30m")] == ["1.2.3.3"]
    assert len(store.recent(since="2000-01-01")) == 3 and len(store.recent(limit=2)) == 2


@pytest.mark.parametrize("text, expected", [
    ("2024-03-01", "2024-03-01T00:00:00.000+00:00"),
    ("2024-03-01T08:00Z", "2024-03-01T08:00:00.000+00:00"),
    ("2024-03-01T10:00+02:00", "2024-03-01T08:00:00.000+00:00"),
])
def test_parse_since(text: str, expected: str):
    assert parse_since(text) == expected


def test_parse_since_refuses_nonsense():
    with pytest.raises(ResultsError, match=r"--since 'yesterday'.*24h"):
        parse_since("yesterday")


def test_no_column_can_hold_patient_data(tmp_path: Path):
    open_results(tmp_path / "r.db").close()
    with sqlite3.connect(tmp_path / "r.db") as db:
        columns = {c[1] for table in ("results", "heatmaps") for c in db.execute(f"PRAGMA table_info({table})")}
    assert columns == {f.name for f in fields(ResultRow)} | {"png"}
    assert not [c for c in columns if any(word in c for word in ("patient", "name", "birth", "accession", "sex"))]


def _version_1_database(url: str) -> None:
    """A database as a covidxray of schema version 1 left it (no ``site`` column), with one recorded row."""
    values = ("1.2.3.1", "1.2.4.1", "1.2.5.1", "CR", "t0", "t1", "normal", 0.1, 0.5)
    insert = ("INSERT INTO results (sop_instance_uid, study_instance_uid, series_instance_uid, modality, received_at, "
              "classified_at, label, probability, threshold) VALUES ({})")
    if "://" not in url:
        with sqlite3.connect(url) as db:
            db.executescript("; ".join(migration_sql("sqlite", 1)) + "; PRAGMA user_version = 1;")
            db.execute(insert.format(", ".join("?" * len(values))), values)
        return
    with psycopg.connect(url, autocommit=True) as db:
        for statement in migration_sql("postgresql", 1):
            db.execute(statement)
        db.execute("CREATE TABLE covidxray_schema (version INTEGER NOT NULL)")
        db.execute("INSERT INTO covidxray_schema VALUES (1)")
        db.execute(insert.format(", ".join(["%s"] * len(values))), values)


def test_a_version_1_database_gains_the_site_columns_and_keeps_its_rows(url: str):
    """Migration steps 2 and 3 add ``site`` and ``site_decision``: old rows read as not onboarded (NULL), new rows
    carry their site and how it decided."""
    _version_1_database(url)
    store = open_results(url)
    old = store.get("1.2.3.1")
    assert (old.label, old.probability, old.site, old.site_decision) == ("normal", 0.1, None, None)
    store.record([_row(2, "covid", site="st-elsewhere", site_decision="head"), _row(3, site="north", site_decision="threshold")])
    assert [(r.site, r.site_decision) for r in map(store.get, ("1.2.3.2", "1.2.3.3"))] == [
        ("st-elsewhere", "head"), ("north", "threshold")]
    store.close()
    assert SCHEMA_VERSION == len(MIGRATIONS) >= 3


def test_two_processes_opening_a_version_1_sqlite_file_at_once_both_migrate_it(tmp_path: Path, monkeypatch):
    """A listener and ``serve --db`` started together on an old file: the second to read the version must not run the
    migration the first has run meanwhile ("duplicate column name: site"). The other opener is let in right after this
    one reads the version; it gets half a second, as long as it needs when nothing holds the file."""
    path = tmp_path / "r.db"
    _version_1_database(str(path))
    connect, other = sqlite3.connect, {}

    class ReadVersionThenLetTheOtherIn:
        def __init__(self, db: sqlite3.Connection):
            self._db = db

        def __getattr__(self, name: str):
            return getattr(self._db, name)

        def execute(self, sql: str, *args):
            cursor = self._db.execute(sql, *args)
            if sql == "PRAGMA user_version" and "thread" not in other:
                def opener() -> None:
                    try:
                        open_results(path).close()
                    except Exception as exc:  # noqa: BLE001  (reported by the assertion below)
                        other["error"] = exc
                other["thread"] = threading.Thread(target=opener)
                other["thread"].start()
                other["thread"].join(0.5)
            return cursor

    monkeypatch.setattr("covidxray.results.sqlite3.connect",
                        lambda *a, **k: ReadVersionThenLetTheOtherIn(connect(*a, **k)) if "thread" not in other else connect(*a, **k))
    store = open_results(path)
    other["thread"].join(60)
    assert "error" not in other, other.get("error")
    assert store.get("1.2.3.1").site is None and store.record([_row(2, site="north")]) == 1
    store.close()


def test_the_results_command_reads_a_version_1_database(url: str, capsys: pytest.CaptureFixture):
    """`covidxray results` opens without ``create``: that refuses an empty database, not an older schema."""
    _version_1_database(url)
    assert main(["results", "--db", url, "--format", "json"]) == 0
    assert [json.loads(line)["sop_instance_uid"] for line in capsys.readouterr().out.splitlines()] == ["1.2.3.1"]


def test_a_reader_without_the_right_to_migrate_an_older_postgresql_database_gets_a_message(postgres, capsys):
    """A read-only role (a hospital's reporting account) on a database of an earlier covidxray: one line saying what
    is wrong and who can fix it, not a traceback."""
    url = postgres.new_database()
    _version_1_database(url)
    role = f"reader_{url.rsplit('/', 1)[1]}"
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(f"CREATE ROLE {role} LOGIN")
        db.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    assert main(["results", "--db", url.replace("postgres@", f"{role}@")]) == 2
    err = capsys.readouterr().err
    assert "cannot bring the covidxray tables up to date" in err and "must be owner of table results" in err


def test_results_command_in_every_format(url: str, tmp_path: Path, capsys: pytest.CaptureFixture):
    store = open_results(url)
    store.record([_row(1, "covid"), _row(2, "not_answered", reason="lateral_view", hours_ago=3)])
    store.close()
    assert main(["results", "--db", url, "--format", "json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["label"] for line in lines] == ["covid", "not_answered"]  # one object per line
    assert main(["results", "--db", url, "--format", "csv", "--since", "1h"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["sop_instance_uid"], r["label"], r["probability"]) for r in table] == [("1.2.3.1", "covid", "0.9")]
    assert main(["results", "--db", url]) == 0
    out = capsys.readouterr()
    assert "covid" in out.out and "0.9000" in out.out and "lateral_view" in out.out and "not a diagnosis" in out.err
    assert "not onboarded" in out.out  # neither row was decided at a site's threshold
    assert main(["results", "--db", str(tmp_path / "nope.db")]) == 2
    assert "nope.db: no results database here" in capsys.readouterr().err


def test_postgres_schema_is_versioned_and_refuses_other_databases(postgres):
    url = postgres.new_database()
    with pytest.raises(ResultsError, match="no covidxray results here.*covidxray listen --db"):
        open_results(url, create=False)
    open_results(url).close()
    open_results(url, create=False).close()  # now it is there
    with psycopg.connect(url, autocommit=True) as db:
        assert db.execute("SELECT version FROM covidxray_schema").fetchall() == [(SCHEMA_VERSION,)]
        db.execute("UPDATE covidxray_schema SET version = 99")
    with pytest.raises(ResultsError, match=f"results schema version 99; this covidxray reads version {SCHEMA_VERSION}"):
        open_results(url)
    other = postgres.new_database()
    with psycopg.connect(other, autocommit=True) as db:
        db.execute("CREATE TABLE results (x int)")
    with pytest.raises(ResultsError, match="a 'results' table that covidxray did not make"):
        open_results(other)
    with pytest.raises(ResultsError, match=r"postgresql://postgres@127\.0\.0\.1:1/x: cannot connect"):
        open_results("postgresql://postgres@127.0.0.1:1/x")


def test_postgres_store_survives_a_dropped_connection(postgres):
    """A server restart breaks the connection: the call that notices fails, the next one reconnects."""
    url = postgres.new_database()
    store = open_results(url)
    store.record([_row(1)])
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    with pytest.raises(psycopg.OperationalError):
        store.record([_row(2)])
    assert store.record([_row(2)]) == 1 and len(store.recent()) == 2


def test_no_postgres_column_can_hold_patient_data(postgres):
    url = postgres.new_database()
    open_results(url).close()
    with psycopg.connect(url) as db:
        columns = db.execute("SELECT table_name, column_name FROM information_schema.columns "
                             "WHERE table_schema = 'public'").fetchall()
    assert {c for t, c in columns if t != "covidxray_schema"} == {f.name for f in fields(ResultRow)} | {"png"}
    assert {t for t, _ in columns} == {"results", "heatmaps", "covidxray_schema"}
    assert not [c for _, c in columns if any(word in c for word in ("patient", "name", "birth", "accession", "sex"))]
