"""The fast end-to-end path, on real films: the segmenter and gate batched like the classifier, one thread plan,
files decoded at reduced scale.

A batched pass must change nothing: every film of every shared origin gets the same answer from
`Predictor.predict_paths` (one segmenter call per batch) as from `Predictor.predict_path` (one call per film).
Reduced-scale decoding must not change the answers either: large films (shared films enlarged to a
hospital film's size) get the same decisions, and nearly the same P(COVID-19), as from full decoding.
"""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dicoms
from covidxray.backends import CascadeRunner, ThreadPlan, thread_plan
from covidxray.checkpoint import default_model_path
from covidxray.errors import ImageError
from covidxray.imaging import MAX_PIXELS, read_image
from covidxray.predictor import SEGMENTER_BATCH, Predictor, decode_side

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    """The bundled model's float graph: decoding is under test here, not int8 (whose float re-check near the
    threshold would add its own, larger, differences)."""
    return Predictor(default_model_path() / "model.onnx")


@pytest.fixture(scope="module")
def reducing() -> Predictor:
    """The bundled model decoding at reduced scale (an option: off by default)."""
    return Predictor(default_model_path() / "model.onnx", reduced_decode=True)


@pytest.fixture(scope="module")
def films(data_root: Path) -> list[Path]:
    """Real films of every shared origin, frontal and not (so the gate refuses some), 50 in all."""
    shared = data_root.parent
    picks = sorted((data_root / "images").rglob("*.jpg"))[::150][:20]
    picks += sorted((shared / "jsrt" / "images").rglob("*.jpg"))[::25][:10]
    picks += sorted((shared / "tb-cxr" / "images").rglob("*.jpg"))[::80][:10]
    picks += sorted((shared / "not-frontal-cxr").rglob("*.jpg"))[::5][:10]
    assert len(picks) == 50, len(picks)
    return picks


class _Counting:
    """A runner that counts its calls, the images they carried and the most calls at once (each held ``hold`` s)."""

    def __init__(self, runner, hold: float = 0.0):
        self.runner, self.calls, self.images, self.hold = runner, 0, 0, hold
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, **inputs):
        with self.lock:
            self.calls, self.images, self.running = self.calls + 1, self.images + len(inputs["image"]), self.running + 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.hold)
            return self.runner(**inputs)
        finally:
            with self.lock:
                self.running -= 1


def test_the_segmenter_runs_batched(predictor: Predictor, films: list[Path]):
    counting = _Counting(predictor.segmenter.runner)
    predictor.segmenter.use_runner(counting)
    try:
        list(predictor.predict_paths(films, batch_size=32))
    finally:
        predictor.segmenter.use_runner(counting.runner)
    assert counting.images == len(films)  # no header refusals among image files: every film is seen once
    # 50 films in batches of 32, each in segmenter calls of SEGMENTER_BATCH (8): 4 + 3 calls, not one per film
    assert counting.calls == 7 == -(-32 // SEGMENTER_BATCH) + -(-18 // SEGMENTER_BATCH), counting.calls


def test_lanes_classify_batches_side_by_side_and_answer_in_order(predictor: Predictor, films: list[Path]):
    """With two lanes (the plan on 2 cores), two batches go through the classifier at once, and the answers come
    back in the files' order, the same as one lane's."""
    plan, runner = predictor.threads, predictor.runner

    def answers(lanes: int, counting: _Counting) -> list[tuple]:
        predictor.threads, predictor.runner = ThreadPlan(intra_op=1, decoders=2, lanes=lanes), counting
        try:
            return [(a.path, a.label, a.probability) for a in predictor.predict_paths(films, batch_size=4)]
        finally:
            predictor.threads, predictor.runner = plan, runner

    one_lane = answers(1, alone := _Counting(runner, 0.01))
    two_lanes = answers(2, counting := _Counting(runner, 0.05))
    assert alone.most == 1
    assert counting.most == 2 and counting.images == sum(p is not None for _, _, p in one_lane)
    assert [a[:2] for a in two_lanes] == [a[:2] for a in one_lane] == [(str(f), a[1]) for f, a in zip(films, one_lane)]
    assert np.allclose([p or 0 for *_, p in two_lanes], [p or 0 for *_, p in one_lane], atol=1e-6)


def test_a_batched_segmenter_gives_the_masks_of_one_film_at_a_time(predictor: Predictor, films: list[Path]):
    decoded = [read_image(f) for f in films[::5]]
    images, infos = [d[0] for d in decoded], [d[1] for d in decoded]
    batched = predictor.segmenter.analyse(images, infos)
    single = [predictor.segmenter.analyse([image], [info])[0] for image, info in decoded]
    assert np.abs(np.stack([a.lungs for a in batched]) - np.stack([a.lungs for a in single])).max() <= 1e-4
    assert np.abs(np.stack([a.gate for a in batched]) - np.stack([a.gate for a in single])).max() <= 1e-4
    masks = [int(((a.lungs >= 0.5) != (b.lungs >= 0.5)).sum()) for a, b in zip(batched, single)]
    assert max(masks) <= 5, masks  # a pixel within 1e-4 of 0.5 may fall either side; the crop box does not move


def test_a_batched_pass_answers_as_one_film_at_a_time(predictor: Predictor, films: list[Path]):
    batched = list(predictor.predict_paths(films, batch_size=32))
    single = [predictor.predict_path(f) for f in films]
    assert [b.label for b in batched] == [s.label for s in single]
    assert [b.reason for b in batched] == [s.reason for s in single]
    assert sum(not s.answered for s in single) >= 3  # the not-frontal films exercise the gate's refusals
    answered = [(b.probability, s.probability) for b, s in zip(batched, single) if s.answered]
    assert np.allclose(*zip(*answered), atol=1e-4)


def test_one_thread_plan_for_every_network():
    # ONNX Runtime: one thread per network call, as many calls side by side as there are cores; PyTorch: one call
    # at a time on every core.
    assert thread_plan(2) == ThreadPlan(intra_op=1, decoders=2, lanes=2)
    assert thread_plan(16) == ThreadPlan(intra_op=1, decoders=8, lanes=16)
    assert thread_plan(16, intra_op=4) == ThreadPlan(intra_op=4, decoders=8, lanes=4)
    assert thread_plan(16, intra_op=32).lanes == 1
    assert thread_plan(2, backend="torch") == ThreadPlan(intra_op=2, decoders=2, lanes=1)
    plan = thread_plan()
    predictor = Predictor()  # the default: the bundled int8 graph with its float re-check, and the segmenter
    assert predictor.threads == plan and isinstance(predictor.runner, CascadeRunner)
    sessions = [predictor.runner.fast.session, predictor.runner.exact.session, predictor.segmenter.runner.session]
    assert [s.get_session_options().intra_op_num_threads for s in sessions] == [plan.intra_op] * 3


def _big_jpeg(path: Path, side: int = 1600) -> bytes:
    """A real film enlarged to ``side`` px on its short side, as a hospital's JPEG export would be."""
    img = Image.open(path).convert("L")
    scale = side / min(img.size)
    buf = io.BytesIO()
    img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _same_answers(predictor: Predictor, full: list[tuple], reduced: list[tuple]) -> None:
    a = [predictor.predict_array(image, info=info) for image, info in full]
    b = [predictor.predict_array(image, info=info) for image, info in reduced]
    assert [x.label for x in a] == [y.label for y in b]
    assert all(x.answered for x in a)
    # bench/decode_scale.py, 500 films at min_side 320: max |dP| 0.13 (Lite0); the Lite1 model moves these by up to 0.13
    assert max(abs(x.probability - y.probability) for x, y in zip(a, b)) <= 0.15


def test_large_jpegs_are_decoded_at_reduced_scale_with_the_same_answers(predictor: Predictor, reducing: Predictor,
                                                                        films: list[Path]):
    side = decode_side(predictor.preprocess, predictor.segmenter)
    assert reducing.decode_side == side == 320  # twice the classifier's 160 px (the segmenter takes 112)
    assert predictor.decode_side is None  # the default: full resolution, as training saw its films
    blobs = [_big_jpeg(f) for f in films[:40:4]]  # covid-cxr, JSRT, Shenzhen
    full = [read_image(b) for b in blobs]
    reduced = [reducing.read(b) for b in blobs]
    assert all(min(r[0].shape) == min(f[0].shape) // 4 >= side for f, r in zip(full, reduced))  # DCT scaling by 1/4
    assert [f[1] for f in full] == [r[1] for r in reduced]  # the same header facts for the gate
    _same_answers(predictor, full, reduced)
    assert read_image(films[0].read_bytes(), min_side=side)[0].shape == read_image(films[0])[0].shape  # small: untouched


def test_large_dicom_frames_are_shrunk_once_with_the_same_answers(predictor: Predictor, reducing: Predictor,
                                                                  films: list[Path]):
    blobs = [dicoms.to_bytes(dicoms.cr(dicoms.xray_pixels(f, 1400))) for f in films[:40:8]]
    full = [read_image(b) for b in blobs]
    reduced = [reducing.read(b) for b in blobs]
    assert all(r[0].shape == (350, 350) and f[0].shape == (1400, 1400) for f, r in zip(full, reduced))  # by 4
    assert all(0 <= r[0].min() and r[0].max() <= 1 for r in reduced)
    _same_answers(predictor, full, reduced)


def test_reduced_scale_decoding_is_as_strict(films: list[Path]):
    big = _big_jpeg(films[0])
    with pytest.raises(ImageError) as cut:
        read_image(big[: len(big) // 2], min_side=320)
    assert cut.value.code == "undecodable"
    side = int(MAX_PIXELS ** 0.5) + 100  # the limit holds for the file's own size, not the reduced one
    huge = dicoms.to_bytes(dicoms.cr(np.zeros((8, 8), np.uint16), Rows=side, Columns=side))
    with pytest.raises(ImageError) as large:
        read_image(huge, min_side=320)
    assert large.value.code == "too_large"
    blank = dicoms.to_bytes(dicoms.cr(np.full((1400, 1400), 7, np.uint16)))
    with pytest.raises(ImageError) as flat:
        read_image(blank, min_side=320)
    assert flat.value.code == "blank"
