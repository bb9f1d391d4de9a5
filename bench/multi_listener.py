"""Several listeners, one truth: 2 ``covidxray listen`` processes on one PostgreSQL, 4 senders, one SIGKILL.

    .venv/bin/python bench/multi_listener.py [--instances 1000] [--senders 4] [--both 0.1] [--attempts 8]
        [--db postgresql://...]

Without ``--db`` a PostgreSQL is started in a temporary folder (Debian's postgresql, as the tests
do: tests/postgres.py). Two listeners, each with its own spool, write the one database. The
``--senders`` threads send 512x512 12-bit CR films made from real X-rays (fresh UIDs); half of
the senders go to each listener, and a fraction ``--both`` of the instances is sent to both (as a
PACS that routes a film to two nodes would). Once half of the instances are acknowledged,
listener A is killed with SIGKILL and restarted on its spool at once (on a new port, which the
senders learn as a modality learns it from its load balancer or DNS name).

The senders behave like a modality or a PACS forwarding queue: an instance whose C-STORE was not
acknowledged (refused, no answer, association aborted or refused) is sent again, up to
``--attempts`` times, each retry after a backoff (0.25 s, doubled each time, at most 4 s) and to
the next listener in turn (failover: both listeners stand behind one AE title). Measured:
end-to-end time until every acknowledged instance has its row, instances never acknowledged,
acknowledged instances lost, rows beyond one per instance (impossible by the primary key, counted
anyway), retries (each one a failover to the other listener), and SQL errors in the logs.
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
from pynetdicom import AE

from common import ROOT, save
from listener import TIMEOUT_S, make_files  # the single-listener bench's films: real X-rays as 512x512 CR

sys.path.insert(0, str(ROOT / "tests"))
import dicoms  # noqa: E402
from postgres import PostgresServer  # noqa: E402

from covidxray.results import open_results  # noqa: E402

BACKOFF_S, MAX_BACKOFF_S = 0.25, 4.0  # before the first retry of an instance; doubled for each further one


def start(url: str, work: Path, name: str, attempt: int) -> tuple[subprocess.Popen, int]:
    return dicoms.start_listen(url, work / f"{name}.{attempt}.log", "--spool", str(work / f"spool-{name}"),
                               "--ae-title", "COVIDXRAY", "--batch-size", "16")


class Sender:
    """One sender thread's associations: to each listener in ``ports`` (a shared, live name -> port map), opened when needed."""

    def __init__(self, ports: dict[str, int], calling_ae: str = "BENCH"):
        self.ports, self.assocs = ports, {}
        self.ae = AE(ae_title=calling_ae)
        self.ae.add_requested_context(dicoms.CR_IMAGE, uid.ExplicitVRLittleEndian)

    def store(self, name: str, path: Path) -> bool:
        """One C-STORE of ``path`` to listener ``name``; True when it was acknowledged (status 0x0000)."""
        assoc = self.assocs.get(name)
        if assoc is None or not assoc.is_established:
            assoc = self.assocs[name] = self.ae.associate("127.0.0.1", self.ports[name], ae_title="COVIDXRAY")
            if not assoc.is_established:
                return False
        try:
            status = dicoms.c_store(assoc, path)  # not assoc.send_c_store alone: see covidxray.dicomnode.sr.c_store
        except RuntimeError:  # the association went away between the check and the request
            return False
        return bool(status) and status.get("Status") == 0x0000

    def close(self) -> None:
        for assoc in self.assocs.values():
            if assoc.is_established:
                assoc.release()


def send_with_retry(items: list[Path], first: str, ports: dict[str, int], attempts: int, acked: list,
                    counts: dict, lock: threading.Lock) -> None:
    """Send each of ``items`` to listener ``first``; what is not acknowledged is retried with backoff on the next listener."""
    sender, names = Sender(ports), sorted(ports)
    for path in items:
        name, delay = first, BACKOFF_S
        for attempt in range(1, attempts + 1):
            if sender.store(name, path):
                acked.append(path)  # list.append is atomic: the main thread reads the list meanwhile
                break
            if attempt == attempts:
                with lock:
                    counts["given_up"] += 1
                break
            time.sleep(delay)
            delay = min(2 * delay, MAX_BACKOFF_S)
            name = names[(names.index(name) + 1) % len(names)]  # fail over to the next listener
            with lock:
                counts["retries"] += 1
    sender.close()


def run(url: str, work: Path, instances: int, senders: int, both: float, attempts: int) -> dict:
    paths = make_files(work / "films", instances, uid.ExplicitVRLittleEndian)
    shared = set(range(0, instances, max(1, round(1 / both)))) if both > 0 else set()
    (a, port_a), (b, port_b) = start(url, work, "a", 0), start(url, work, "b", 0)
    ports = {"a": port_a, "b": port_b}
    routes = {"a": [p for i, p in enumerate(paths) if i % 2 == 0 or i in shared],
              "b": [p for i, p in enumerate(paths) if i % 2 == 1 or i in shared]}
    acked: list = []
    counts, lock = {"retries": 0, "given_up": 0}, threading.Lock()
    threads = [threading.Thread(target=send_with_retry, args=(items[k::senders // 2], name, ports, attempts, acked, counts, lock))
               for name, items in routes.items() for k in range(senders // 2)]
    procs = [a, b]
    t0 = time.perf_counter()
    try:
        for t in threads:
            t.start()
        while len(acked) < instances // 2 and any(t.is_alive() for t in threads):
            time.sleep(0.01)
        os.kill(a.pid, signal.SIGKILL)
        a.wait(30)
        a, ports["a"] = start(url, work, "a", 1)
        procs.append(a)
        for t in threads:
            t.join(TIMEOUT_S)
        sent = time.perf_counter()
        want = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in acked}
        every = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
        store = open_results(url)
        while store.known(want) != want and time.perf_counter() - t0 < TIMEOUT_S:
            time.sleep(0.5)
        elapsed = time.perf_counter() - t0
        rows = [r.sop_instance_uid for r in store.recent()]
    finally:  # an error on the way must not leave listeners running
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(60)
    logs = "".join(p.read_text(errors="replace") for p in work.glob("*.log"))
    return {"instances": instances, "sent_to_both": len(shared), "c_stores_acknowledged": len(acked),
            "acknowledged": len(want), "never_acknowledged": len(every - want), "rows": len(rows),
            "lost": len(want - set(rows)), "duplicated": len(rows) - len(set(rows)), "unknown_rows": len(set(rows) - every),
            **counts, "send_s": round(sent - t0, 1),
            "batch_errors": logs.count("could not record"), "end_to_end_s": round(elapsed, 1),
            "instances_per_s": round(len(set(rows)) / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--senders", type=int, default=4, help="an even number: half send to each listener")
    parser.add_argument("--both", type=float, default=0.1, help="fraction of instances sent to both listeners")
    parser.add_argument("--attempts", type=int, default=8,
                        help="C-STOREs per instance at most (1: no retry); retries back off and fail over")
    parser.add_argument("--db", help="an empty PostgreSQL database (default: start one in a temporary folder)")
    parser.add_argument("--note", default="", help="a line about the machine (e.g. shared with other work)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    server = None if args.db else PostgresServer().start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            row = run(args.db or server.new_database(), Path(tmp), args.instances, max(2, args.senders), args.both,
                      args.attempts)
    finally:
        if server is not None:
            server.stop()
    note = args.note or (f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
                         "(2 cores: other work shares them when it is above 0)")
    # acknowledged: distinct instances answered with success; rows: rows in the database; lost: acknowledged
    # without a row; duplicated: rows beyond one per instance; retries: C-STOREs sent again after no success
    table = ["| instances | sent to both | attempts | acknowledged | never acknowledged | rows | lost | duplicated | retries | "
             "batch errors | end to end s | instances/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {row['instances']} | {row['sent_to_both']} | {args.attempts} | {row['acknowledged']} | "
             f"{row['never_acknowledged']} | {row['rows']} | {row['lost']} | {row['duplicated']} | {row['retries']} | "
             f"{row['batch_errors']} | {row['end_to_end_s']} | {row['instances_per_s']} |", "", note]
    save("multi_listener", {"title": f"Two listeners, one PostgreSQL — {args.senders} senders, one SIGKILL and restart",
                            "rows": [row], "note": note, "table": table,
                            "command": f"python bench/multi_listener.py --instances {args.instances} "
                                       f"--senders {args.senders} --both {args.both} --attempts {args.attempts}"})
    print(row)


if __name__ == "__main__":
    main()
