"""The listener's door: who may send, and whether what they send can be kept.

Three checks, each a refusal the sender understands instead of an acknowledgement covidxray
could not honour:

- an association from a calling AE title (or host) not on the allow-list is rejected
  (A-ASSOCIATE-RJ, permanent, "calling AE title not recognised");
- while the spool's disk has less than ``min_free_mb`` free, new associations are rejected as
  transient congestion, and C-STOREs on open ones are answered 0xA700 (out of resources): the
  PACS keeps the instance and retries, rather than hearing "stored" for a file that could not be;
- an instance larger than ``max_instance_mb`` is answered 0xA700 and not written. pynetdicom has
  already received it into memory by then; the limit protects the disk and the decoder.

Refusals are logged with the calling AE title and address (device names, not patient data) and
counted in ``/metrics`` by reason.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .sr import check_ae_title

__all__ = ["Guard", "Refusal"]

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
_PERMANENT_UNKNOWN_CALLER = (0x01, 0x01, 0x03)  # rejected permanent, by the service user: calling AE not recognised
_PERMANENT_NO_REASON = (0x01, 0x01, 0x01)
_TRANSIENT_CONGESTION = (0x02, 0x03, 0x01)  # rejected transient, by the presentation layer: temporary congestion


@dataclass(frozen=True)
class Refusal:
    """Why something was refused: a word for logs and metrics, and the A-ASSOCIATE-RJ fields to send."""

    reason: str  # calling_ae_not_allowed, host_not_allowed, low_disk_space, instance_too_large
    reject: tuple[int, int, int] = _PERMANENT_NO_REASON


@dataclass
class Guard:
    """The listener's checks (see the module docstring).

    Args:
        spool: the spool folder, whose disk is watched.
        allow_ae: calling AE titles allowed to send; empty: any.
        allow_hosts: peer IP addresses allowed to send; empty: any.
        min_free_mb: refuse while the spool's disk has less free space than this.
        max_instance_mb: refuse an instance larger than this (None: no limit).
    """

    spool: Path
    allow_ae: frozenset[str] = frozenset()
    allow_hosts: frozenset[str] = frozenset()
    min_free_mb: float = 0.0
    max_instance_mb: float | None = None

    def __post_init__(self) -> None:
        for title in self.allow_ae:
            check_ae_title(title, "--allow-ae")

    def free_mb(self) -> float:
        """Free space on the spool's disk, in MiB."""
        return shutil.disk_usage(self.spool).free / 2**20

    def association(self, calling_ae: str, host: str) -> Refusal | None:
        """Why an association from ``calling_ae`` at ``host`` is refused (None: accept it)."""
        if self.allow_ae and calling_ae.strip() not in self.allow_ae:
            return Refusal("calling_ae_not_allowed", _PERMANENT_UNKNOWN_CALLER)
        if self.allow_hosts and host not in self.allow_hosts:
            return Refusal("host_not_allowed")
        if self.free_mb() < self.min_free_mb:
            return Refusal("low_disk_space", _TRANSIENT_CONGESTION)
        return None

    def instance(self, size_bytes: int) -> Refusal | None:
        """Why an instance of ``size_bytes`` is refused (None: spool it)."""
        if self.max_instance_mb is not None and size_bytes > self.max_instance_mb * 2**20:
            return Refusal("instance_too_large")
        if self.free_mb() - size_bytes / 2**20 < self.min_free_mb:
            return Refusal("low_disk_space")
        return None
