"""Throughput and crash safety of ``covidxray listen``: 4 concurrent DICOM senders, end to end.

    .venv/bin/python bench/listener.py [--instances 400] [--senders 4] [--kill-instances 500] [--sender storescu]
    .venv/bin/python bench/listener.py --db sqlite --db postgresql [--repeat 3]   # the two stores compared

``covidxray listen`` runs in a subprocess on a free loopback port with a fresh database. Each run
sends 512x512 12-bit CR films made from real X-rays of the shared data set (fresh SOP Instance UIDs,
so every instance is new) from ``--senders`` senders, one association each, and measures from
the first C-STORE until the database holds a row for every acknowledged instance: received,
spooled (fsync), classified and committed. Runs: uncompressed (explicit VR little endian), JPEG
Lossless SV1 (dcmtk's ``dcmcjpeg``), and a kill -9 of the listener half-way through a stream
followed by a restart, counting acknowledged instances missing from the database and duplicates.
After each throughput run the listener's ``/metrics`` is read and its answers by label are
compared with the database's rows by label (they must agree). From /proc, every thread counted:
the listener's CPU per instance, its classifier process's, and the rest (the receiving process's own
threads: pynetdicom, the spool, the database) as user and system time; the cores the listener used
while the senders were sending and overall (2 cores: 2.0 is all of them); while sending, the cores
its classifier process used and those the whole machine used (senders and this bench included: what
is left of 2.0 was idle); and the CPU the ``storescu`` processes took per instance.

The senders are dcmtk's ``storescu`` by default (``--sender storescu``: one process each, C++, as a modality
or PACS would send), or pynetdicom threads in this process (``--sender pynetdicom``, the tests' client: several
ms of Python CPU per instance, taken from the 2 cores the listener runs on).

SQLite against PostgreSQL (``--db sqlite --db postgresql --repeat 3``): uncompressed runs only,
each on a fresh database, interleaved (sqlite, postgresql, sqlite, ...) so that the load of a
shared machine falls on both alike; reported: each run, the median of each store, and the ratio
of the medians. ``postgresql`` starts a throwaway server here (tests/postgres.py) with fsync on,
as SQLite runs with ``synchronous = FULL``; a ``postgresql://`` URL names a server on which the
bench may create (and drops) a database per run.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread, uid

from common import ROOT, children_cpu, cpu_seconds, own_cpu, save

sys.path.insert(0, str(ROOT / "tests"))
import dicoms  # noqa: E402  (the tests' DICOM builders: CR films from real X-rays, dcmcjpeg)
from postgres import PostgresServer  # noqa: E402  (a throwaway PostgreSQL: initdb + pg_ctl)

from covidxray.results import open_results  # noqa: E402

DATA = Path(os.environ.get("COVIDXRAY_DATA", ROOT.parent / "shared" / "datasets" / "covid-cxr"))
DISTINCT_IMAGES = 64  # decoded once; each instance is one of them under a new UID
TIMEOUT_S = 900


def make_files(folder: Path, n: int, syntax: str, side: int = 512) -> list[Path]:
    """``n`` CR instance files (``side`` x ``side``, 12 bits) in ``syntax``, each with its own study and UIDs."""
    folder.mkdir(parents=True)
    templates = [dicoms.compressed(ds, syntax, folder) for ds in dicoms.films(DATA / "manifest.csv", DISTINCT_IMAGES, side)]
    for f in folder.glob("*.dcm"):
        f.unlink()  # dcmcjpeg's scratch files
    paths = []
    for i in range(n):
        ds = templates[i % len(templates)]
        ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (uid.generate_uid() for _ in range(3))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        paths.append(dicoms.write(folder / f"{i:05d}.dcm", ds))
    return paths


def send(paths: list[Path], port: int, senders: int, acked: list, failures: list | None = None,
         sender: str = "storescu") -> list[threading.Thread]:
    """Start ``senders`` threads, each sending its share of ``paths`` over one association (raw files, no re-encoding):
    through dcmtk's ``storescu`` (a process each) or pynetdicom (in this process)."""
    syntax = str(dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    target = storescu_each if sender == "storescu" else dicoms.store_each
    threads = [threading.Thread(target=target, args=(paths[k::senders], port, syntax, acked, "BENCH", failures))
               for k in range(senders)]
    for t in threads:
        t.start()
    return threads


def storescu_each(paths: list[Path], port: int, syntax: str, acked: list, calling_ae: str, failures: list | None) -> None:
    """dcmtk's ``storescu`` sends ``paths`` (uncompressed, or JPEG Lossless SV1 as they are) over one association; each
    file whose C-STORE it reports answered with success goes to ``acked`` as the answer comes, the others to ``failures``."""
    proposal = "-xs" if syntax == uid.JPEGLosslessSV1 else "-xe"
    proc = subprocess.Popen(["storescu", "-v", proposal, "-aet", calling_ae, "-aec", "COVIDXRAY", "127.0.0.1", str(port),
                             *map(str, paths)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sending, answered = None, set()
    for line in proc.stdout:
        if found := re.match(r"I: Sending file: (.+)", line):
            sending = Path(found.group(1).strip())
        elif "Received Store Response" in line and sending is not None:
            answered.add(sending)
            if "(Success)" in line:
                acked.append(sending)  # list.append is atomic: other threads may read the list meanwhile
            elif failures is not None:
                failures.append(f"{sending.name}: {line.strip()}")
    proc.wait()
    if failures is not None and (unanswered := len(paths) - len(answered)):
        failures.append(f"{unanswered} not answered (storescu exited with {proc.returncode})")


def recorded(db: str | Path) -> list[str]:
    store = open_results(db, create=False)
    try:
        return [r.sop_instance_uid for r in store.recent()]
    finally:
        store.close()


def wait_recorded(db: str | Path, want: set[str]) -> float:
    deadline = time.monotonic() + TIMEOUT_S
    store = open_results(db, create=False)  # the listener made it before it listened
    try:
        while time.monotonic() < deadline:
            if store.known(want) == want:
                return time.perf_counter()
            time.sleep(0.05)
    finally:
        store.close()
    raise SystemExit(f"not all instances recorded within {TIMEOUT_S} s")


def metrics_against_rows(log: Path, db: str | Path) -> dict:
    """The listener's ``/metrics`` (port from its log) against the database: answers and refusals by label, and received."""
    port = re.search(r"metrics on http://[0-9.]+:(\d+)/metrics", log.read_text(errors="replace")).group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        found = {(s.name, tuple(s.labels.values())): s.value
                 for family in text_string_to_metric_families(r.read().decode()) for s in family.samples}
    store = open_results(db, create=False)
    rows = store.recent()
    store.close()
    by_label = dict(Counter(r.label for r in rows))
    metric_by_label = {key[0]: int(v) for (name, key), v in found.items() if name == "covidxray_answers_total"}
    refusals = dict(Counter(r.reason for r in rows if r.label == "not_answered"))
    metric_refusals = {key[0]: int(v) for (name, key), v in found.items() if name == "covidxray_input_gate_refusals_total"}
    return {"rows_by_label": by_label, "metrics_answers_by_label": metric_by_label,
            "metrics_received": int(found.get(("covidxray_dicom_received_total", ()), 0)),
            "metrics_agree": by_label == metric_by_label and refusals == metric_refusals}


def run(paths: list[Path], work: Path, senders: int, name: str, db: str | Path | None = None, sender: str = "storescu") -> dict:
    uids = {p: dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    db = db or work / f"{name}.db"
    log = work / f"{name}.log"
    proc, port = dicoms.start_listen(db, log, "--spool", str(work / f"{name}.spool"), "--http-port", "0")
    acked: list[Path] = []
    failures: list[str] = []  # C-STOREs not acknowledged (refused, timed out, association aborted): not the listener's to keep
    start, cpu_start, classifying_start, busy_start = time.perf_counter(), cpu_seconds(proc.pid), children_cpu(proc.pid), busy_cpu()
    senders_start, receiving_start = reaped_cpu(), own_cpu(proc.pid)
    try:
        for t in send(paths, port, senders, acked, failures, sender):
            t.join()
        sent, cpu_sent, classifying_sent, busy_sent = (time.perf_counter(), cpu_seconds(proc.pid), children_cpu(proc.pid),
                                                       busy_cpu())
        senders_cpu = reaped_cpu() - senders_start  # the storescu processes, each waited for by its thread
        done = wait_recorded(db, {uids[p] for p in acked})
        cpu, classifying = cpu_seconds(proc.pid) - cpu_start, children_cpu(proc.pid) - classifying_start
        receiving = [b - a for a, b in zip(receiving_start, own_cpu(proc.pid))]  # the same window: its CPU less the child's
        checked = metrics_against_rows(log, db)
    finally:  # a failed check must not leave the listener running
        proc.terminate()
        proc.wait(60)
    rows = recorded(db)
    return {"run": name, "sender": sender, "instances": len(paths), "acknowledged": len(acked), "recorded": len(rows),
            "lost": len({uids[p] for p in acked} - set(rows)), "duplicated": len(rows) - len(set(rows)),
            "send_s": round(sent - start, 2), "end_to_end_s": round(done - start, 2),
            "instances_per_s": round(len(acked) / (done - start), 1),
            "listener_cpu_ms_per_instance": round(cpu / max(1, len(acked)) * 1000, 1),
            "listener_cores_while_sending": round((cpu_sent - cpu_start) / (sent - start), 2),
            "listener_cores": round(cpu / (done - start), 2),
            "classifier_process_cpu_ms_per_instance": round(classifying / max(1, len(acked)) * 1000, 1),
            "classifier_process_cores_while_sending": round((classifying_sent - classifying_start) / (sent - start), 2),
            "machine_cores_while_sending": round((busy_sent - busy_start) / (sent - start), 2),
            "receiving_process_user_ms_per_instance": round(receiving[0] / max(1, len(acked)) * 1000, 2),
            "receiving_process_system_ms_per_instance": round(receiving[1] / max(1, len(acked)) * 1000, 2),
            "sender_processes_cpu_ms_per_instance": (round(senders_cpu / max(1, len(acked)) * 1000, 2)
                                                     if sender == "storescu" else None), **checked, "not_acknowledged": failures,
            "slow_spool_writes": [line for line in log.read_text().splitlines() if "spooling one instance" in line],
            **({"listener_log_tail": log.read_text().splitlines()[-15:]} if failures else {})}


def reaped_cpu() -> float:
    """CPU time of this process's child processes that have ended and been waited for (the senders, after a run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def busy_cpu() -> float:
    """CPU time the whole machine has spent busy (every process, this one and the senders included; /proc/stat)."""
    user, nice, system, _, _, irq, softirq = (int(v) for v in Path("/proc/stat").read_text().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")  # not idle, iowait, steal (or guest: in user)


def kill_run(paths: list[Path], work: Path, senders: int, sender: str = "storescu") -> dict:
    uids = {p: dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    db = work / "kill.db"
    proc, port = dicoms.start_listen(db, work / "kill-1.log")
    acked: list[Path] = []
    threads = send(paths, port, senders, acked, sender=sender)
    while len(acked) < len(paths) // 2:
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for t in threads:
        t.join(120)
    spooled = len(list((work / "kill.db.spool").glob("*.dcm")))
    proc, _ = dicoms.start_listen(db, work / "kill-2.log")
    wait_recorded(db, {uids[p] for p in acked})
    proc.terminate()
    proc.wait(60)
    rows = recorded(db)
    return {"run": "kill -9 mid-stream, restart", "instances": len(paths), "acknowledged": len(acked),
            "unprocessed_at_kill": spooled, "recorded": len(rows), "lost": len({uids[p] for p in acked} - set(rows)),
            "duplicated": len(rows) - len(set(rows))}


class Databases:
    """A fresh, empty results database per run for each ``--db`` kind: an SQLite file, or a PostgreSQL database."""

    def __init__(self, work: Path):
        self.work, self.server, self.made, self.count = work, None, [], 0

    def new(self, kind: str) -> str:
        self.count += 1
        if kind == "sqlite":
            return str(self.work / f"sqlite-{self.count}.db")
        if kind == "postgresql" and self.server is None:
            self.server = PostgresServer().start(fsync=True)  # durable commits, as SQLite's synchronous = FULL
        url = self.server.url() if kind == "postgresql" else kind
        name = f"covidxray_bench_{os.getpid()}_{self.count}"
        with psycopg.connect(url, autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        self.made.append((url, name))
        return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))

    def close(self) -> None:
        for url, name in self.made if self.server is None else []:  # a throwaway server goes with its databases
            with psycopg.connect(url, autocommit=True) as db:
                db.execute(f"DROP DATABASE IF EXISTS {name}")
        if self.server is not None:
            self.server.stop()


def compare_stores(kinds: list[str], repeat: int, instances: int, senders: int, work: Path, sender: str,
                   ) -> tuple[list[dict], dict]:
    """Uncompressed runs on each store in ``kinds``, interleaved ``repeat`` times; the runs and each store's median."""
    paths = make_files(work / "raw", instances, uid.ExplicitVRLittleEndian)
    databases, rows = Databases(work), []
    try:
        for r in range(repeat):
            for kind in kinds:
                name = "sqlite" if kind == "sqlite" else "postgresql"
                row = run(paths, work, senders, f"{name}-{r + 1}", databases.new(kind), sender)
                rows.append({**row, "store": name, "load_average": round(os.getloadavg()[0], 1)})
                print(rows[-1], flush=True)
    finally:
        databases.close()
    medians = {name: statistics.median(r["instances_per_s"] for r in rows if r["store"] == name)
               for name in dict.fromkeys(r["store"] for r in rows)}
    return rows, medians


def save_comparison(args: argparse.Namespace, rows: list[dict], medians: dict, load_before: float) -> None:
    ratio = medians["postgresql"] / medians["sqlite"] if {"postgresql", "sqlite"} <= medians.keys() else None
    speed = {name: [r["instances_per_s"] for r in rows if r["store"] == name] for name in medians}
    pairs = [round(p / s, 2) for s, p in zip(speed["sqlite"], speed["postgresql"])] if ratio else []
    # not acknowledged: C-STOREs refused or unanswered within the sender's 30 s timeout (this bench does not resend)
    table = ["| run | store | acknowledged | not acknowledged | recorded | lost | duplicated | /metrics agree with rows | "
             "end to end s | instances/s | load average after |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {r['run']} | {r['store']} | {r['acknowledged']} | {r['instances'] - r['acknowledged']} | {r['recorded']} | "
              f"{r['lost']} | {r['duplicated']} | {'yes' if r['metrics_agree'] else 'NO'} | {r['end_to_end_s']} | "
              f"{r['instances_per_s']} | {r['load_average']} |" for r in rows]
    table += ["", "Median instances/s: " + ", ".join(f"{k} {v:.1f}" for k, v in medians.items())
              + (f"; PostgreSQL / SQLite = **{ratio:.2f}** (run by run: {', '.join(map(str, pairs))})" if ratio else "")]
    note = args.note or (f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
                         "(2 cores: other work shares them when it is above 0; runs interleaved so both stores share it)")
    save("listener-db", {"title": f"DICOM listener on SQLite and on PostgreSQL — {args.senders} senders ({args.sender}), "
                                  f"{args.instances} uncompressed 512x512 CR per run", "rows": rows, "medians": medians,
                         "ratio_postgresql_to_sqlite": ratio, "ratios_run_by_run": pairs, "note": note, "table": table + ["", note],
                         "command": f"python bench/listener.py --instances {args.instances} --senders {args.senders} "
                                    + " ".join(f"--db {k if k in ('sqlite', 'postgresql') else 'URL'}" for k in args.db)
                                    + f" --repeat {args.repeat} --sender {args.sender}"})
    print(f"medians {medians}, ratio {ratio}")


def _split(row: dict) -> str:
    if "receiving_process_user_ms_per_instance" not in row:
        return "—"
    return f"{row['receiving_process_user_ms_per_instance']} + {row['receiving_process_system_ms_per_instance']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--kill-instances", type=int, default=500)
    parser.add_argument("--db", action="append", metavar="STORE",
                        help="compare results stores (repeatable): sqlite, postgresql (a throwaway server started here) "
                             "or a postgresql:// URL of a server where the bench may create databases; uncompressed "
                             "runs only, saved as bench/results/listener-db.json")
    parser.add_argument("--repeat", type=int, default=3, help="with --db: runs per store, interleaved")
    parser.add_argument("--sender", choices=("storescu", "pynetdicom"), default="storescu",
                        help="the DICOM client that sends: dcmtk's storescu, one process per sender (default), or pynetdicom, "
                             "threads of this process (more CPU of the machine the listener runs on)")
    parser.add_argument("--note", default="", help="a line about the machine (e.g. shared with other work)")
    args = parser.parse_args()
    for kind in args.db or []:
        if kind not in ("sqlite", "postgresql") and not kind.startswith(("postgresql://", "postgres://")):
            parser.error(f"--db {kind}: give sqlite, postgresql or a postgresql:// URL")
    load_before = os.getloadavg()[0]
    if args.db:
        with tempfile.TemporaryDirectory() as tmp:
            rows, medians = compare_stores(args.db, args.repeat, args.instances, args.senders, Path(tmp), args.sender)
        save_comparison(args, rows, medians, load_before)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [run(make_files(work / "raw", args.instances, uid.ExplicitVRLittleEndian), work, args.senders, "uncompressed",
                    sender=args.sender),
                run(make_files(work / "jpegll", args.instances, uid.JPEGLosslessSV1), work, args.senders, "JPEG Lossless SV1",
                    sender=args.sender),
                kill_run(make_files(work / "kill", args.kill_instances, uid.ExplicitVRLittleEndian), work, args.senders, args.sender)]
    table = ["| run | instances | acknowledged | lost | duplicated | /metrics agree with rows | end to end s | instances/s | "
             "listener CPU ms per instance (its classifier process's) | cores it used (while sending) | "
             "its classifier process, while sending | "
             "the whole machine, while sending | receiving process CPU ms per instance, user + system | "
             "storescu CPU ms per instance |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    # lost: acknowledged (success status sent back) but missing from the database; duplicated: rows beyond one per instance
    table += [f"| {r['run']} | {r['instances']} | {r['acknowledged']} | {r['lost']} | {r['duplicated']} | "
              f"{({True: 'yes', False: 'NO'}).get(r.get('metrics_agree'), '—')} | "
              f"{r.get('end_to_end_s', '—')} | {r.get('instances_per_s', '—')} | "
              f"{r.get('listener_cpu_ms_per_instance', '—')} ({r.get('classifier_process_cpu_ms_per_instance', '—')}) | "
              f"{r.get('listener_cores', '—')} ({r.get('listener_cores_while_sending', '—')}) | "
              f"{r.get('classifier_process_cores_while_sending', '—')} | {r.get('machine_cores_while_sending', '—')} | "
              f"{_split(r)} | {r.get('sender_processes_cpu_ms_per_instance') or '—'} |" for r in rows]
    note = args.note or (f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
                         "(2 cores: other work shares them when it is above 0)")
    save("listener", {"title": f"DICOM listener — {args.senders} concurrent senders ({args.sender}), 512x512 CR, end to end", "rows": rows,
                      "note": note, "table": table + ["", note],
                      "command": f"python bench/listener.py --instances {args.instances} --senders {args.senders} "
                                 f"--kill-instances {args.kill_instances} --sender {args.sender}"})
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
