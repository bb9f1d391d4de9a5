"""Does pynetdicom's polling cost the listener its throughput? Stock reactors against reactors that wait.

    .venv/bin/python bench/listener_reactors.py [--instances 600] [--repeat 3]

Each association runs two pynetdicom threads that poll: the association's reactor sleeps 1 ms between looks at its
message queue, and the DUL's reactor sleeps 1 ms (``_run_loop_delay``) whenever it found nothing to do. Here the
listener runs three ways, interleaved ``--repeat`` times on the same files (4 ``storescu`` senders, uncompressed
512 px CR, `listener.run`), the reactors patched in the listener's process only (a ``sitecustomize`` on its
``PYTHONPATH``; nothing in the product changes):

* ``stock``;
* ``association waits``: the association's reactor blocks on its message queue instead (woken by the message, 20 ms
  at most, so that releases and aborts are still seen);
* ``association waits, DUL 5 ms``: that, and the DUL's idle sleep 5 ms instead of 1 (it still polls: its socket and
  its send queue have no common wake-up).

A patched run whose log lacks the patch's marker line, or any log with "Error in sitecustomize", stops the bench.
Reported per run: instances/s end to end, and the receiving process's own CPU per instance (user + system, its
classifier process left out, `listener.run`). If polling were what keeps the listener short of CPU, the patched runs
would take less of it and be faster.
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

WAYS = {"stock": "", "association waits": "association", "association waits, DUL 5 ms": "association dul"}
MARKER = "bench: pynetdicom reactors patched:"
PATCH = '''
import inspect, os, queue, sys, textwrap
import pynetdicom.association as association
import pynetdicom.dul as dul

patches = os.environ.get("COVIDXRAY_BENCH_REACTORS", "").split()

if "association" in patches:
    source = textwrap.dedent(inspect.getsource(association.Association._run_reactor))
    polling = ("time.sleep(0.001)\\n", "context_id, msg = self.dimse.get_msg(block=False)")
    assert all(p in source for p in polling), "pynetdicom's association reactor changed: this patch no longer applies"
    source = source.replace(polling[0], "pass\\n", 1).replace(polling[1], (
        "try:\\n" + " " * 12 + "context_id, msg = self.dimse.msg_queue.get(timeout=0.02)\\n"
        + " " * 8 + "except queue.Empty:\\n" + " " * 12 + "context_id, msg = None, None"), 1)
    scope = {}
    exec(compile(source, "waiting reactor", "exec"), {**vars(association), "queue": queue}, scope)
    association.Association._run_reactor = scope["_run_reactor"]

if "dul" in patches:
    stock_init = dul.DULServiceProvider.__init__

    def slower_init(self, *args, **kwargs):
        stock_init(self, *args, **kwargs)
        self._run_loop_delay = 0.005

    dul.DULServiceProvider.__init__ = slower_init

if patches:
    print("bench: pynetdicom reactors patched:", *patches, file=sys.stderr, flush=True)
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()[0]
    stock_path = os.environ.get("PYTHONPATH")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "patch").mkdir()
        (work / "patch" / "sitecustomize.py").write_text(PATCH)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(work / "patch"), *([stock_path] if stock_path else [])])
        paths = make_files(work / "films", args.instances, uid.ExplicitVRLittleEndian)
        try:
            for _ in range(args.repeat):
                for way, patches in WAYS.items():
                    os.environ["COVIDXRAY_BENCH_REACTORS"] = patches
                    name = f"run-{len(rows)}"
                    row = run(paths, work, 4, name)
                    check_patched(work / f"{name}.log", patches)
                    rows.append({"reactors": way, "instances_per_s": row["instances_per_s"], "lost": row["lost"],
                                 "receiving_cpu_ms_per_instance": round(row["receiving_process_user_ms_per_instance"]
                                                                        + row["receiving_process_system_ms_per_instance"], 2),
                                 **{k: row[k] for k in ("receiving_process_user_ms_per_instance",
                                                        "receiving_process_system_ms_per_instance",
                                                        "machine_cores_while_sending")}})
                    print(rows[-1], flush=True)
        finally:
            os.environ.pop("COVIDXRAY_BENCH_REACTORS", None)
            if stock_path is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = stock_path
    table = ["| reactors | instances/s (each run) | median | receiving process CPU ms per instance, user + system "
             "(each run) | median |", "|---|---:|---:|---:|---:|"]
    for way in WAYS:
        mine = [r for r in rows if r["reactors"] == way]
        table.append(f"| {way} | {', '.join(str(r['instances_per_s']) for r in mine)} | "
                     f"{statistics.median(r['instances_per_s'] for r in mine)} | "
                     f"{', '.join(str(r['receiving_cpu_ms_per_instance']) for r in mine)} | "
                     f"{statistics.median(r['receiving_cpu_ms_per_instance'] for r in mine):.2f} |")
    note = (f"{args.instances} uncompressed 512x512 CR instances per run, 4 storescu senders, runs interleaved; "
            f"lost instances in all runs: {sum(r['lost'] for r in rows)}; load average {load_before:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end.")
    save("listener-reactors", {"title": "The listener with pynetdicom's polling reactors against reactors that wait",
                               "rows": rows, "table": table + ["", note],
                               "command": f"python bench/listener_reactors.py --instances {args.instances} "
                                          f"--repeat {args.repeat}"})


def check_patched(log: Path, patches: str) -> None:
    """Stop unless the listener's log shows the patch applied (or, for the stock runs, none): a sitecustomize that
    fails only prints a line, and the runs would compare stock with stock."""
    text = log.read_text(errors="replace")
    if "Error in sitecustomize" in text or (MARKER in text) != bool(patches):
        raise SystemExit(f"{log.name}: the reactors are not as asked ({patches or 'stock'}):\n{text[-2000:]}")


if __name__ == "__main__":
    main()
