"""`Predictor`: the one place that loads a model for inference (CLI, Python API, REST API).

Example:
    >>> from covidxray.predictor import Predictor
    >>> p = Predictor()                      # the bundled model
    >>> p.predict_path("chest.png").label    # 'covid' or 'normal'
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .checkpoint import load_model
from .errors import CheckpointError, ImageError
from .imaging import load_image
from .presets import Preprocess

__all__ = [
    "Prediction", "Predictor", "default_model_path", "read_path_manifest", "part_file", "read_predictions", "PartWriter",
    "merge_predictions", "remove_parts",
]

log = logging.getLogger(__name__)


def default_model_path() -> Path:
    """``$COVIDXRAY_MODEL`` if set, else the model bundled in the repository's ``models/`` folder."""
    env = os.environ.get("COVIDXRAY_MODEL")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "models" / "default"


@dataclass(frozen=True)
class Prediction:
    """One image's answer. ``probability`` is P(COVID-19); ``label`` is ``covid`` when it reaches ``threshold``."""

    path: str
    label: str  # "covid" (COVID-19 positive) or "normal"
    probability: float  # P(covid), after temperature scaling
    threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


class Predictor:
    """Load a checkpoint once and classify X-rays.

    Args:
        model: run folder, ``model.json`` or ``model.safetensors``; None uses `default_model_path`.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        threads: torch intra-op threads for CPU inference (None: leave torch's default).
    """

    def __init__(
        self, model: str | os.PathLike | None = None, device: str = "cpu", threads: int | None = None, backend: str = "torch",
    ):
        from .engine import default_device

        path = Path(model) if model else default_model_path()
        if model is None and not path.exists():
            raise CheckpointError(
                f"no model given and the bundled model is missing ({path}); pass --model RUN_DIR or set COVIDXRAY_MODEL"
            )
        if backend not in ("torch", "onnx", "auto"):
            raise CheckpointError(f"unknown backend {backend!r} (torch, onnx or auto)")
        onnx_file = _onnx_file(path) if backend != "torch" else None
        if backend == "onnx" and onnx_file is None:
            raise CheckpointError(f"{path}: no ONNX model here; make one with `covidxray export {path} --onnx {path}/model.onnx`")
        if threads:
            torch.set_num_threads(threads)
        self.device = default_device(device)
        self.model: torch.nn.Module | None = None
        self.session = None
        if onnx_file is not None:
            self.session, self.meta = _onnx_session(onnx_file, threads)
            self.backend = "onnx"
        else:
            model_, self.meta = load_model(path)
            self.model = model_.to(self.device).to(memory_format=torch.channels_last).eval()
            self.backend = "torch"
        self.preprocess = Preprocess(**self.meta["preprocess"])
        self.threshold = float(self.meta["threshold"])
        self.temperature = float(self.meta.get("temperature", 1.0))
        self.name = f"{self.meta['arch']}@{self.preprocess.size}px"

    def predict_prepared(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """P(covid) for prepared uint8 images ``(N, S, S)`` (see `Preprocess.prepare`)."""
        if self.session is None:
            from .engine import predict_probs

            return predict_probs(self.model, images, self.preprocess, batch_size, self.temperature, self.device)
        probs = []
        for start in range(0, len(images), batch_size):
            x = self.preprocess.to_tensor(images[start:start + batch_size]).numpy()
            logits = torch.from_numpy(self.session.run(["logits"], {"image": x})[0])
            probs.append(torch.softmax(logits / self.temperature, dim=1)[:, 1])
        return torch.cat(probs).numpy() if probs else np.zeros(0, dtype=np.float32)

    def predict(
        self, source: str | os.PathLike | bytes | np.ndarray, explain: bool = False, name: str | None = None,
    ) -> Prediction | tuple[Prediction, np.ndarray]:
        """Classify one image given as a path, raw bytes or a decoded array.

        Args:
            source: image file path, file bytes (``name`` labels them in errors) or a float image in [0, 1].
            explain: also return the COVID-19 Grad-CAM map (``H x W`` in [0, 1], torch backend only).

        Returns:
            The `Prediction`, or ``(prediction, cam)`` with ``explain=True``.
        """
        if isinstance(source, np.ndarray):
            image, label = source, name or "<array>"
        elif isinstance(source, (bytes, bytearray)):
            image, label = load_image(source, name=name or "<upload>"), name or "<upload>"
        else:
            image, label = load_image(source), str(source)
        if not explain:
            return self.predict_array(image, label)
        from .explain import explain as grad_cam_explain

        prob, cam = grad_cam_explain(self, image)
        return self._answer(label, prob), cam

    def predict_array(self, image: np.ndarray, name: str = "<array>") -> Prediction:
        """Classify one decoded grayscale image (float in [0, 1])."""
        prob = float(self.predict_prepared(torch.from_numpy(self.preprocess.prepare(image))[None])[0])
        return self._answer(name, prob)

    def predict_bytes(self, data: bytes, name: str = "<upload>") -> Prediction:
        """Classify the raw bytes of an image file (PNG, JPEG, DICOM, ...). Raises `ImageError`."""
        return self.predict_array(load_image(data, name=name), name)

    def predict_path(self, path: str | os.PathLike) -> Prediction:
        """Classify one image file. Raises `ImageError` naming the file when it cannot be read."""
        return self.predict_array(load_image(path), str(path))

    def predict_paths(
        self, paths: Iterable[str | os.PathLike], batch_size: int = 32, workers: int = 0,
    ) -> Iterator[Prediction | ImageError]:
        """Classify many files in batches; yields a `Prediction` or the `ImageError` of each, in order.

        With ``workers=0`` two threads decode and preprocess ahead (Pillow releases the GIL) while
        the model runs; with ``workers > 0`` a DataLoader with that many processes does, for large
        runs on machines with cores to spare.
        """
        from concurrent.futures import ThreadPoolExecutor
        from functools import partial
        from itertools import islice

        prepare = partial(_prepare, self.preprocess)

        def classify(batch: list[tuple[str, np.ndarray | ImageError]]) -> Iterator[Prediction | ImageError]:
            good = [(i, img) for i, (_, img) in enumerate(batch) if not isinstance(img, ImageError)]
            probs = self.predict_prepared(torch.from_numpy(np.stack([img for _, img in good]))) if good else []
            by_index = {i: float(p) for (i, _), p in zip(good, probs)}
            for i, (name, img) in enumerate(batch):
                yield img if isinstance(img, ImageError) else self._answer(name, by_index[i])

        if workers > 0:
            from torch.utils.data import DataLoader

            loader = DataLoader(_PreparedFiles(list(paths), self.preprocess), batch_size=batch_size, num_workers=workers,
                                collate_fn=list)
            for batch in loader:
                yield from classify(batch)
            return
        todo = iter(paths)
        with ThreadPoolExecutor(max_workers=2) as pool:
            pending = [pool.submit(prepare, p) for p in islice(todo, batch_size)]
            while pending:
                batch = [f.result() for f in pending]
                # Decode the next batch while this one is classified; at most two batches are held.
                pending = [pool.submit(prepare, p) for p in islice(todo, batch_size)]
                yield from classify(batch)

    def _answer(self, name: str, prob: float) -> Prediction:
        return Prediction(name, "covid" if prob >= self.threshold else "normal", prob, self.threshold)


def _prepare(preprocess: Preprocess, path: str | os.PathLike) -> tuple[str, np.ndarray | ImageError]:
    """``(name, prepared uint8 image)``, or ``(name, ImageError)`` when the file cannot be read."""
    try:
        return str(path), preprocess.prepare(load_image(path))
    except ImageError as e:
        return str(path), e


class _PreparedFiles(torch.utils.data.Dataset):
    """Image files as `_prepare` results, for DataLoader worker processes."""

    def __init__(self, paths: Sequence[str | os.PathLike], preprocess: Preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, np.ndarray | ImageError]:
        return _prepare(self.preprocess, self.paths[i])


def _onnx_file(path: Path) -> Path | None:
    """The ONNX file for a run folder, ``model.json`` or ``.onnx`` path; None when there is none."""
    candidate = path if path.suffix == ".onnx" else (path / "model.onnx" if path.is_dir() else path.with_suffix(".onnx"))
    return candidate if candidate.is_file() else None


def _onnx_session(onnx_file: Path, threads: int | None):
    """An ONNX Runtime session for ``onnx_file`` and its validated JSON contract (hash checked)."""
    import hashlib

    import onnxruntime as ort

    from .checkpoint import read_model_meta

    meta, _ = read_model_meta(onnx_file.with_suffix(".json"))
    blob = onnx_file.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("onnx_sha256"):
        raise CheckpointError(f"{onnx_file}: does not match {onnx_file.with_suffix('.json').name} (SHA-256 differs); export again")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"]), meta


def expand_inputs(items: Sequence[str]) -> list[Path]:
    """Files, folders (recursively, hidden files skipped) and glob patterns -> sorted file list."""
    import glob

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


# ---------------------------------------------------------------------------------------------
# Predictions to CSV at scale: one append-only part file per process, resumable, merged in input order

CSV_FIELDS = ("path", "label", "probability", "threshold")


def read_path_manifest(csv_path: str | os.PathLike) -> list[Path]:
    """Image paths from a CSV with a ``path`` column (labels and other columns are ignored).

    Relative paths are resolved against the CSV's folder, as in a training manifest.

    Raises:
        DataError: the file cannot be read or has no ``path`` column.
    """
    import csv

    from .errors import DataError

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
    import csv
    import io

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
        import csv
        import io

        from .utils import atomic_write_text

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
    import csv
    import io

    from .utils import atomic_write_text

    out = Path(out)
    done = read_predictions(out, include_out=resume)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    rows = [done[str(p)] for p in paths if str(p) in done]
    w.writerows({k: r[k] for k in CSV_FIELDS} for r in rows)
    atomic_write_text(out, buf.getvalue())
    remove_parts(out)
    return len(rows)


def remove_parts(out: str | os.PathLike, first: int = 0) -> None:
    """Delete ``OUT.partN`` for every ``N >= first`` (left by an earlier, larger or crashed run)."""
    for n, f in _part_files(Path(out)).items():
        if n >= first:
            f.unlink(missing_ok=True)
