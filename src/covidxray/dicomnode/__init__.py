"""covidxray as a DICOM node: receive X-rays from a PACS, classify them, record the results, answer back.

::

    PACS / modality --C-STORE--> listener --spool (fsync, rename)--> 0x0000 Success
                                   |
                                 worker: batches -> Predictor -> results database (covidxray.results)
                                   |
                                 reporter (--send-to): Structured Report (+ heat map capture) --C-STORE--> PACS

Modules: `spool` (durable receipt), `worker` (spooled files -> result rows), `sr` (the report, the
heat-map capture, sending), `listener` (the Storage SCP and its threads).
"""

from __future__ import annotations

from .listener import Listener, ListenerConfig

__all__ = ["Listener", "ListenerConfig"]
