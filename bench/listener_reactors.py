"""Does pynetdicom's polling cost the listener its throughput? Stock reactors against reactors that wait.

    .venv/bin/python bench/listener_reactors.py [--instances 600] [--repeat 3]

Each association runs two pynetdicom threads that poll: the association's reactor sleeps 1 ms between looks at its
message queue, and the DUL's reactor sleeps 1 ms (``_run_loop_delay``) whenever it found nothing to do. Here the
listener runs twice over, interleaved ``--repeat`` times on the same files (4 ``storescu`` senders, uncompressed 512 px
CR, `listener.run`): stock, and with the reactors patched in its process (a ``sitecustomize`` on its ``PYTHONPATH``,
nothing in the product changes) so that the association's reactor blocks on its message queue (woken by the
message, 20 ms at most, so that releases and aborts are still seen) and the DUL's sleeps 5 ms when idle. Reported
per run: instances/s end to end, and the receiving process's own CPU per instance (user + system, its classifier
process left out) while the senders were sending. If polling were what keeps the listener short of CPU, the patched
runs would be faster.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from pydicom import uid

from common import save
from listener import make_files, run

PATCH = '''
import inspect, queue, textwrap
import pynetdicom.association as association
import pynetdicom.dul as dul

source = textwrap.dedent(inspect.getsource(association.Association._run_reactor))
polling = ("time.sleep(0.001)\\n", "context_id, msg = self.dimse.get_msg(block=False)")
assert all(p in source for p in polling), "pynetdicom's association reactor changed: this patch no longer applies"
source = source.replace(polling[0], "pass\\n", 1).replace(polling[1], (
    "try:\\n" + " " * 12 + "context_id, msg = self.dimse.msg_queue.get(timeout=0.02)\\n"
    + " " * 8 + "except queue.Empty:\\n" + " " * 12 + "context_id, msg = None, None"), 1)
scope = {}
exec(compile(source, "waiting reactor", "exec"), {**vars(association), "queue": queue}, scope)
association.Association._run_reactor = scope["_run_reactor"]

stock_init = dul.DULServiceProvider.__init__
def waiting_init(self, *args, **kwargs):
    stock_init(self, *args, **kwargs)
    self._run_loop_delay = 0.005
dul.DULServiceProvider.__init__ = waiting_init
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work, stock_path = Path(tmp), os.environ.get("PYTHONPATH", "")
        (work / "patch").mkdir()
        (work / "patch" / "sitecustomize.py").write_text(PATCH)
        paths = make_files(work / "films", args.instances, uid.ExplicitVRLittleEndian)
        try:
            for r in range(args.repeat):
                for way in ("stock", "waiting"):
                    os.environ["PYTHONPATH"] = (f"{work / 'patch'}{os.pathsep}" if way == "waiting" else "") + stock_path
                    row = run(paths, work, 4, f"{way}-{r + 1}")
                    rows.append({"reactors": way, **{k: row[k] for k in (
                        "instances_per_s", "lost", "receiving_process_user_ms_per_instance",
                        "receiving_process_system_ms_per_instance", "classifier_process_cores_while_sending",
                        "machine_cores_while_sending")}})
                    print(rows[-1], flush=True)
        finally:
            os.environ["PYTHONPATH"] = stock_path
    table = ["| reactors | instances/s (each run) | median | receiving process CPU ms per instance, user + system (median) "
             "| its classifier process's cores while sending (median) |", "|---|---:|---:|---:|---:|"]
    for way in ("stock", "waiting"):
        mine = [r for r in rows if r["reactors"] == way]
        med = {k: statistics.median(r[k] for r in mine) for k in mine[0] if k != "reactors"}
        table.append(f"| {way} | {', '.join(str(r['instances_per_s']) for r in mine)} | {med['instances_per_s']} | "
                     f"{med['receiving_process_user_ms_per_instance']} + {med['receiving_process_system_ms_per_instance']} | "
                     f"{med['classifier_process_cores_while_sending']} |")
    note = (f"{args.instances} uncompressed 512x512 CR instances per run, 4 storescu senders, runs interleaved; "
            f"lost instances in all runs: {sum(r['lost'] for r in rows)}; load average {load_before:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end.")
    save("listener-reactors", {"title": "The listener with pynetdicom's polling reactors against reactors that wait",
                               "rows": rows, "table": table + ["", note],
                               "command": f"python bench/listener_reactors.py --instances {args.instances} "
                                          f"--repeat {args.repeat}"})


if __name__ == "__main__":
    main()
