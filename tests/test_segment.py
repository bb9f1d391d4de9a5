"""Lung segmentation: the shipped segmenter on held-out JSRT patients and on covid-cxr films, the crop, the CLI."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from covidxray.checkpoint import default_model_path, load_preprocess
from covidxray.cli import main
from covidxray.errors import CheckpointError
from covidxray.imaging import load_image
from covidxray.presets import Preprocess, _crop, box_pixels, lung_box, max_filter
from covidxray.resample import resize
from covidxray.segment import LungNet, LungSegmenter, dice, full_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def segmenter() -> LungSegmenter:
    return LungSegmenter(default_model_path())


@pytest.fixture(scope="module")
def jsrt(data_root: Path) -> Path:
    return data_root.parent / "jsrt"


def test_shape_and_one_pass_features():
    net = LungNet().eval()
    x = torch.rand(2, 1, 112, 112)
    with torch.no_grad():
        logits, feats = net.forward_features(x)
        assert logits.shape == x.shape and torch.equal(net(x), logits)
        assert torch.equal(net.encode(x)[2], feats) and feats.shape == (2, 464)


def test_dice_on_held_out_jsrt_patients(segmenter: LungSegmenter, jsrt: Path):
    """The shipped segmenter's own test patients (never trained on): Dice >= 0.95 at the masks' resolution."""
    held_out = set(segmenter.meta["split"]["test"])
    assert len(held_out) >= 30 and not held_out & set(segmenter.meta["split"]["train"])
    rows = [r for r in csv.DictReader(open(jsrt / "manifest.csv")) if Path(r["path"]).name in held_out]
    scores = []
    for r in rows:
        image = load_image(jsrt / r["path"])
        target = np.asarray(Image.open(jsrt / r["mask"]).convert("L")) > 127
        scores.append(dice(full_mask(segmenter(image), image.shape), target))
    assert np.mean(scores) >= 0.95 and min(scores) >= 0.85, (np.mean(scores), min(scores))


def test_lungs_are_found_on_covid_films_of_every_source(segmenter: LungSegmenter, manifest: Path):
    """Diseased, AP, portable and pediatric films: the lung share stays plausible (JSRT's own range is 0.19-0.40)."""
    rows = list(csv.DictReader(open(manifest)))
    picks = [r for r in rows if r["age_group"] == "pediatric"][:6]
    for source in ("radiography-db", "ieee8023", "covid-cxnet"):
        picks += [r for r in rows if r["source"] == source and r["label"] == "covid"][:12]
    picks += [r for r in rows if r["view"] == "AP Supine"][:6]
    fractions = [float(full_mask(segmenter(im := load_image(manifest.parent / r["path"])), im.shape).mean()) for r in picks]
    assert all(0.10 <= f <= 0.60 for f in fractions), sorted(fractions)[:3] + sorted(fractions)[-3:]


def test_lung_box_keeps_the_two_largest_regions_and_widens_by_the_margin():
    prob = np.zeros((100, 100), np.float32)
    prob[20:80, 10:40] = 1  # right lung
    prob[20:80, 60:90] = 1  # left lung
    prob[95:98, 0:3] = 1  # a stray island (a tube, a marker): ignored
    assert lung_box(prob, margin=0.0) == pytest.approx((0.2, 0.1, 0.8, 0.9))
    assert lung_box(prob, margin=0.1) == pytest.approx((0.14, 0.02, 0.86, 0.98))
    assert lung_box(np.zeros((50, 50)), margin=0.1) == (0.0, 0.0, 1.0, 1.0)  # no lungs found: no crop


def test_lung_crop_is_the_box_of_the_image_resized(segmenter: LungSegmenter, manifest: Path):
    image = load_image(manifest.parent / "images/ieee8023/covid/00010.jpg")
    pre = Preprocess(size=64, equalize=False, lung_crop=True, segmenter_sha256=segmenter.sha256)
    with pytest.raises(ValueError, match="lung segmenter"):
        pre.prepare(image)
    lungs = segmenter(image)
    cropped, box = replace(pre, segmenter=segmenter).prepare_with_box(image)
    rows, cols = box_pixels(box, image.shape)
    by_hand = Preprocess(size=64, equalize=False).prepare(image[rows, cols])
    np.testing.assert_array_equal(cropped, by_hand)
    np.testing.assert_array_equal(pre.prepare(image, lungs), cropped)  # same map, same crop
    assert box != (0.0, 0.0, 1.0, 1.0)
    moved = (box[0] + 0.03, box[1], box[2] + 0.03, box[3])  # a given box (bench/box_jitter.py) is the one cut
    at_moved, kept = pre.prepare_with_box(image, lungs, moved)
    rows, cols = box_pixels(moved, image.shape)
    assert kept == moved and not np.array_equal(at_moved, cropped)
    np.testing.assert_array_equal(at_moved, Preprocess(size=64, equalize=False).prepare(image[rows, cols]))
    assert "segmenter" not in pre.to_dict() and Preprocess(size=64).to_dict().keys() == {"size", "equalize", "mean", "std"}


def test_the_lung_map_is_cut_and_sized_as_if_brought_to_the_films_size_first(segmenter: LungSegmenter, manifest: Path):
    """`_crop` makes the box's part of the map at the network's side in one step (`covidxray.resample`): the same map
    as the whole map enlarged to the film, cut, and shrunk to the side by Pillow (to float rounding), on a real film
    as it is, enlarged to a hospital film's 2500 x 3000 px, and shrunk below the side."""
    image = load_image(manifest.parent / "images/ieee8023/covid/00010.jpg")
    for shape in (image.shape, (3000, 2500), (150, 120)):
        film = resize(image, shape)
        lungs = segmenter(film)
        box = lung_box(lungs, 0.1)
        rows, cols = box_pixels(box, film.shape)
        cut, cut_lungs = _crop(film, lungs, box, 160)
        np.testing.assert_array_equal(cut, film[rows, cols])
        assert cut_lungs.shape == (160, 160) and box != (0.0, 0.0, 1.0, 1.0) and 0.2 < (cut_lungs > 0.5).mean() < 0.9
        np.testing.assert_allclose(cut_lungs, resize(resize(lungs, film.shape)[rows, cols], 160), atol=1e-4)


def test_a_model_refuses_another_segmenter(tmp_path: Path, segmenter: LungSegmenter):
    segmenter.copy_to(tmp_path)
    meta = {"preprocess": Preprocess(size=64, lung_crop=True, segmenter_sha256="0" * 64).to_dict()}
    with pytest.raises(CheckpointError, match="not the segmenter this model was trained with"):
        load_preprocess(meta, tmp_path / "model.json")
    meta["preprocess"]["segmenter_sha256"] = segmenter.sha256
    assert load_preprocess(meta, tmp_path / "model.json").segmenter is not None
    (tmp_path / "segmenter.safetensors").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="do not match"):
        LungSegmenter(tmp_path)


def test_segment_command_writes_mask_and_overlay(tmp_path: Path, manifest: Path):
    xray = manifest.parent / "images/covid-cxnet/covid/00001.jpg"
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["segment", str(xray), str(bad), "--out", str(tmp_path / "out")]) == 2
    mask = np.asarray(Image.open(tmp_path / "out" / "00001_lungs.png"))
    assert mask.shape == load_image(xray).shape and set(np.unique(mask)) == {0, 255}
    assert 0.1 < (mask > 0).mean() < 0.6
    overlay = Image.open(tmp_path / "out" / "00001_lungs_overlay.png")
    assert overlay.mode == "RGB" and overlay.size == (mask.shape[1], mask.shape[0])


@pytest.mark.slow
def test_training_a_segmenter_writes_a_loadable_pair(tmp_path: Path, jsrt: Path):
    from covidxray.segment_training import SegConfig, train_segmenter

    rows = list(csv.DictReader(open(jsrt / "manifest.csv")))[:30]
    small = tmp_path / "manifest.csv"
    with open(small, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "path": str(jsrt / r["path"]), "mask": str(jsrt / r["mask"])} for r in rows)
    path = train_segmenter(SegConfig(data=str(small), out=str(tmp_path / "seg"), size=32, epochs=2, pretrained=False))
    meta = json.loads(path.read_text())
    assert set(meta["split"]) == {"train", "val", "test"} and 0.0 <= meta["metrics"]["test"]["dice_mean"] <= 1.0
    assert sorted(sum(meta["split"].values(), [])) == sorted(Path(r["path"]).name for r in rows)
    assert LungSegmenter(path.parent)(np.random.rand(50, 40).astype(np.float32)).shape == (32, 32)


def test_equalising_on_the_lungs_puts_every_origin_s_lungs_on_the_same_grey_levels(segmenter: LungSegmenter, data_root: Path):
    """Shenzhen's detector makes normal lungs bright (read as opacity), Montgomery's dark; equalised on the lung pixels
    alone, both origins' normal lungs span the full grey range alike, and the option is part of the stored contract."""
    films = {origin: sorted((data_root.parent / "tb-cxr/images/normal").glob(f"{origin}-*.jpg"))[:6]
             for origin in ("shenzhen", "montgomery")}
    plain = Preprocess(size=96, lung_crop=True, outside=0.7, segmenter_sha256=segmenter.sha256, segmenter=segmenter)
    on_lungs = replace(plain, equalize_lungs=True)

    def lung_mean(pre: Preprocess, path: Path) -> float:
        image = load_image(path)
        lungs = segmenter(image)
        return float(pre.prepare(image, lungs)[pre.input_lungs(lungs) > 0.5].mean())

    gap = {name: abs(np.mean([lung_mean(pre, f) for f in films["shenzhen"]]) - np.mean([lung_mean(pre, f) for f in films["montgomery"]]))
           for name, pre in (("plain", plain), ("lungs", on_lungs))}
    assert gap["plain"] > 25 and gap["lungs"] < gap["plain"] / 3, gap
    # Equalised on the lungs, the lung pixels are (about) uniform over 0..255: their mean sits near the middle.
    assert all(abs(lung_mean(on_lungs, f) - 127.5) < 20 for f in films["shenzhen"])
    assert on_lungs.to_dict()["equalize_lungs"] is True and "equalize_lungs" not in plain.to_dict()
    assert Preprocess(**{k: v for k, v in on_lungs.to_dict().items()}) == replace(on_lungs, segmenter=None)


def test_lung_only_equalisation_needs_the_lung_crop_and_equalisation():
    for bad in ({"equalize_lungs": True}, {"equalize_lungs": True, "lung_crop": True, "equalize": False}):
        with pytest.raises(ValueError, match="equalize_lungs"):
            Preprocess(size=64, **bad)


def test_the_crop_s_dilation_is_scipy_s_maximum_filter(segmenter: LungSegmenter, data_root: Path):
    """`max_filter` (shifted maxima) stands in for scipy's maximum filter in the darkening outside the lungs: the
    same numbers on real lung maps, on noise, at the edges and for every odd window the sizes in use give."""
    rng = np.random.default_rng(0)
    films = sorted((data_root / "images").rglob("*.jpg"))[::500][:4]
    maps = [segmenter(load_image(f)) for f in films] + [rng.random((37, 53), dtype=np.float32)]
    assert len(films) == 4 and all(m.max() > 0.5 for m in maps)
    for a in maps:
        for k in (3, 5, 7, 9, 11):
            assert np.array_equal(max_filter(a, k), ndimage.maximum_filter(a, k, mode="nearest")), (a.shape, k)
    assert np.array_equal(max_filter(np.eye(5, dtype=np.float32), 3)[0], [1, 1, 1, 0, 0])  # a row at the edge


def test_views_of_moved_boxes_start_with_the_own_box_and_repeat(segmenter: LungSegmenter, manifest: Path):
    """``--box-views``: each training film prepared at its lungs' box and at boxes moved on the film, the same each time."""
    from covidxray.cache import prepare_images
    from covidxray.data import load_samples

    samples = load_samples(manifest)[:4]
    pre = Preprocess(size=64, lung_crop=True, outside=0.7, segmenter_sha256=segmenter.sha256, segmenter=segmenter)
    one, _ = prepare_images(samples, pre, cache_dir="")
    views, failed = prepare_images(samples, pre, cache_dir="", views=3, shift=0.05)
    again, _ = prepare_images(samples, pre, cache_dir="", views=3, shift=0.05)
    assert not failed and views.shape == (4, 3, 64, 64)
    assert torch.equal(views[:, 0], one) and torch.equal(views, again)  # view 0 is what serving prepares
    assert all(not torch.equal(views[i, 0], views[i, k]) for i in range(4) for k in (1, 2))  # the others moved
    with pytest.raises(ValueError, match="lung crop"):
        prepare_images(samples, Preprocess(size=64), cache_dir="", views=3)


def test_training_draws_one_view_per_film(manifest: Path, split_file: Path, tmp_path: Path, one_torch_thread):
    from covidxray.config import config_for
    from covidxray.engine import train

    cfg = config_for("default", data=str(manifest), splits=str(split_file), out=str(tmp_path / "run"), size=64,
                     epochs=1, limit=24, cache_dir=str(tmp_path / "cache"), box_views=3, box_shift=0.05)
    run = train(cfg)
    meta = json.loads((run / "model.json").read_text())
    assert meta["train_config"]["box_views"] == 3 and (run / "model.safetensors").is_file()
