"""Operations metrics in Prometheus' text format, for ``serve`` and ``listen``: what came in, what went out, what failed.

One `Telemetry` per process (its own registry, so two listeners in one test process do not share
counts). Under ``serve --workers N`` each worker process counts into files in ``$PROMETHEUS_MULTIPROC_DIR``
(prometheus_client's multiprocess mode, which `serve` sets up) and every scrape, whichever worker answers it,
renders the sum of all of them. Every label value is a word chosen by covidxray (a label, a reason, an error code, a
route template, an outcome), never a file name, a UID or a DICOM tag: the metrics hold no
patient data. The listener serves them on a small HTTP port of its own (`serve_http`, which
answers ``/metrics`` and ``/healthz``); the REST API serves them at ``/metrics``.

Named for operations, not for the model's sensitivity and AUC, which are `covidxray.metrics`.

Example:
    >>> t = Telemetry()
    >>> t.answer("covid", None)
    >>> b"covidxray_answers_total" in t.render()
    True
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["CONTENT_TYPE", "Telemetry", "serve_http"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
log = logging.getLogger(__name__)
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)  # seconds: a film takes 0.05-2 s on a CPU


class Telemetry:
    """The counters, histogram and gauges of one covidxray process."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir  # serve --workers N: every worker counts into files there
        self.registry = r = CollectorRegistry()
        self.requests = Counter("covidxray_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=r)
        self.latency = Histogram("covidxray_http_request_seconds", "HTTP request latency", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.answers = Counter("covidxray_answers", "instances or uploads classified, by answer: covid, normal, "
                               "not_answered (the input gate refused it) or error (unreadable)", ["label"], registry=r)
        self.refusals = Counter("covidxray_input_gate_refusals", "not answered, by the input gate's reason",
                                ["reason"], registry=r)
        self.errors = Counter("covidxray_errors", "errors by code (unreadable files; API error codes)", ["code"], registry=r)
        self.received = Counter("covidxray_dicom_received", "DICOM instances spooled and acknowledged", registry=r)
        self.refused = Counter("covidxray_dicom_refused", "associations or instances the listener refused, by reason",
                               ["reason"], registry=r)
        self.reports = Counter("covidxray_reports", "structured reports sent back, by outcome (sent, failed)",
                               ["outcome"], registry=r)
        self.spool_files = Gauge("covidxray_spool_files", "instances in the spool, not yet recorded or reported", registry=r)
        self.spool_age = Gauge("covidxray_spool_oldest_seconds", "age of the oldest spooled instance (0: none)", registry=r)

    def answer(self, label: str, reason: str | None) -> None:
        """Count one answer; a refusal also by its reason, an unreadable file also as an error by its reason."""
        self.answers.labels(label).inc()
        if label == "not_answered":
            self.refusals.labels(reason or "unknown").inc()
        elif label == "error":
            self.errors.labels(reason or "unknown").inc()

    def watch_spool(self, files: Callable[[], float], oldest_age_s: Callable[[], float]) -> None:
        """Read the spool gauges from these functions at each scrape (always current, nothing to update)."""
        self.spool_files.set_function(files)
        self.spool_age.set_function(oldest_age_s)

    def render(self) -> bytes:
        """Everything, in Prometheus' text exposition format (every worker's counts under ``serve --workers N``)."""
        if not self.multiprocess_dir:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.multiprocess_dir)
        return generate_latest(registry)


def serve_http(telemetry: Telemetry, host: str, port: int, healthy: Callable[[], bool]) -> ThreadingHTTPServer:
    """Serve ``/metrics`` and ``/healthz`` (200, or 503 when ``healthy()`` is False) in a daemon thread.

    Returns the server (``server_address[1]`` is the real port when ``port`` was 0); ``shutdown()`` stops it.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server name
            if self.path == "/metrics":
                self._answer(200, telemetry.render(), CONTENT_TYPE)
            elif self.path == "/healthz":
                ok = healthy()
                self._answer(200 if ok else 503, b"ok\n" if ok else b"unhealthy\n", "text/plain")
            else:
                self._answer(404, b"not found: try /metrics or /healthz\n", "text/plain")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every few seconds would flood the log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="covidxray-metrics", daemon=True).start()
    return server
