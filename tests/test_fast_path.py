"""The fast end-to-end path, on real films: the segmenter and gate batched like the classifier, one thread plan.

A batched pass must change nothing: every film of every shared origin gets the same answer from
`Predictor.predict_paths` (one segmenter call per batch) as from `Predictor.predict_path` (one call per film).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from covidxray.backends import ThreadPlan, thread_plan
from covidxray.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor()


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
    """A runner that counts its calls and the images they carried."""

    def __init__(self, runner):
        self.runner, self.calls, self.images = runner, 0, 0

    def __call__(self, **inputs):
        self.calls += 1
        self.images += len(inputs["image"])
        return self.runner(**inputs)


def test_the_segmenter_runs_once_per_batch(predictor: Predictor, films: list[Path]):
    counting = _Counting(predictor.segmenter.runner)
    predictor.segmenter.use_runner(counting)
    try:
        list(predictor.predict_paths(films, batch_size=32))
    finally:
        predictor.segmenter.use_runner(counting.runner)
    assert counting.images == len(films)  # no header refusals among image files: every film is seen once
    assert counting.calls == 2, counting.calls  # 50 films in batches of 32: two calls, not one per film


def test_a_batched_pass_answers_as_one_film_at_a_time(predictor: Predictor, films: list[Path]):
    batched = list(predictor.predict_paths(films, batch_size=32))
    single = [predictor.predict_path(f) for f in films]
    assert [b.label for b in batched] == [s.label for s in single]
    assert [b.reason for b in batched] == [s.reason for s in single]
    assert sum(not s.answered for s in single) >= 3  # the not-frontal films exercise the gate's refusals
    answered = [(b.probability, s.probability) for b, s in zip(batched, single) if s.answered]
    assert np.allclose(*zip(*answered), atol=1e-4)


def test_one_thread_plan_for_every_network(predictor: Predictor):
    assert thread_plan(2) == ThreadPlan(intra_op=2, decoders=2)
    assert thread_plan(16) == ThreadPlan(intra_op=16, decoders=8)
    assert thread_plan(16, intra_op=1).intra_op == 1
    plan = thread_plan()
    assert predictor.threads == plan
    sessions = [predictor.runner.session, predictor.segmenter.runner.session]
    assert [s.get_session_options().intra_op_num_threads for s in sessions] == [plan.intra_op] * 2
