"""Hospital integration: ``listen`` (a DICOM node that classifies what a PACS sends) and ``results`` (what it recorded)."""

from __future__ import annotations

import argparse
import csv
import json
import signal
import sys
import threading

from .. import DISCLAIMER
from ..results_base import redact

__all__ = ["register"]

_TABLE = (("received_at", 23), ("label", 12), ("reason", 18), ("probability", 11), ("site", 16), ("study_instance_uid", 0))


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``listen`` and ``results`` to the top-level subparsers."""
    li = sub.add_parser("listen", help="DICOM listener (Storage SCP): classify X-rays a PACS sends, record the results")
    li.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    li.add_argument("--port", type=int, default=11112, help="DICOM port (default 11112)")
    li.add_argument("--ae-title", default="COVIDXRAY", help="this node's AE title, which senders must call (default COVIDXRAY)")
    li.add_argument("--db", required=True, help="results database: a file path or sqlite:///PATH (created when missing), or postgresql://USER@HOST/DB "
                                                  "(tables created when missing; needs --spool)")
    li.add_argument("--spool", metavar="DIR", help="received instances wait here until recorded (default: DB.spool)")
    li.add_argument("--model", help="run folder or model.json (default: the bundled model)")
    li.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"],
                    help="auto (default: the fastest exported ONNX graph beside the model, else PyTorch), onnx or torch; "
                         "heat maps always come from the PyTorch weights")
    li.add_argument("--threads", type=int,
                    help="intra-op threads per network call (default: ONNX Runtime 1, a call per core side by side, "
                         "as covidxray.backends.thread_plan says)")
    li.add_argument("--batch-size", type=int, default=32, help="most instances per model call (default 32)")
    li.add_argument("--heatmaps", action="store_true",
                    help="store a Grad-CAM heat map per answered instance for the results list (one backward pass each)")
    li.add_argument("--send-to", metavar="AE@HOST:PORT", help="send a structured report per instance to this node (a PACS)")
    li.add_argument("--send-to-dicomweb", metavar="URL",
                    help="or send the reports by DICOMweb STOW-RS to this root URL (e.g. http://pacs:8042/dicom-web)")
    li.add_argument("--secondary-capture", action="store_true",
                    help="with --send-to: also send the heat map as a Secondary Capture (implies --heatmaps)")
    li.add_argument("--max-associations", type=int, default=16, help="concurrent senders (default 16)")
    li.add_argument("--allow-ae", metavar="A,B", type=_names, default=(),
                    help="only these calling AE titles may send (default: any); others are rejected")
    li.add_argument("--allow-host", metavar="IP,IP", type=_names, default=(),
                    help="only these peer addresses may send (default: any)")
    li.add_argument("--min-free-mb", type=float, default=100.0,
                    help="refuse associations and instances while the spool's disk has less free space (default 100)")
    li.add_argument("--max-instance-mb", type=float, default=1024.0, help="refuse larger instances (default 1024)")
    li.add_argument("--http-port", type=int, metavar="PORT",
                    help="serve /metrics (Prometheus) and /healthz on this port, same --host (default: none)")
    li.add_argument("--sites", metavar="DIR",
                    help="site registry (`covidxray site add ... --institution/--station/--ae`): a film whose InstitutionName, "
                         "StationName or calling AE title matches a site gets its threshold; any other the model's, recorded "
                         "as site not onboarded (default $COVIDXRAY_SITES, else ~/.local/share/covidxray/sites)")
    li.set_defaults(func=cmd_listen)

    re = sub.add_parser("results", help="what the listener recorded (no patient data): table, JSON lines or CSV")
    re.add_argument("--db", required=True, help="results database (file path, sqlite:///PATH or postgresql://USER@HOST/DB)")
    re.add_argument("--since", help="received at or after: ISO date/time (2024-03-01, 2024-03-01T08:00Z) or an age (30m, 24h, 7d)")
    re.add_argument("--limit", type=int, help="newest N rows only")
    re.add_argument("--format", choices=["table", "json", "csv"], default="table", help="json: one object per line")
    re.set_defaults(func=cmd_results)


def _names(text: str) -> tuple[str, ...]:
    """``A,B`` as ``("A", "B")``."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def cmd_listen(args: argparse.Namespace) -> int:
    """Run the DICOM node until SIGTERM or Ctrl-C; what is still spooled is processed at the next start."""
    from ..dicomnode import Listener, ListenerConfig

    config = ListenerConfig(db=args.db, host=args.host, port=args.port, ae_title=args.ae_title, spool=args.spool,
                            model=args.model, backend=args.backend, threads=args.threads, batch_size=args.batch_size,
                            heatmaps=args.heatmaps, send_to=args.send_to, send_to_dicomweb=args.send_to_dicomweb,
                            secondary_capture=args.secondary_capture,
                            max_associations=args.max_associations, http_port=args.http_port,
                            allow_ae=args.allow_ae, allow_hosts=args.allow_host, min_free_mb=args.min_free_mb,
                            max_instance_mb=args.max_instance_mb, sites=args.sites)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    listener = Listener(config).start()
    print(f"covidxray: listening as {config.ae_title} on {config.host}:{listener.port}, results in {redact(config.db)}"
          f"{f', reports to {config.send_to}' if config.send_to else ''}"
          f"{f', metrics on http://{config.host}:{listener.http_port}/metrics' if listener.http_port else ''}"
          f"; Ctrl-C stops. {DISCLAIMER}", flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop()
    print(f"covidxray: stopped ({dict(listener.stats)})", file=sys.stderr)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from ..results import ResultRow, open_results

    store = open_results(args.db, create=False)
    try:
        rows = store.recent(since=args.since, limit=args.limit)
    finally:
        store.close()
    if args.format == "json":
        for row in rows:
            print(json.dumps(row.to_dict()))
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(ResultRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(row.to_dict() for row in rows)
    else:
        print("  ".join(name.ljust(width) for name, width in _TABLE).rstrip())
        for row in rows:
            values = {**row.to_dict(), "probability": "" if row.probability is None else f"{row.probability:.4f}",
                      "site": row.site or "not onboarded"}
            print("  ".join(str(values[name] or "").ljust(width) for name, width in _TABLE).rstrip())
        print(f"# {len(rows)} instances; label covid = COVID-19 positive (model output). {DISCLAIMER}", file=sys.stderr)
    return 0
