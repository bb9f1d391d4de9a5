"""Small helpers shared by every stage: atomic file writes and hashing (no torch here)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import CheckpointError

__all__ = [
    "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "sha256_file", "read_verified", "read_csv_rows",
    "read_json_object", "unique_stem", "usable_cores", "LOG_FORMAT",
]

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the CLI's, and its child processes' (serve's workers, listen's model)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half of it.

    The bytes go to a temporary file in the same directory (same filesystem, named ``.NAME.*.tmp``),
    are fsynced, and then renamed over the target with `os.replace`, which is atomic on POSIX.

    Args:
        durable: also fsync the directory after the rename, so the new name itself survives a power
            cut (what a file acknowledged to someone else needs, e.g. a spooled DICOM instance).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; outputs are meant to be shared like any file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself is now on disk
        finally:
            os.close(folder)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 text (see `atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON; NaN/inf are refused (they are not JSON)."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_verified(path: str | os.PathLike, sha256: str | None, what: str, recorded_in: str) -> bytes:
    """The bytes of ``path``, if their SHA-256 is ``sha256`` (the hash ``recorded_in`` holds for them).

    Every shipped artefact (weights, gate, familiarity statistics, ONNX graphs) is read through
    here, whole and once, so the bytes checked are the bytes used.

    Args:
        path: the file.
        sha256: its expected hex digest (None never matches).
        what: what the file is, for the message (``"weights"``, ``"the gate weights"``, ...).
        recorded_in: the file that records the hash (``"model.json"``, ...).

    Raises:
        CheckpointError: the file cannot be read, or its hash differs; the message names the file.
    """
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror})") from e
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise CheckpointError(f"{path}: {what} do not match {recorded_in} (SHA-256 differs); the files were not written "
                              "together: copy or export the model again")
    return blob


def read_csv_rows(path: str | os.PathLike, columns: set[str], what: str) -> list[dict[str, str]]:
    """The rows of a CSV file (a UTF-8 BOM is fine) that must have ``columns``; `DataError` naming the file otherwise."""
    from .errors import DataError

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DataError(f"{path}: cannot read the {what}: {e}") from e
    if not rows or not columns <= set(rows[0]):
        raise DataError(f"{path}: a {what} needs the columns {' and '.join(map(repr, sorted(columns)))}")
    return rows


def read_json_object(path: str | os.PathLike, fmt: str, what: str, error: type[Exception]) -> dict[str, Any]:
    """A JSON object whose ``format`` field is ``fmt``; ``error`` naming the file when it is unreadable or foreign."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not a readable {what} ({e})") from e
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise error(f"{path}: not a covidxray {what} (expected format {fmt})")
    return obj


def unique_stem(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem_2``, ``stem_3``, ... the first not in ``used`` (which it joins): one output name per input."""
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}_{n}"
    used.add(name)
    return name


def usable_cores() -> int:
    """The cores this process may run on (taskset, a container's cpuset), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
