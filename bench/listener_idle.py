"""What ``covidxray listen`` costs while nothing is sent: with no association open, and with ``--associations`` open.

    .venv/bin/python bench/listener_idle.py [--associations 4] [--seconds 5]

pynetdicom runs two threads per association (its DUL reactor and the association's own), and each wakes about every
millisecond to look for work whether or not any came. This starts the listener (bundled model, fresh database and
spool), measures its CPU (every thread and its classifier process, from /proc) over ``--seconds`` with no association,
then opens ``--associations`` associations from another process (pynetdicom, each proposing CR storage) and measures
again while they stay open and idle. The difference is what the waiting costs, on the 2 cores the listener classifies
with: the bench/listener.py runs keep 4 associations open throughout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, cpu_seconds, save

sys.path.insert(0, str(ROOT / "tests"))
import dicoms  # noqa: E402  (start_listen: `covidxray listen` in a subprocess, on a free port)

_HOLD = """
import sys, time
from pynetdicom import AE
ae = AE(ae_title="IDLE")
ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1")
held = [ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="COVIDXRAY") for _ in range(int(sys.argv[2]))]
print(sum(a.is_established for a in held), flush=True)
sys.stdin.read()  # until told to go
for a in held:
    a.release()
"""


def cores(pid: int, seconds: float) -> float:
    start = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - start) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        proc, port = dicoms.start_listen(work / "idle.db", work / "idle.log", "--spool", str(work / "spool"))
        try:
            time.sleep(2)  # the classifier process's start-up is over
            none = cores(proc.pid, args.seconds)
            holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(port), str(args.associations)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            established = int(holder.stdout.readline() or 0)
            if established != args.associations:
                raise SystemExit(f"only {established} of {args.associations} associations were accepted")
            time.sleep(1)
            held = cores(proc.pid, args.seconds)
            holder.communicate("", timeout=60)
        finally:
            proc.terminate()
            proc.wait(60)
    row = {"associations": args.associations, "seconds": args.seconds, "cores_without": round(none, 3),
           "cores_with": round(held, 3), "cores_per_association": round((held - none) / args.associations, 3)}
    print(row)
    note = (f"2 cores: 1.0 is one of them. Load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
            "(other work shares the cores when it is above 0).")
    table = ["| idle associations open | listener's cores | per association |", "|---:|---:|---:|",
             f"| 0 | {row['cores_without']} | – |",
             f"| {args.associations} | {row['cores_with']} | {row['cores_per_association']} |"]
    save("listener-idle", {"title": "The DICOM listener while nothing is sent: the cost of open associations", "row": row,
                           "table": table + ["", note],
                           "command": f"python bench/listener_idle.py --associations {args.associations} "
                                      f"--seconds {args.seconds}"})


if __name__ == "__main__":
    main()
