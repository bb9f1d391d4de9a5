"""`Predictor`: the one place that loads a model for inference (CLI, Python API, REST API, DICOM listener).

An image goes through the input gate first (`covidxray.gate.InputGate`: the DICOM header, then the pixels),
so that what is not a frontal chest X-ray gets no answer instead of a confident one; then through
the one preprocessing (`Preprocess`, cropped to the lungs when the model was trained so); then
the classifier, whose features also give the answer's unfamiliarity (`covidxray.familiarity`).
The networks run in PyTorch or in ONNX Runtime (`covidxray.backends`); nothing else here asks which.

Example:
    >>> from covidxray.predictor import Predictor
    >>> p = Predictor()                      # the bundled model
    >>> p.predict_path("chest.png").label    # 'covid', 'normal' or 'not_answered'
"""

from __future__ import annotations

import functools
import logging
import os
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import replace
from itertools import islice, takewhile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .answer import NOT_ANSWERED, Prediction
from .backends import CascadeRunner, OnnxRunner, Runner, TorchRunner, onnx_file, thread_plan
from .checkpoint import contract_path, default_model_path, load_model, load_preprocess, read_onnx_contract, resolve_model_path
from .distributed import default_device
from .errors import CheckpointError, DataError, ImageError
from .familiarity import Familiarity, warning
from .gate import InputGate, Verdict
from .imaging import ImageInfo, read_image
from .inference import classifier_forward
from .presets import Preprocess
from .segment import LungSegmenter
from .sites import SiteProfile, site_fields

__all__ = ["NOT_ANSWERED", "Prediction", "Predictor", "default_model_path"]

# Films per segmenter call: past a few, batching saves no CPU time on the segmenter (measured: batch 1 and 32 cost the
# same per film) while ONNX Runtime's arena grows with it (peak RSS of `predict` +250 MB at 32, +80 MB at 8).
SEGMENTER_BATCH = 8
DECODE_SIDE_FACTOR = 2  # files are decoded with at least this many times the larger network input per side: `decode_side`

log = logging.getLogger(__name__)


class Predictor:
    """Load a checkpoint once and classify X-rays.

    Args:
        model: run folder, ``model.json`` or ``model.safetensors``; None uses `default_model_path`.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        threads: intra-op threads per network call, ONNX Runtime's and torch's (None: `covidxray.backends.thread_plan`'s:
            one per ONNX Runtime call, a call per core side by side; torch's own setting is then left as it is).
        backend: ``auto`` (the fastest exported graph there: ``model.int8.onnx``, then ``model.onnx``; else
            PyTorch), ``onnx`` or ``torch`` (needed for Grad-CAM, evaluation and the audit).
        gate: refuse what is not a frontal chest X-ray (False: answer everything, for research).
        reduced_decode: decode files at reduced scale where the format allows it (`decode_side`): about 3x less
            time per large film, but 1.0 % of 500 enlarged films changed decision (`bench/decode_scale.py`), so
            it is off by default: files are decoded at full resolution, as training and evaluation do.
    """

    def __init__(
        self, model: str | os.PathLike | None = None, device: str = "cpu", threads: int | None = None, backend: str = "auto",
        gate: bool = True, reduced_decode: bool = False,
    ):
        path = Path(model) if model else default_model_path()
        if model is None and not path.exists():
            raise CheckpointError(
                f"no model given and the bundled model is missing ({path}); pass --model RUN_DIR or set COVIDXRAY_MODEL"
            )
        if backend not in ("torch", "onnx", "auto"):
            raise CheckpointError(f"unknown backend {backend!r} (torch, onnx or auto)")
        graph = onnx_file(path) if backend != "torch" else None
        if backend == "onnx" and graph is None:
            raise CheckpointError(f"{path}: no ONNX model here; make one with `covidxray export {path} --onnx {path}/model.onnx`")
        if threads:
            torch.set_num_threads(threads)
        self.threads = thread_plan(intra_op=threads, backend="onnx" if graph is not None else "torch")  # networks, decoders
        threads = self.threads.intra_op
        self.device = default_device(device)
        self.model: torch.nn.Module | None = None  # the PyTorch network (Grad-CAM, evaluation); None under ONNX
        self.onnx_contract: dict | None = None
        self.runner: Runner  # the classifier: normalised ``image`` -> logits, features
        if graph is not None:
            self.onnx_contract, self.meta, contract = read_onnx_contract(graph)
            self.runner = _onnx_classifier(graph, self.onnx_contract, self.meta, threads)
        else:
            model_, self.meta = load_model(path)
            self.model = model_.to(self.device).to(memory_format=torch.channels_last).eval()
            self.runner = TorchRunner(classifier_forward(self.model, self.device, self.meta["arch"]), self.device)
            contract = resolve_model_path(path)
        self.backend = self.runner.kind
        self.preprocess = load_preprocess(self.meta, contract)
        self.folder = contract.parent  # the model's folder (PyTorch weights, segmenter, ONNX graphs)
        self.threshold = float(self.meta["threshold"])
        self.temperature = float(self.meta.get("temperature", 1.0))
        self.name = f"{self.meta['arch']}@{self.preprocess.size}px"
        # The segmenter crops to the lungs and, in the same pass, holds the input gate's head.
        self.segmenter: LungSegmenter | None = self.preprocess.segmenter
        if self.segmenter is None and (contract.parent / "segmenter.json").is_file():
            self.segmenter = LungSegmenter(contract.parent / "segmenter.json")
        entry = (self.onnx_contract or {}).get("segmenter_onnx")
        if self.segmenter is not None and entry and entry.get("segmenter_sha256") == self.segmenter.sha256:
            # the whole path in ONNX Runtime: the segmenter this model uses, exported beside it
            self.segmenter.use_runner(OnnxRunner.load(self.folder / Path(entry["file"]).name, entry["sha256"],
                                                      contract_path(graph).name, threads))
        self.gate = gate
        pixel_head = self.segmenter is not None and self.segmenter.gate is not None
        self.input_gate = InputGate(self.segmenter.gate_threshold if pixel_head else None, enabled=gate)
        self.decode_side = decode_side(self.preprocess, self.segmenter) if reduced_decode else None
        fam = self.meta.get("familiarity")
        self.familiarity = Familiarity.load(contract.parent, fam["sha256"]) if fam else None

    def check(self, image: np.ndarray, info: ImageInfo | None = None) -> np.ndarray | Verdict:
        """The prepared network input (uint8 ``S x S``) of a decoded image, or the gate's reason not to answer it."""
        return self.check_many([image], [info])[0]

    def check_many(self, images: Sequence[np.ndarray], infos: Sequence[ImageInfo | None],
                   pool: Executor | None = None) -> list[np.ndarray | Verdict]:
        """`check` for many decoded images, the segmenter and gate run on them in one batch (as the classifier is);
        the lung crops are made in ``pool``'s threads when given (Pillow and NumPy release the GIL)."""
        def prepare(image: np.ndarray, gated: tuple[Verdict | None, np.ndarray | None]) -> np.ndarray | Verdict:
            return gated[0] if gated[0] is not None else self.preprocess.prepare(image, gated[1])

        return list((pool.map if pool is not None else map)(prepare, images, self.gate_many(images, infos)))

    def verdicts(self, images: Sequence[np.ndarray], infos: Sequence[ImageInfo | None]) -> list[Verdict | None]:
        """The input gate's reason not to answer each decoded image (None: it may be answered), in one batch."""
        return [verdict for verdict, _ in self.gate_many(images, infos)]

    def gate_many(
        self, images: Sequence[np.ndarray], infos: Sequence[ImageInfo | None],
    ) -> list[tuple[Verdict | None, np.ndarray | None]]:
        """The `InputGate`'s verdicts (header, then pixels from the segmenter, `SEGMENTER_BATCH` films a call); also
        the lung maps for the crop (`Preprocess.prepare` takes them: `check_many` is both steps)."""
        out: list[tuple[Verdict | None, np.ndarray | None]] = [(self.input_gate.header(info), None) for info in infos]
        if not (self.input_gate.uses_pixels or self.preprocess.lung_crop):
            return out
        todo = [i for i, (verdict, _) in enumerate(out) if verdict is None]
        analyses = [analysis for start in range(0, len(todo), SEGMENTER_BATCH) for analysis in self.segmenter.analyse(
            [images[i] for i in todo[start:start + SEGMENTER_BATCH]], [infos[i] for i in todo[start:start + SEGMENTER_BATCH]])]
        for i, analysis in zip(todo, analyses):
            out[i] = self.input_gate.pixels(analysis.gate), analysis.lungs
        return out

    def classify(self, images: torch.Tensor, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
        """P(covid) and unfamiliarity (None without familiarity statistics) for prepared uint8 images ``(N, S, S)``."""
        return self.score(images, batch_size)[:2]

    def score(self, images: torch.Tensor, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """`classify`'s P(covid) and unfamiliarity, and the features ``(N, D)`` (None from a graph without them)."""
        logits, feats = self._logits_and_features(images, batch_size)
        probs = torch.softmax(torch.from_numpy(logits) / self.temperature, dim=1)[:, 1].numpy()
        unfamiliar = self.familiarity(feats) if self.familiarity is not None and feats is not None and len(feats) else None
        return probs, unfamiliar, feats

    def predict_prepared(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """P(covid) for prepared uint8 images ``(N, S, S)`` (see `Preprocess.prepare`)."""
        return self.classify(images, batch_size)[0]

    def _logits_and_features(self, images: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Logits ``(N, 2)`` and features ``(N, D)`` (None from a graph exported without them), in batches."""
        outputs = [self.runner(image=self.preprocess.to_tensor(images[start:start + batch_size]))
                   for start in range(0, len(images), batch_size)]
        if not outputs:
            return np.zeros((0, 2), np.float32), None
        feats = np.concatenate([out[1] for out in outputs]) if len(outputs[0]) > 1 else None
        return np.concatenate([out[0] for out in outputs]), feats

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
        return self.predict_path(source, name)

    def predict_array(self, image: np.ndarray, name: str = "<array>", info: ImageInfo | None = None) -> Prediction:
        """Classify one decoded grayscale image (float in [0, 1]); ``info`` (from `read_image`) feeds the gate."""
        return self.answer(name, self.check(image, info))

    def predict_bytes(self, data: bytes, name: str = "<upload>") -> Prediction:
        """Classify the raw bytes of an image file (PNG, JPEG, DICOM, ...). Raises `ImageError`."""
        image, info = self.read(data, name=name)
        return self.predict_array(image, name, info)

    def predict_path(self, path: str | os.PathLike, name: str | None = None) -> Prediction:
        """Classify one image file. Raises `ImageError` naming the file when it cannot be read."""
        image, info = self.read(path)
        return self.predict_array(image, name or str(path), info)

    def read(self, source: str | os.PathLike | bytes, name: str | None = None) -> tuple[np.ndarray, ImageInfo]:
        """`read_image` as this model's inputs need it: at reduced scale where the format allows (`decode_side`)."""
        return read_image(source, name=name, min_side=self.decode_side)

    def answer(self, name: str, checked: np.ndarray | Verdict) -> Prediction:
        """The `Prediction` for one `check` result: classified, or not answered."""
        if isinstance(checked, Verdict):
            return self.refuse(name, checked)
        probs, unfamiliar, feats = self.score(torch.from_numpy(checked)[None])
        return self.decide(name, float(probs[0]), None if unfamiliar is None else float(unfamiliar[0]),
                           features=None if feats is None else feats[0])

    def predict_paths(
        self, paths: Iterable[str | os.PathLike], batch_size: int = 32, workers: int = 0,
    ) -> Iterator[Prediction | ImageError]:
        """Classify many files in batches; yields a `Prediction` or the `ImageError` of each, in order.

        With ``workers=0`` the thread plan's decoders (`covidxray.backends.thread_plan`) read and decode the
        next batch while the plan's lanes each take one through the segmenter and gate, then the classifier,
        each in one call per batch. With ``workers > 0`` a DataLoader with that many processes decodes, gates and
        preprocesses, for large runs on machines with cores to spare.
        """
        if workers > 0:
            loader = DataLoader(_PreparedFiles(list(paths), self), batch_size=batch_size, num_workers=workers, collate_fn=list)
            for batch in loader:
                yield from self._answer_batch(batch)
            return
        todo, lanes = iter(paths), self.threads.lanes
        # Crops get threads of their own: behind the next batch's decoding (a JPEG Lossless DICOM takes ~40 ms) in one
        # queue, this batch's crops would wait for all of it. The networks run `lanes` batches side by side.
        with ThreadPoolExecutor(self.threads.decoders) as pool, ThreadPoolExecutor(self.threads.decoders) as crops, \
                ThreadPoolExecutor(lanes) as networks:

            def start() -> Future | None:
                """Decode the next batch ahead (in ``pool``), then gate, crop and classify it in a lane of its own."""
                decoding = [pool.submit(_decode, self, p) for p in islice(todo, batch_size)]
                return networks.submit(lambda: list(self._answer_batch(self._check_decoded(
                    [f.result() for f in decoding], crops)))) if decoding else None

            # One batch more than there are lanes: the next one decodes while every lane works.
            running = deque(takewhile(lambda f: f is not None, (start() for _ in range(lanes + 1))))
            while running:
                answers = running.popleft().result()
                if (following := start()) is not None:
                    running.append(following)
                yield from answers

    def _check_decoded(self, decoded: list[tuple[str, tuple[np.ndarray, ImageInfo] | ImageError]], pool: Executor,
                       ) -> list[tuple[str, np.ndarray | Verdict | ImageError]]:
        """`check_many` over the decoded files of a batch; unreadable ones keep their `ImageError`."""
        good = [i for i, (_, d) in enumerate(decoded) if not isinstance(d, ImageError)]
        checked = dict(zip(good, self.check_many([decoded[i][1][0] for i in good], [decoded[i][1][1] for i in good], pool)))
        return [(name, checked.get(i, d)) for i, (name, d) in enumerate(decoded)]

    def _answer_batch(self, batch: list[tuple[str, np.ndarray | Verdict | ImageError]]) -> Iterator[Prediction | ImageError]:
        """The classifier on a batch's prepared images in one call; refusals and errors pass through, in order."""
        good = [(i, img) for i, (_, img) in enumerate(batch) if isinstance(img, np.ndarray)]
        probs, unfamiliar, feats = self.score(torch.from_numpy(np.stack([img for _, img in good]))) if good else ([], None, None)
        by_index = {i: (float(p), None if unfamiliar is None else float(unfamiliar[k]), None, None if feats is None else feats[k])
                    for k, ((i, _), p) in enumerate(zip(good, probs))}
        for i, (name, img) in enumerate(batch):
            if isinstance(img, ImageError):
                yield img
            elif isinstance(img, Verdict):
                yield self.refuse(name, img)
            else:
                yield self.decide(name, *by_index[i])

    def decide(self, name: str, prob: float, unfamiliarity: float | None = None, site: SiteProfile | None = None,
               features: np.ndarray | None = None) -> Prediction:
        """The answer for P(covid) = ``prob``, the model's: ``covid`` when it reaches the threshold, else ``normal``.

        The one rule for label versus threshold; every surface (CLI, API, Grad-CAM, listener) goes
        through it. The threshold is ``site``'s (a profile made for these weights: see `at_site`),
        else the model's own; a site with a head of its own takes P(covid) from it, on the film's ``features``.
        An unusually unfamiliar film keeps its answer, with a warning in ``message``.
        """
        if site is not None and site.head is not None:
            if features is None:
                raise CheckpointError(f"site {site.name} decides with a head of its own, on the classifier's features; "
                                      f"{self.name} gave none (export the model again: covidxray export RUN)")
            prob = site.probability(features)
        threshold = self.threshold_at(site)
        label = "covid" if prob >= threshold else "normal"
        message = warning(unfamiliarity) if unfamiliarity is not None else None
        return Prediction(name, label, prob, threshold, message=message, unfamiliarity=unfamiliarity,
                          features=features, **site_fields(site))

    def refuse(self, name: str, verdict: Verdict, site: SiteProfile | None = None) -> Prediction:
        """The third outcome: no answer, with the gate's reason."""
        return Prediction(name, NOT_ANSWERED, None, self.threshold_at(site), reason=verdict.reason, message=verdict.message,
                          **site_fields(site, answered=False))

    def at_site(self, prediction: Prediction, site: SiteProfile | None) -> Prediction:
        """``prediction`` (as the model decided it) as ``site`` decides it: its threshold and head, or (None) the model's
        own with "site not onboarded".

        Raises:
            CheckpointError: ``site`` was onboarded for other weights than this model's.
        """
        if site is not None:
            site.check_weights(self.meta.get("weights_sha256"))
        if prediction.answered:
            return self.decide(prediction.path, prediction.probability, prediction.unfamiliarity, site, prediction.features)
        return replace(prediction, threshold=self.threshold_at(site), **site_fields(site, answered=False))

    def watch(self, thresholds: Iterable[float]) -> None:
        """Decide films near these thresholds too (onboarded sites') as the float graph would: an int8 graph's
        `CascadeRunner` scores those within its band again in float. Call it before classifying their films;
        under other backends it does nothing (their probabilities are the float ones already)."""
        if isinstance(self.runner, CascadeRunner):
            self.runner.watch(thresholds)

    def watch_sites(self, sites: Iterable[SiteProfile]) -> None:
        """`watch` the sites' thresholds, and the films near a threshold under a site's own head; `DataError` for a site
        whose head does not take this model's features (before any film meets it)."""
        sites = list(sites)
        for s in sites:
            if s.head is not None and (count := self.feature_count) is not None and len(s.head["weight"]) != count:
                raise DataError(f"site {s.name}: its head takes {len(s.head['weight'])} features, the model {self.name} "
                                f"gives {count}; onboard the site again")
        if isinstance(self.runner, CascadeRunner):
            self.runner.watch([s.threshold for s in sites], [(*s.head_arrays(), s.threshold) for s in sites if s.head])

    @functools.cached_property
    def feature_count(self) -> int | None:
        """How many features the classifier gives per film (None: a graph without them), from one blank film."""
        feats = self._logits_and_features(torch.zeros((1, self.preprocess.size, self.preprocess.size), dtype=torch.uint8), 1)[1]
        return None if feats is None else int(feats.shape[1])

    def threshold_at(self, site: SiteProfile | None) -> float:
        """The threshold that decides a film of ``site``: the site's own, or (None) the model's."""
        return self.threshold if site is None else site.threshold


def _onnx_classifier(graph: Path, contract: dict, meta: dict, threads: int) -> Runner:
    """The exported classifier; an int8 one with a re-check band (`covidxray.export`) behind a `CascadeRunner` with the
    float graph its contract names, checked against the hash recorded there."""
    runner = OnnxRunner.load(graph, contract.get("onnx_sha256"), contract_path(graph).name, threads)
    recheck = (contract.get("int8") or {}).get("recheck")
    if not recheck or not recheck["band"]:
        return runner
    exact = OnnxRunner.load(graph.parent / Path(recheck["float_onnx"]).name, recheck["float_onnx_sha256"],
                            contract_path(graph).name, threads)
    return CascadeRunner(runner, exact, recheck["band"], meta.get("temperature", 1.0), [meta["threshold"]])


def decode_side(preprocess: Preprocess, segmenter: LungSegmenter | None) -> int:
    """The fewest pixels per side a film is decoded with (`read_image`'s ``min_side``) for this model's networks.

    Twice the larger network input: the segmenter squashes the whole film to its side, and the classifier's
    lung crop (with its margin) spans half of each side or more, so the crop still has at least the
    classifier's side and both resize down, as from the full film. Measured on 500 films enlarged to 2048 px
    (`bench/decode_scale.py`, docs/benchmarks.md): 99.0 % of the decisions unchanged (JSRT and Shenzhen 98 %),
    3x less time per film; a larger side (1/2 instead of 1/4 DCT scaling) kept fewer (98.8 %): the answers move
    with the down-sampling filter, not with the resolution kept.
    """
    return DECODE_SIDE_FACTOR * max(preprocess.size, segmenter.size if segmenter is not None else 0)


def _decode(predictor: Predictor, path: str | os.PathLike) -> tuple[str, tuple[np.ndarray, ImageInfo] | ImageError]:
    """``(name, (pixels, info))`` of a file, or ``(name, ImageError)``."""
    try:
        return str(path), predictor.read(path)
    except ImageError as e:
        return str(path), e


def _prepare(predictor: Predictor, path: str | os.PathLike) -> tuple[str, np.ndarray | Verdict | ImageError]:
    """``(name, prepared uint8 image)``, ``(name, Verdict)`` when the gate refuses it, or ``(name, ImageError)``."""
    try:
        return str(path), predictor.check(*predictor.read(path))
    except ImageError as e:
        return str(path), e


class _PreparedFiles(Dataset):
    """Image files as `_prepare` results, for DataLoader worker processes."""

    def __init__(self, paths: Sequence[str | os.PathLike], predictor: Predictor):
        self.paths, self.predictor = paths, predictor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, np.ndarray | Verdict | ImageError]:
        return _prepare(self.predictor, self.paths[i])
