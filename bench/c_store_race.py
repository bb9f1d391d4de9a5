"""How often does a C-STORE from pynetdicom go unanswered under load, with and without `covidxray.dicomnode.sr.c_store`?

    .venv/bin/python bench/c_store_race.py [--runs 60] [--instances 200]

``covidxray listen`` is started afresh for each run; 4 pynetdicom senders (threads of this process, one association
each) send ``--instances`` 512x512 CR films, the runs taking turns: pynetdicom's own ``send_c_store``, then
`c_store` (which parks the association's reactor first). Counted per sender: runs in which a C-STORE got no answer
within the 30 s DIMSE timeout (its association is then aborted and the rest of that sender's films are not sent),
and C-STOREs not acknowledged. The listener is the same in both: what differs is only how the senders wait.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from common import ROOT, save

sys.path.insert(0, str(ROOT / "tests"))
import dicoms  # noqa: E402  (the tests' DICOM builders and sender)
from listener import make_files, send  # noqa: E402
from pydicom import uid  # noqa: E402

SENDERS = {"pynetdicom send_c_store": lambda assoc, ds: assoc.send_c_store(ds), "c_store": dicoms.c_store}


def one_run(paths: list[Path], work: Path, name: str) -> list[str]:
    """The failures of one run: a line per C-STORE not acknowledged (and per group of films not sent)."""
    proc, port = dicoms.start_listen(work / f"{name}.db", work / f"{name}.log", "--spool", str(work / f"{name}.spool"))
    acked: list[Path] = []
    failures: list[str] = []
    try:
        for t in send(paths, port, 4, acked, failures, sender="pynetdicom"):
            t.join()
    finally:
        proc.terminate()
        proc.wait(60)
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=60, help="runs in all, half with each way of sending")
    parser.add_argument("--instances", type=int, default=200)
    args = parser.parse_args()
    counts = {k: {"runs": 0, "runs_with_an_unanswered_c_store": 0, "c_stores": 0, "not_acknowledged": 0} for k in SENDERS}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = make_files(work / "films", args.instances, uid.ExplicitVRLittleEndian)
        for i in range(args.runs):
            kind = list(SENDERS)[i % 2]
            dicoms.c_store = SENDERS[kind]  # what dicoms.store_each calls for each film
            failures = one_run(paths, work, f"run{i}")
            c = counts[kind]
            unanswered = sum(int(f.split()[0]) if f.split()[0].isdigit() else 1 for f in failures)
            c["runs"] += 1
            c["c_stores"] += args.instances
            c["runs_with_an_unanswered_c_store"] += any("timeout" in f for f in failures)
            c["not_acknowledged"] += unanswered
            print(i, kind, failures, flush=True)
    table = ["| senders wait with | runs | runs with a C-STORE unanswered for 30 s | C-STOREs | not acknowledged |",
             "|---|---:|---:|---:|---:|"]
    table += [f"| {k} | {c['runs']} | {c['runs_with_an_unanswered_c_store']} | {c['c_stores']} | {c['not_acknowledged']} |"
              for k, c in counts.items()]
    note = (f"4 pynetdicom senders in one process, {args.instances} 512x512 CR films a run, a fresh `covidxray listen` each "
            f"run, the two ways taking turns; load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.")
    save("c-store-race", {"title": "pynetdicom's C-STORE race: senders that wait for the reactor to park, and senders that do not",
                          "counts": counts, "table": table + ["", note],
                          "command": f"python bench/c_store_race.py --runs {args.runs} --instances {args.instances}"})
    print("\n".join(table))


if __name__ == "__main__":
    main()
