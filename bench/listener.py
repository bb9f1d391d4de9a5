"""Throughput and crash safety of ``covidxray listen``: 4 concurrent DICOM senders, end to end.

    .venv/bin/python bench/listener.py [--instances 400] [--senders 4] [--kill-instances 500]

``covidxray listen`` runs in a subprocess on a free loopback port with a fresh database. Each run
sends 512x512 12-bit CR films made from real X-rays of the shared data set (fresh SOP Instance UIDs,
so every instance is new) from ``--senders`` threads, one association each, and measures from
the first C-STORE until the database holds a row for every acknowledged instance: received,
spooled (fsync), classified and committed. Runs: uncompressed (explicit VR little endian), JPEG
Lossless SV1 (dcmtk's ``dcmcjpeg``), and a kill -9 of the listener half-way through a stream
followed by a restart, counting acknowledged instances missing from the database and duplicates.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydicom import dcmread, uid

from common import ROOT, save

sys.path.insert(0, str(ROOT / "tests"))
import dicoms  # noqa: E402  (the tests' DICOM builders: CR films from real X-rays, dcmcjpeg)

DATA = Path(os.environ.get("COVIDXRAY_DATA", ROOT.parent / "shared" / "datasets" / "covid-cxr"))
DISTINCT_IMAGES = 64  # decoded once; each instance is one of them under a new UID
TIMEOUT_S = 900


def make_files(folder: Path, n: int, syntax: str) -> list[Path]:
    """``n`` CR instance files (512x512, 12 bits) in ``syntax``, each with its own study and UIDs."""
    folder.mkdir(parents=True)
    templates = [dicoms.compressed(ds, syntax, folder) for ds in dicoms.films(DATA / "manifest.csv", DISTINCT_IMAGES, 512)]
    for f in folder.glob("*.dcm"):
        f.unlink()  # dcmcjpeg's scratch files
    paths = []
    for i in range(n):
        ds = templates[i % len(templates)]
        ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (uid.generate_uid() for _ in range(3))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        paths.append(dicoms.write(folder / f"{i:05d}.dcm", ds))
    return paths


def send(paths: list[Path], port: int, senders: int, acked: list, failures: list | None = None) -> list[threading.Thread]:
    """Start ``senders`` threads, each sending its share of ``paths`` over one association (raw files, no re-encoding)."""
    syntax = str(dcmread(paths[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    threads = [threading.Thread(target=dicoms.store_each, args=(paths[k::senders], port, syntax, acked, "BENCH", failures))
               for k in range(senders)]
    for t in threads:
        t.start()
    return threads


def recorded(db: Path) -> list[str]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as con:
        return [r[0] for r in con.execute("SELECT sop_instance_uid FROM results")]


def wait_recorded(db: Path, want: set[str]) -> float:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if db.exists() and want <= set(recorded(db)):
            return time.perf_counter()
        time.sleep(0.05)
    raise SystemExit(f"not all instances recorded within {TIMEOUT_S} s")


def run(paths: list[Path], work: Path, senders: int, name: str) -> dict:
    uids = {p: dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    db = work / f"{name}.db"
    proc, port = dicoms.start_listen(db, work / f"{name}.log")
    acked: list[Path] = []
    failures: list[str] = []  # C-STOREs not acknowledged (refused, timed out, association aborted): not the listener's to keep
    start = time.perf_counter()
    for t in send(paths, port, senders, acked, failures):
        t.join()
    sent = time.perf_counter()
    done = wait_recorded(db, {uids[p] for p in acked})
    proc.terminate()
    proc.wait(60)
    rows = recorded(db)
    return {"run": name, "instances": len(paths), "acknowledged": len(acked), "recorded": len(rows),
            "lost": len({uids[p] for p in acked} - set(rows)), "duplicated": len(rows) - len(set(rows)),
            "send_s": round(sent - start, 2), "end_to_end_s": round(done - start, 2),
            "instances_per_s": round(len(acked) / (done - start), 1), "not_acknowledged": failures,
            **({"listener_log_tail": (work / f"{name}.log").read_text().splitlines()[-15:]} if failures else {})}


def kill_run(paths: list[Path], work: Path, senders: int) -> dict:
    uids = {p: dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    db = work / "kill.db"
    proc, port = dicoms.start_listen(db, work / "kill-1.log")
    acked: list[Path] = []
    threads = send(paths, port, senders, acked)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--kill-instances", type=int, default=500)
    parser.add_argument("--note", default="", help="a line about the machine (e.g. shared with other work)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows = [run(make_files(work / "raw", args.instances, uid.ExplicitVRLittleEndian), work, args.senders, "uncompressed"),
                run(make_files(work / "jpegll", args.instances, uid.JPEGLosslessSV1), work, args.senders, "JPEG Lossless SV1"),
                kill_run(make_files(work / "kill", args.kill_instances, uid.ExplicitVRLittleEndian), work, args.senders)]
    table = ["| run | instances | acknowledged | lost | duplicated | end to end s | instances/s |", "|---|---|---|---|---|---|---|"]
    # lost: acknowledged (success status sent back) but missing from the database; duplicated: rows beyond one per instance
    table += [f"| {r['run']} | {r['instances']} | {r['acknowledged']} | {r['lost']} | {r['duplicated']} | "
              f"{r.get('end_to_end_s', '—')} | {r.get('instances_per_s', '—')} |" for r in rows]
    note = args.note or f"load average {load_before:.1f} at the start (other work shares the cores when it is above 0)"
    save("listener", {"title": f"DICOM listener — {args.senders} concurrent senders, 512x512 CR, end to end", "rows": rows,
                      "note": note, "table": table + ["", note],
                      "command": f"python bench/listener.py --instances {args.instances} --senders {args.senders} "
                                 f"--kill-instances {args.kill_instances}"})
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
