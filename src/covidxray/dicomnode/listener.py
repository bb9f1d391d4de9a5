"""``covidxray listen``: a DICOM Storage SCP that classifies what it receives and records the results.

Three kinds of threads, joined by two queues:

1. pynetdicom's, one per association (several senders at once): each C-STORE is written to the
   `Spool` (fsync, rename) and only then acknowledged with status 0x0000; nothing is decoded there.
2. one worker: takes whatever is queued (up to ``batch_size``), skips instances already recorded
   (a resend is recorded once), has the rest classified in batched model calls (one per lane) by the
   `Classifier`, a process of its own unless a loaded model was given, and commits the rows in one
   transaction; then the files leave the spool. The next batch is classified while one is committed.
3. with ``send_to``, one reporter: sends each instance's structured report (and heat map capture)
   back to the PACS over one association per batch, retries with back-off, records the outcome.

At start-up the spool is processed before the port opens: instances acknowledged before a crash
are classified (or, already recorded, only reported) now. Logs carry counts and reasons, never
a DICOM tag, and pynetdicom's own log is kept at warnings for the same reason.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000,
    JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless,
    JPEGLSNearLossless, RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom import sop_class as sc
from pynetdicom.dsutils import encode_file_meta

from ..errors import DicomNodeError
from ..predictor import Predictor
from ..results import open_results, utc_now
from ..telemetry import Telemetry, serve_http
from .dicomweb import DicomWeb, stow
from .guard import Guard
from .sr import Destination, build_heatmap_capture, build_report, check_ae_title, send_datasets
from .spool import Spool
from .classifier import Classifier
from .worker import Classified, InFlight, read_header, take

__all__ = ["ListenerConfig", "Listener", "STORAGE_CLASSES", "TRANSFER_SYNTAXES"]

log = logging.getLogger(__name__)

# Radiographs (CR; DX, which DR systems send), secondary captures (digitised films) and CT, which is
# accepted only so that a misrouted CT is recorded as not answered instead of vanishing in a refused association.
STORAGE_CLASSES = (
    sc.ComputedRadiographyImageStorage, sc.DigitalXRayImageStorageForPresentation,
    sc.DigitalXRayImageStorageForProcessing, sc.SecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage, sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    sc.CTImageStorage,
)
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
)
_SENT = {0x0000, 0xB000, 0xB006, 0xB007}  # success, or success with a warning (coercion, elements discarded)
_SLOW_SPOOL_S = 5.0  # a write + fsync slower than this is logged
_REPORT_TRIES = 5  # then the report is recorded as failed and the file leaves the spool


@dataclass(frozen=True)
class ListenerConfig:
    """How ``covidxray listen`` runs (the CLI builds it from its flags)."""

    db: str  # results database: a file path or sqlite:///PATH
    host: str = "127.0.0.1"  # address to listen on (0.0.0.0: every interface)
    port: int | None = 11112  # DICOM port (0: any free one; 104 needs root; None: none, DICOMweb STOW-RS only)
    ae_title: str = "COVIDXRAY"  # this node's AE title; senders must call it
    spool: str | None = None  # folder for received instances until recorded (default: DB path + ".spool")
    model: str | None = None  # run folder or model.json (None: the bundled model)
    backend: str = "auto"  # auto (the fastest exported graph), onnx or torch; heat maps always use the PyTorch weights
    threads: int | None = None  # model intra-op threads (None: the library's default)
    batch_size: int = 32  # most instances per model call
    heatmaps: bool = False  # store a Grad-CAM overlay per answered instance (a backward pass each)
    send_to: str | None = None  # AE@HOST:PORT that gets a structured report per instance
    send_to_dicomweb: str | None = None  # or a DICOMweb root URL that gets them by STOW-RS
    secondary_capture: bool = False  # with send_to: also send the heat map as a Secondary Capture
    max_associations: int = 16  # concurrent senders
    timeout_s: float = 60.0  # network, ACSE and DIMSE timeouts
    http_port: int | None = None  # serve /metrics and /healthz on this port (0: any free one; None: no HTTP)
    allow_ae: tuple[str, ...] = ()  # calling AE titles allowed to send (empty: any)
    allow_hosts: tuple[str, ...] = ()  # peer IP addresses allowed to send (empty: any)
    min_free_mb: float = 100.0  # refuse while the spool's disk has less free space (MiB)
    max_instance_mb: float | None = 1024.0  # refuse larger instances (MiB; None: no limit)
    sites: str | None = None  # site registry folder: films matched to a site by header or AE (None: the default registry)

    def spool_folder(self) -> Path:
        if self.spool:
            return Path(self.spool)
        if "://" in self.db and not self.db.startswith("sqlite://"):
            raise DicomNodeError(f"--db {self.db}: give --spool FOLDER as well (it cannot go beside a server database)")
        return Path(self.db.removeprefix("sqlite:///") + ".spool")


def _with_sender(event: evt.Event, calling_ae: str) -> bytes:
    """The received instance as a DICOM file whose meta header names the sender (Source Application Entity Title,
    as DCMTK's storescp writes it): the spool keeps who sent it, for the site match, across a restart."""
    meta = event.file_meta
    meta.SourceApplicationEntityTitle = calling_ae
    return b"".join((b"\x00" * 128, b"DICM", encode_file_meta(meta), event.request.DataSet.getvalue()))


class Listener:
    """The DICOM node: `start` it, `stop` it; `port` is where it listens.

    Args:
        config: see `ListenerConfig`.
        predictor: an already loaded model (tests, benchmarks); None loads ``config.model``.
    """

    def __init__(self, config: ListenerConfig, predictor: Predictor | None = None):
        check_ae_title(config.ae_title, "--ae-title")
        self.config = config
        if config.send_to and config.send_to_dicomweb:
            raise DicomNodeError("give --send-to or --send-to-dicomweb, not both")
        self.destination: Destination | DicomWeb | None = (
            Destination.parse(config.send_to) if config.send_to else
            DicomWeb.parse(config.send_to_dicomweb) if config.send_to_dicomweb else None)
        if config.secondary_capture and not self.destination:
            raise DicomNodeError("--secondary-capture needs --send-to AE@HOST:PORT (or --send-to-dicomweb URL)")
        self.heatmaps = config.heatmaps or config.secondary_capture
        self.predictor = predictor
        self.classifier: Classifier | None = None  # made at start: in this process with ``predictor``, else a child
        self.spool = Spool(config.spool_folder())
        self.guard = Guard(self.spool.folder, frozenset(config.allow_ae), frozenset(config.allow_hosts),
                           config.min_free_mb, config.max_instance_mb)
        self.store = open_results(config.db)
        self.stats: Counter[str] = Counter()
        self.telemetry = Telemetry()
        self.telemetry.watch_spool(lambda: len(self.spool.pending()), self.spool.oldest_age_s)
        self._http = None
        self._work: queue.Queue[tuple[str, Path, str] | None] = queue.Queue()
        self._reports: queue.Queue[tuple[Classified, int] | None] = queue.Queue()
        self._pending = 0  # instances queued and not yet finished (recorded and, with send_to, reported)
        self._idle = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None

    @property
    def port(self) -> int:
        """The port the listener is bound to (the real one when the config said 0)."""
        if self._server is None:
            raise DicomNodeError("the listener is not started")
        return self._server.server_address[1]

    def start(self) -> "Listener":
        """Load the model, queue what the spool still holds, start the threads, then open the port."""
        for noisy in ("pynetdicom", "highdicom"):  # their info and debug lines quote DICOM tags and UIDs
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # The sites are checked now (a profile for other weights stops the start) and read once.
        self.classifier = Classifier(self.predictor, self.config.model, self.config.backend, self.config.threads,
                                     self.config.sites, self.heatmaps)
        log.info("sites from %s: %s", self.classifier.registry, ", ".join(self.classifier.sites) or "none")
        for path in (leftovers := self.spool.pending()):
            self._enqueue(path.stem, path, Spool.received_at(path))
        if leftovers:
            log.info("resuming %d instances left in the spool", len(leftovers))
        self._threads = [threading.Thread(target=self._work_loop, name="covidxray-worker", daemon=True)]
        if self.destination:
            self._threads.append(threading.Thread(target=self._report_loop, name="covidxray-reporter", daemon=True))
        for thread in self._threads:
            thread.start()
        if self.config.port is not None:
            self._open_dicom_port()
        if self.config.http_port is not None:
            self._http = serve_http(self.telemetry, self.config.host, self.config.http_port, self._healthy)
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.http_port)
        return self

    def _open_dicom_port(self) -> None:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.require_called_aet = True
        ae.maximum_pdu_size = 0  # no limit: senders may use large PDUs, fewer round trips per film
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = self.config.timeout_s
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        ae.add_supported_context(sc.Verification)  # C-ECHO, as PACS use to test a node
        try:
            self._server = ae.start_server((self.config.host, self.config.port), block=False,
                                           evt_handlers=[(evt.EVT_REQUESTED, self._on_requested),
                                                         (evt.EVT_C_STORE, self._on_store)])
        except OSError as exc:
            self.stop()
            raise DicomNodeError(f"cannot listen on {self.config.host}:{self.config.port}: {exc.strerror}") from None
        log.info("listening as %s on %s:%d (model %s)", self.config.ae_title, self.config.host, self.port, self.classifier.name)

    @property
    def http_port(self) -> int | None:
        """The port of ``/metrics`` and ``/healthz`` (None without ``http_port``)."""
        return self._http.server_address[1] if self._http is not None else None

    def _healthy(self) -> bool:
        return not self._stopping.is_set() and all(thread.is_alive() for thread in self._threads)

    def stop(self, timeout_s: float = 60) -> None:
        """Close the port, finish the batch in hand, and stop; what is still spooled waits for the next start."""
        if self._server is not None:
            self._server.shutdown()
        if self._http is not None:
            self._http.shutdown()
        self._stopping.set()
        self._work.put(None)
        self._reports.put(None)
        for thread in self._threads:
            thread.join(timeout_s)
        if self.classifier is not None:
            self.classifier.close()
        self.store.close()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until everything received so far is recorded (and reported); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    # ------------------------------------------------------------------------------------ receiving

    def _on_requested(self, event: evt.Event) -> None:
        calling_ae, host = str(event.assoc.requestor.primitive.calling_ae_title).strip(), event.assoc.requestor.address
        refusal = self.guard.association(calling_ae, host)  # before negotiation: the requestor's fields are not set yet
        if refusal is not None:
            log.warning("refused an association from %s at %s: %s", calling_ae, host, refusal.reason)
            self.telemetry.refused.labels(refusal.reason).inc()
            event.assoc.acse.send_reject(*refusal.reject)
            event.assoc.kill()  # as pynetdicom's own rejections do: the DUL sends the A-ASSOCIATE-RJ, then stops

    def _on_store(self, event: evt.Event) -> int:
        sender = str(event.assoc.requestor.ae_title).strip()
        return self.accept(str(event.request.AffectedSOPInstanceUID), lambda: _with_sender(event, sender), sender,
                           event.request.DataSet.getbuffer().nbytes)

    def accept(self, sop_uid: str, encoded: Callable[[], bytes], sender: str, size: int) -> int:
        """Spool one received instance (C-STORE or STOW-RS) and queue it; the DICOM status to answer.

        Args:
            sop_uid: its SOP Instance UID.
            encoded: makes the DICOM file's bytes (called only once the size and disk checks pass).
            sender: the calling AE title or client address, for the log.
            size: the instance's size in bytes, for the checks.
        """
        refusal = self.guard.instance(size)
        if refusal is not None:  # the sender keeps the instance and hears why
            log.warning("refused an instance from %s: %s (0xA700)", sender, refusal.reason)
            self.telemetry.refused.labels(refusal.reason).inc()
            return 0xA700
        start = time.monotonic()
        try:
            path = self.spool.put(sop_uid, encoded())
        except OSError as exc:
            log.error("cannot spool a received instance (%s): refused with 0xA700", exc.strerror)
            self.telemetry.refused.labels("spool_write_failed").inc()
            return 0xA700  # out of resources: the sender keeps the instance and may retry
        if (took := time.monotonic() - start) > _SLOW_SPOOL_S:  # senders give up after their DIMSE timeout (often 30 s)
            log.warning("spooling one instance from %s took %.1f s (a slow or busy disk)", sender, took)
        self._enqueue(sop_uid, path, utc_now(), received=True)
        return 0x0000

    def _enqueue(self, sop_uid: str, path: Path, received_at: str, received: bool = False) -> None:
        with self._idle:  # association threads call this concurrently
            self._pending += 1
            self.stats["received"] += received
        if received:
            self.telemetry.received.inc()
        self._work.put((sop_uid, path, received_at))

    def _finished(self, n: int) -> None:
        with self._idle:
            self._pending -= n
            if self._pending == 0:
                self._idle.notify_all()

    # ------------------------------------------------------------------------------------ classifying

    def _work_loop(self) -> None:
        """Batches reach the classifier one ahead of the database: once it has classified a batch, what queued
        meanwhile goes to it at once, and only then is the classified batch recorded (the commit and the spool's
        clean-up no longer leave the classifier idle)."""
        ahead: InFlight | None = None
        while True:
            if ahead is not None and ahead.future is not None:
                wait([ahead.future])
            batch = take(self._work, self.config.batch_size, block=ahead is None)
            sent = self._guarded(batch, self._send, batch, ahead) if batch else None
            if ahead is not None:
                self._guarded(ahead.batch, self._record, ahead)
            if batch is None:
                return
            ahead = sent

    def _guarded(self, batch: list[tuple[str, Path, str]], step: Callable, *args):
        """``step(*args)``; on a database or disk failure the batch is queued again in 5 s (on stop: left spooled)."""
        try:
            return step(*args)
        except Exception:
            log.exception("could not record a batch of %d instances; retrying in 5 s", len(batch))
            if not self._stopping.wait(5):
                for item in batch:
                    self._work.put(item)
            return None

    def _send(self, batch: list[tuple[str, Path, str]], ahead: InFlight | None) -> InFlight:
        """Have a batch's new instances classified; those recorded before, or in the batch ``ahead`` (a resend
        queued twice), are looked up once that one is recorded."""
        unique = {sop: (sop, path, received) for sop, path, received in batch}  # a resend queued twice
        skip = self.store.known(unique) | (set(ahead.unique) if ahead is not None else set())
        fresh = [item for sop, item in unique.items() if sop not in skip]
        return InFlight(batch, unique, fresh, self.classifier.submit(fresh) if fresh else None, time.perf_counter())

    def _record(self, sent: InFlight) -> None:
        done = sent.future.result() if sent.future is not None else []
        added = self.store.record([c.row for c in done], {c.row.sop_instance_uid: c.heatmap_png for c in done if c.heatmap_png})
        fresh = {sop for sop, _, _ in sent.fresh}
        for sop in sent.unique.keys() - fresh:  # recorded before (a resend, or a crash after the commit): perhaps not yet reported
            if (row := self.store.get(sop)) is None:  # it was in the batch before, which failed: both go round again
                raise RuntimeError("an instance of this batch was in the one before it, which was not recorded")
            path = sent.unique[sop][1]
            done.append(Classified(path, row, read_header(path) if row.report_status is None else None,
                                   self.store.heatmap(sop)))
        labels = Counter(c.row.reason or c.row.label for c in done[:len(fresh)])
        for c in done[:len(fresh)]:
            self.telemetry.answer(c.row.label, c.row.reason)
        self.stats.update(recorded=added, duplicates=len(sent.batch) - added, **{f"label_{k}": v for k, v in labels.items()})
        log.info("recorded %d instances (%s; %d already known) in %.2f s", added,
                 ", ".join(f"{k} {v}" for k, v in sorted(labels.items())) or "-", len(sent.batch) - added,
                 time.perf_counter() - sent.start)
        for c in done:
            if self.destination and c.row.report_status is None:
                self._reports.put((c, 0))
            else:
                self.spool.remove(c.path)
                self._finished(1)
        self._finished(len(sent.batch) - len(sent.unique))  # queued duplicates need no further work

    # ------------------------------------------------------------------------------------ answering back

    def _report_loop(self) -> None:
        while (batch := take(self._reports)) is not None:
            self._send_reports(batch)

    def _send_reports(self, batch: list[tuple[Classified, int]]) -> None:
        datasets, owners, retry = [], [], []
        for c, tries in batch:
            if c.header is None or "StudyInstanceUID" not in c.header or "SOPClassUID" not in c.header:
                self._report_done(c, "failed: no DICOM header to refer to")
                continue
            try:
                made = [build_report(c.header, c.row)]
                if self.config.secondary_capture and c.heatmap_png:
                    made.append(build_heatmap_capture(c.header, c.heatmap_png))
            except Exception as exc:  # noqa: BLE001 - a header highdicom refuses: recorded, the others go on
                self._report_done(c, f"failed: report not built ({type(exc).__name__})")
                continue
            datasets += made
            owners += [(c, tries)] * len(made)
        if not datasets:
            return
        try:
            statuses = (stow(datasets, self.destination, self.config.timeout_s) if isinstance(self.destination, DicomWeb)
                        else send_datasets(datasets, self.destination, self.config.ae_title, self.config.timeout_s))
        except DicomNodeError as exc:
            statuses, error = [None] * len(datasets), str(exc)
        else:
            error = "the PACS answered with a failure status"
        outcome: dict[str, tuple[Classified, int, bool]] = {}
        for (c, tries), status in zip(owners, statuses, strict=True):
            ok = status in _SENT and outcome.get(c.row.sop_instance_uid, (c, tries, True))[2]
            outcome[c.row.sop_instance_uid] = (c, tries, ok)
        for c, tries, ok in outcome.values():
            if ok:
                self._report_done(c, "sent")
            elif tries + 1 >= _REPORT_TRIES:
                self._report_done(c, f"failed: {error}")
            else:
                retry.append((c, tries + 1))
        if retry:
            log.warning("%d reports not delivered to %s (%s); retrying", len(retry), self.destination, error)
            if not self._stopping.wait(2 ** retry[0][1]):  # 2, 4, 8, 16 s; on stop they stay spooled for next time
                for item in retry:
                    self._reports.put(item)

    def _report_done(self, c: Classified, status: str) -> None:
        self.store.set_report_status(c.row.sop_instance_uid, status)
        self.stats["reports_sent" if status == "sent" else "reports_failed"] += 1
        self.telemetry.reports.labels("sent" if status == "sent" else "failed").inc()
        self.spool.remove(c.path)
        self._finished(1)
