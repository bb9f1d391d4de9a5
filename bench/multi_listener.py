"""Several listeners, one truth: 2 ``covidxray listen`` processes on one PostgreSQL, 4 senders, one SIGKILL.

    .venv/bin/python bench/multi_listener.py [--instances 1000] [--senders 4] [--both 0.1] [--db postgresql://...]

Without ``--db`` a PostgreSQL is started in a temporary folder (Debian's postgresql, as the tests
do: tests/postgres.py). Two listeners, each with its own spool, write the one database. The
``--senders`` threads send 512x512 12-bit CR films made from real X-rays (fresh UIDs); half of
the senders go to each listener, and a fraction ``--both`` of the instances is sent to both (as a
PACS that routes a film to two nodes would). Once half of the instances are acknowledged,
listener A is killed with SIGKILL and restarted on its spool at once. Measured: end-to-end
time until every acknowledged instance has its row, acknowledged instances lost, rows beyond one
per instance (impossible by the primary key, counted anyway), and SQL errors in the logs.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydicom import dcmread, uid

from common import ROOT, save
from listener import TIMEOUT_S, make_files  # the single-listener bench's films: real X-rays as 512x512 CR

sys.path.insert(0, str(ROOT / "tests"))
import dicoms  # noqa: E402
from postgres import PostgresServer  # noqa: E402

from covidxray.results import open_results  # noqa: E402


def start(url: str, work: Path, name: str, attempt: int) -> tuple[subprocess.Popen, int]:
    return dicoms.start_listen(url, work / f"{name}.{attempt}.log", "--spool", str(work / f"spool-{name}"),
                               "--ae-title", "COVIDXRAY", "--batch-size", "16")


def run(url: str, work: Path, instances: int, senders: int, both: float) -> dict:
    paths = make_files(work / "films", instances, uid.ExplicitVRLittleEndian)
    shared = set(range(0, instances, max(1, round(1 / both)))) if both > 0 else set()
    (a, port_a), (b, port_b) = start(url, work, "a", 0), start(url, work, "b", 0)
    routes = {port_a: [p for i, p in enumerate(paths) if i % 2 == 0 or i in shared],
              port_b: [p for i, p in enumerate(paths) if i % 2 == 1 or i in shared]}
    acked: list = []
    threads = [threading.Thread(target=dicoms.store_each, args=(items[k::senders // 2], port, uid.ExplicitVRLittleEndian,
                                                                 acked, "BENCH"))
               for port, items in routes.items() for k in range(senders // 2)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    while len(acked) < instances // 2 and any(t.is_alive() for t in threads):
        time.sleep(0.01)
    os.kill(a.pid, signal.SIGKILL)
    a.wait(30)
    a, _ = start(url, work, "a", 1)
    for t in threads:
        t.join(TIMEOUT_S)
    want = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in acked}
    store = open_results(url)
    while store.known(want) != want and time.perf_counter() - t0 < TIMEOUT_S:
        time.sleep(0.5)
    elapsed = time.perf_counter() - t0
    rows = [r.sop_instance_uid for r in store.recent()]
    for proc in (a, b):
        proc.terminate()
        proc.wait(60)
    logs = "".join(p.read_text(errors="replace") for p in work.glob("*.log"))
    return {"instances": instances, "sent_to_both": len(shared), "acknowledged": len(want),
            "lost": len(want - set(rows)), "duplicated": len(rows) - len(set(rows)),
            "batch_errors": logs.count("could not record"), "end_to_end_s": round(elapsed, 1),
            "instances_per_s": round(len(set(rows)) / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--senders", type=int, default=4, help="an even number: half send to each listener")
    parser.add_argument("--both", type=float, default=0.1, help="fraction of instances sent to both listeners")
    parser.add_argument("--db", help="an empty PostgreSQL database (default: start one in a temporary folder)")
    parser.add_argument("--note", default="", help="a line about the machine (e.g. shared with other work)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    server = None if args.db else PostgresServer().start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            row = run(args.db or server.new_database(), Path(tmp), args.instances, max(2, args.senders), args.both)
    finally:
        if server is not None:
            server.stop()
    note = args.note or f"load average {load_before:.1f} at the start (other work shares the cores when it is above 0)"
    table = ["| instances | sent to both | acknowledged | lost | duplicated | batch errors | end to end s | instances/s |",
             "|---|---|---|---|---|---|---|---|",
             f"| {row['instances']} | {row['sent_to_both']} | {row['acknowledged']} | {row['lost']} | {row['duplicated']} | "
             f"{row['batch_errors']} | {row['end_to_end_s']} | {row['instances_per_s']} |", "", note]
    save("multi_listener", {"title": f"Two listeners, one PostgreSQL — {args.senders} senders, one SIGKILL and restart",
                            "rows": [row], "note": note, "table": table,
                            "command": f"python bench/multi_listener.py --instances {args.instances} "
                                       f"--senders {args.senders} --both {args.both}"})
    print(row)


if __name__ == "__main__":
    main()
