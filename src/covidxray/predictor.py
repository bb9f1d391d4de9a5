"""`Predictor`: the one place that loads a model for inference (CLI, Python API, REST API).

Example:
    >>> from covidxray.predictor import Predictor
    >>> p = Predictor()                      # the bundled model
    >>> p.predict_path("chest.png").label    # 'covid' or 'normal'
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .checkpoint import load_model, read_model_meta
from .distributed import default_device
from .errors import CheckpointError, ImageError
from .imaging import load_image
from .inference import predict_probs
from .presets import Preprocess

__all__ = ["NOT_ANSWERED", "Prediction", "Predictor", "default_model_path"]

NOT_ANSWERED = "not_answered"  # the third outcome: the input is not a frontal chest X-ray

log = logging.getLogger(__name__)


def default_model_path() -> Path:
    """``$COVIDXRAY_MODEL`` if set, else the model bundled in the repository's ``models/`` folder."""
    env = os.environ.get("COVIDXRAY_MODEL")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "models" / "default"


@dataclass(frozen=True)
class Prediction:
    """One image's answer. ``probability`` is P(COVID-19); ``label`` is ``covid`` when it reaches ``threshold``.

    An image that is not a frontal chest X-ray gets no answer: ``label`` is ``not_answered``,
    ``probability`` is None and ``reason`` says why in a word (``message`` in a sentence).
    """

    path: str
    label: str  # "covid" (COVID-19 positive), "normal", or "not_answered"
    probability: float | None  # P(covid), after temperature scaling; None when not answered
    threshold: float
    reason: str | None = None  # why not answered: wrong_modality, lateral_view, not_chest_xray, ...
    message: str | None = None  # the reason, or a warning about an answer, for people
    unfamiliarity: float | None = None  # 0: typical of the training films ... 1: unlike any of them

    @property
    def answered(self) -> bool:
        return self.label != NOT_ANSWERED

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
            return predict_probs(self.model, images, self.preprocess, batch_size, self.temperature, self.device)
        probs = []
        for start in range(0, len(images), batch_size):
            x = self.preprocess.to_tensor(images[start:start + batch_size]).numpy()
            logits = torch.from_numpy(self.session.run(["logits"], {"image": x})[0])
            probs.append(torch.softmax(logits / self.temperature, dim=1)[:, 1])
        return torch.cat(probs).numpy() if probs else np.zeros(0, dtype=np.float32)

    def predict(self, source: str | os.PathLike | bytes | np.ndarray, name: str | None = None) -> Prediction:
        """Classify one image given as a path, raw bytes or a decoded array.

        Args:
            source: image file path, file bytes (``name`` labels them in errors) or a float image in [0, 1].
            name: what to call ``source`` in the answer and in errors (default: the path, ``<upload>``
                for bytes, ``<array>`` for an array).

        Returns:
            The `Prediction`. (For a Grad-CAM map as well, use `covidxray.explain.explain`.)
        """
        if isinstance(source, np.ndarray):
            return self.predict_array(source, name or "<array>")
        if isinstance(source, (bytes, bytearray)):
            return self.predict_bytes(bytes(source), name or "<upload>")
        return self.predict_array(load_image(source), name or str(source))

    def predict_array(self, image: np.ndarray, name: str = "<array>") -> Prediction:
        """Classify one decoded grayscale image (float in [0, 1])."""
        prob = float(self.predict_prepared(torch.from_numpy(self.preprocess.prepare(image))[None])[0])
        return self.decide(name, prob)

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
        prepare = partial(_prepare, self.preprocess)

        def classify(batch: list[tuple[str, np.ndarray | ImageError]]) -> Iterator[Prediction | ImageError]:
            good = [(i, img) for i, (_, img) in enumerate(batch) if not isinstance(img, ImageError)]
            probs = self.predict_prepared(torch.from_numpy(np.stack([img for _, img in good]))) if good else []
            by_index = {i: float(p) for (i, _), p in zip(good, probs)}
            for i, (name, img) in enumerate(batch):
                yield img if isinstance(img, ImageError) else self.decide(name, by_index[i])

        if workers > 0:
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

    def decide(self, name: str, prob: float) -> Prediction:
        """The answer for P(covid) = ``prob``: ``covid`` when it reaches the threshold, else ``normal``.

        The one rule for label versus threshold; every surface (CLI, API, Grad-CAM) goes through it.
        """
        return Prediction(name, "covid" if prob >= self.threshold else "normal", prob, self.threshold)


def _prepare(preprocess: Preprocess, path: str | os.PathLike) -> tuple[str, np.ndarray | ImageError]:
    """``(name, prepared uint8 image)``, or ``(name, ImageError)`` when the file cannot be read."""
    try:
        return str(path), preprocess.prepare(load_image(path))
    except ImageError as e:
        return str(path), e


class _PreparedFiles(Dataset):
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
    import onnxruntime as ort  # heavy and only needed for the ONNX backend

    meta, _ = read_model_meta(onnx_file.with_suffix(".json"))
    blob = onnx_file.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("onnx_sha256"):
        raise CheckpointError(f"{onnx_file}: does not match {onnx_file.with_suffix('.json').name} (SHA-256 differs); export again")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"]), meta
