"""Batch prediction files: what to classify (files, folders, globs, a manifest) and where the answers go.

Predictions to CSV at scale: each process appends to its own part file ``OUT.partN`` (flushed
often, so a crash loses little and `covidxray predict --resume` skips what is done); at the end
the parts are merged into ``OUT`` in input order, atomically.
"""

from __future__ import annotations

import csv
import glob
import io
import os
from pathlib import Path
from typing import Sequence

from .errors import DataError
from .predictor import Prediction
from .utils import atomic_write_text

__all__ = [
    "CSV_FIELDS", "expand_inputs", "read_path_manifest", "part_file", "read_predictions", "PartWriter", "merge_predictions",
    "remove_parts",
]


def expand_inputs(items: Sequence[str]) -> list[Path]:
    """Files, folders (recursively, hidden files skipped) and glob patterns -> sorted file list."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        try:
            is_dir, exists = p.is_dir(), p.exists()
        except OSError:  # e.g. a name too long for the file system: the loader reports it by name
            is_dir, exists = False, False
        if is_dir:
            out += sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif any(c in item for c in "*?[") and not exists:
            out += sorted(Path(m) for m in glob.glob(item, recursive=True) if Path(m).is_file())
        else:
            out.append(p)  # missing files are reported by the loader, by name
    return out


CSV_FIELDS = ("path", "label", "probability", "threshold", "reason", "unfamiliarity", "message", "site", "site_onboarded", "note")


def read_path_manifest(csv_path: str | os.PathLike) -> list[Path]:
    """Image paths from a CSV with a ``path`` column (labels and other columns are ignored).

    Relative paths are resolved against the CSV's folder, as in a training manifest.

    Raises:
        DataError: the file cannot be read or has no ``path`` column.
    """
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or []):
                raise DataError(f"{csv_path}: a manifest for predict needs a header with a 'path' column")
            base = csv_path.resolve().parent
            return [p if p.is_absolute() else base / p for p in (Path(row["path"]) for row in reader if row["path"])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read manifest: {e}") from e


def part_file(out: str | os.PathLike, rank: int) -> Path:
    """``OUT.partN``: where process ``rank`` collects its rows before they are merged into ``out``."""
    out = Path(out)
    return out.with_name(f"{out.name}.part{rank}")


def _part_files(out: Path) -> dict[int, Path]:
    """Existing ``OUT.partN`` files by ``N``."""
    prefix = f"{out.name}.part"
    if not out.parent.is_dir():
        return {}
    return {int(p.name[len(prefix):]): p for p in out.parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit()}


def _complete_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a prediction CSV; a torn last row (a crash mid-write leaves no final newline) is dropped."""
    text = path.read_text(encoding="utf-8")
    rows = [r for r in csv.DictReader(io.StringIO(text)) if r.get("path")]
    return rows[:-1] if rows and not text.endswith("\n") else rows


def read_predictions(out: str | os.PathLike, include_out: bool = True) -> dict[str, dict[str, str]]:
    """Rows already written for ``out`` (``out`` itself and every ``OUT.partN``), by path."""
    out = Path(out)
    done: dict[str, dict[str, str]] = {}
    for f in ([out] if include_out and out.is_file() else []) + [f for _, f in sorted(_part_files(out).items())]:
        done.update((r["path"], r) for r in _complete_rows(f))
    return done


class PartWriter:
    """Append predictions to ``OUT.partN`` as CSV rows, flushed every ``flush_every`` rows.

    A crash loses at most the unflushed rows, and a torn last row is ignored on reading. With
    ``resume`` the complete rows of an existing part file are kept (rewritten atomically without
    the torn row) and new rows are appended; otherwise the file starts empty.
    """

    def __init__(self, out: str | os.PathLike, rank: int, resume: bool = False, flush_every: int = 32):
        self.path = part_file(out, rank)
        keep = _complete_rows(self.path) if resume and self.path.is_file() else []
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(keep)
        atomic_write_text(self.path, buf.getvalue())
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=CSV_FIELDS)
        self._flush_every, self._pending = flush_every, 0

    def write(self, prediction: Prediction) -> None:
        self._writer.writerow(prediction.to_dict())
        self._pending += 1
        if self._pending >= self._flush_every:
            self._file.flush()
            self._pending = 0

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def merge_predictions(out: str | os.PathLike, paths: Sequence[str | os.PathLike], resume: bool = False) -> int:
    """Write ``out`` atomically from the part files, one row per input path in input order, then delete the parts.

    Args:
        out: the CSV to write.
        paths: all inputs of the run, in order; paths without a prediction (unreadable files) are left out.
        resume: also keep the rows of an existing ``out``.

    Returns:
        The number of rows written.
    """
    out = Path(out)
    done = read_predictions(out, include_out=resume)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    rows = [done[str(p)] for p in paths if str(p) in done]
    w.writerows({k: r.get(k, "") for k in CSV_FIELDS} for r in rows)
    atomic_write_text(out, buf.getvalue())
    remove_parts(out)
    return len(rows)


def remove_parts(out: str | os.PathLike, first: int = 0) -> None:
    """Delete ``OUT.partN`` for every ``N >= first`` (left by an earlier, larger or crashed run)."""
    for n, f in _part_files(Path(out)).items():
        if n >= first:
            f.unlink(missing_ok=True)
