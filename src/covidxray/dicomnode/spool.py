"""The spool: received instances on disk, written safely before the sender is told they arrived.

An instance is acknowledged (C-STORE status 0x0000) only after its bytes are in a file that is
complete, fsynced and renamed into place, and the folder itself is fsynced: after a crash or a
power cut every acknowledged instance is either still in the spool or already recorded in the
results database, never lost. Files leave the spool once their result is committed (and, with
``--send-to``, once the report went back), so whatever is found at start-up is unfinished work.

Files are named by SOP Instance UID, so a resent instance replaces its own file rather than
queueing twice. The spool holds full DICOM files, patient data included: keep it on the same
protected disk as the PACS data, never in a shared folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import DicomNodeError
from ..results import iso_utc
from ..utils import atomic_write_bytes

__all__ = ["Spool"]

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # what the DICOM standard allows in a UID (at most 64 characters)


class Spool:
    """A folder of received DICOM files awaiting classification.

    Args:
        folder: created when missing; leftovers of interrupted writes (``*.tmp``) are removed.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            os.chmod(self.folder, 0o700)  # patient data: this user only
            for tmp in self.folder.glob("*.tmp"):  # never acknowledged: the sender saw no success for it
                tmp.unlink()
        except OSError as exc:
            raise DicomNodeError(f"{self.folder}: cannot use this folder as the spool ({exc.strerror})") from None

    def path_for(self, sop_instance_uid: str) -> Path:
        """Where the instance with this UID is spooled (a hash names a UID that is not a valid one)."""
        uid = sop_instance_uid.strip().rstrip("\0")
        name = uid if len(uid) <= 64 and _UID.fullmatch(uid) else "x" + hashlib.sha256(uid.encode()).hexdigest()
        return self.folder / f"{name}.dcm"

    def put(self, sop_instance_uid: str, data: bytes) -> Path:
        """Store one instance durably (write, fsync, rename, fsync the folder); returns its path."""
        path = self.path_for(sop_instance_uid)
        # A temporary name per call (mkstemp), so concurrent writers of one UID never share one; the last rename wins.
        atomic_write_bytes(path, data, durable=True)
        return path

    def pending(self) -> list[Path]:
        """The spooled files, oldest first (the order they arrived)."""
        files = []
        for p in self.folder.glob("*.dcm"):
            try:
                files.append((p.stat().st_mtime_ns, p))
            except FileNotFoundError:  # recorded and removed by the worker between the listing and the look
                continue
        return [p for _, p in sorted(files)]

    def oldest_age_s(self) -> float:
        """Seconds since the oldest spooled file arrived (0 when the spool is empty)."""
        pending = self.pending()
        try:
            return max(0.0, time.time() - pending[0].stat().st_mtime) if pending else 0.0
        except FileNotFoundError:  # it left the spool while we looked
            return 0.0

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    @staticmethod
    def received_at(path: Path) -> str:
        """When the file was spooled (its modification time), as the results database writes times."""
        try:
            return iso_utc(datetime.fromtimestamp(path.stat().st_mtime, timezone.utc))
        except FileNotFoundError:
            return iso_utc(datetime.now(timezone.utc))
