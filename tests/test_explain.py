"""Tests for covidxray.explain: Grad-CAM maps on real X-rays with the bundled model, and a model left as it was found."""

from __future__ import annotations

import copy
import dataclasses
import io
import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from covidxray.errors import CheckpointError, ImageError
from covidxray.explain import Explained, explain, explain_files, grad_cam, overlay_png
from covidxray.imaging import load_image
from covidxray.models import REGISTRY, build_model, get_spec
from covidxray.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL_ARCHS = sorted(REGISTRY)
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_forward_hooks_with_kwargs")


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(backend="torch")  # the bundled model, in PyTorch: Grad-CAM needs gradients


@pytest.fixture(scope="module")
def xray_paths(manifest: Path) -> dict[str, list[Path]]:
    """The first two COVID-19 and the first normal X-ray listed in the shared manifest."""
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    covid = [manifest.parent / r["path"] for r in rows if r["label"] == "covid"][:2]
    normal = [manifest.parent / r["path"] for r in rows if r["label"] == "normal"][:1]
    return {"covid": covid, "normal": normal}


@pytest.fixture(scope="module")
def xrays(xray_paths: dict[str, list[Path]]) -> dict[str, list[np.ndarray]]:
    return {label: [load_image(p) for p in paths] for label, paths in xray_paths.items()}


def _batch(images: list[np.ndarray], size: int, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """Real X-rays squashed to ``size`` and normalised: ``(N, 1, size, size)``."""
    small = [np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32) for img in images]
    return (torch.from_numpy(np.stack(small))[:, None] - mean) / std


def _hooks(model: nn.Module) -> dict[str, int]:
    """Number of hooks of each kind on every module (plus torch's global module hooks)."""
    counts = {f"{name}.{d}": len(getattr(m, d, {})) for name, m in model.named_modules() for d in HOOK_DICTS}
    glob = torch.nn.modules.module
    counts["global"] = len(glob._global_forward_hooks) + len(glob._global_backward_hooks) + len(glob._global_forward_pre_hooks)
    return counts


def _state(model: nn.Module) -> tuple[dict[str, bool], dict[str, bool]]:
    return ({n: m.training for n, m in model.named_modules()}, {n: p.requires_grad for n, p in model.named_parameters()})


def _check_maps(maps: torch.Tensor | np.ndarray) -> None:
    """Finite, in [0, 1], and each map either all zero (no positive evidence) or peaking at exactly 1."""
    maps = torch.as_tensor(maps)
    assert maps.dtype == torch.float32
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    for m in maps.reshape(-1, *maps.shape[-2:]):
        assert float(m.max()) in (0.0, 1.0)


# ------------------------------------------------------------------------------------ maps on real X-rays


def test_grad_cam_map_has_input_shape(predictor: Predictor, xrays):
    size = predictor.preprocess.size
    images = xrays["covid"] + xrays["normal"]
    x = torch.cat([predictor.preprocess(img) for img in images])
    maps = grad_cam(predictor.model, x, get_spec(predictor.meta["arch"]).cam_layer)
    assert maps.shape == (len(images), size, size)
    _check_maps(maps)
    # The bundled model is confident on both COVID-19 X-rays: their maps have positive evidence.
    assert all(float(m.max()) == 1.0 for m in maps[:2])
    assert all(float(m.std()) > 0.05 for m in maps[:2])  # a map, not a constant


@pytest.mark.parametrize("label,index", [("covid", 0), ("covid", 1), ("normal", 0)])
def test_explain_map_has_image_shape_and_probability_of_predictor(predictor: Predictor, xrays, label: str, index: int):
    image = xrays[label][index]
    prob, cam = explain(predictor, image)
    assert cam.shape == image.shape
    assert isinstance(cam, np.ndarray)
    _check_maps(cam)
    assert prob == pytest.approx(predictor.predict_array(image).probability, abs=1e-5)
    warm = copy.copy(predictor)  # a calibrated model: the temperature must be applied the same way
    warm.temperature = 2.5
    assert explain(warm, image)[0] == pytest.approx(warm.predict_array(image).probability, abs=1e-5)
    assert abs(explain(warm, image)[0] - prob) > 1e-3
    if label == "covid":
        assert cam.max() == 1.0 and prob >= predictor.threshold


def test_explain_equals_grad_cam_for_an_image_of_the_network_size(predictor: Predictor, xrays):
    # At the network's own size and without the lung crop preprocessing does not resample, so both paths
    # must give the same map (the bundled model crops to the lungs: here it sees the whole image instead).
    predictor = copy.copy(predictor)
    predictor.preprocess = dataclasses.replace(predictor.preprocess, lung_crop=False, outside=0.0)
    size = predictor.preprocess.size
    image = np.asarray(Image.fromarray(xrays["covid"][0]).resize((size, size)), dtype=np.float32).clip(0, 1)
    _, cam = explain(predictor, image)
    ref = grad_cam(predictor.model, predictor.preprocess(image), get_spec(predictor.meta["arch"]).cam_layer)[0]
    np.testing.assert_allclose(cam, ref.numpy(), atol=1e-5)


def test_randomised_weights_change_the_map(predictor: Predictor, xrays):
    """Model-parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018):
    a map that survives random weights explains the image, not the model."""
    layer = get_spec(predictor.meta["arch"]).cam_layer
    x = torch.cat([predictor.preprocess(img) for img in xrays["covid"]])
    trained = grad_cam(predictor.model, x, layer)
    random_model = copy.deepcopy(predictor.model)  # never the shared predictor's own model
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        for p in random_model.parameters():
            nn.init.normal_(p, std=0.1)
    randomised = grad_cam(random_model, x, layer)
    _check_maps(randomised)
    for a, b in zip(trained, randomised):
        r = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert r < 0.5 or float((a - b).abs().mean()) > 0.1, f"map barely changed with random weights (r={r:.2f})"


def test_grad_cam_equals_cam_for_global_pooling_and_a_linear_head(xrays):
    """With global average pooling then one linear layer, Grad-CAM's channel weights are the head's
    weights divided by h*w, so the map is Zhou et al.'s CAM (CVPR 2016) up to scale (Selvaraju et al., sec. 3.1)."""
    model = build_model("cxrnet").eval()
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        nn.init.normal_(model.classifier[3].weight)  # build_model's tiny head init would make the test weak
    x = _batch(xrays["covid"] + xrays["normal"], 64)
    with torch.no_grad():
        acts = model.features(x)
    for k in (0, 1):
        cam = torch.relu(torch.einsum("c,nchw->nhw", model.classifier[3].weight[k], acts))
        cam = torch.nn.functional.interpolate(cam[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        peak = cam.amax(dim=(1, 2), keepdim=True)
        expected = torch.where(peak > 0, cam / peak, torch.zeros_like(cam))
        torch.testing.assert_close(grad_cam(model, x, "features", class_index=k), expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------- the model is left as it was


@pytest.mark.parametrize("training", [True, False])
def test_grad_cam_restores_modes_hooks_and_grad_flags(xrays, training: bool):
    name = "tf_efficientnet_lite0"
    spec = get_spec(name)
    model = build_model(name).train(training)
    for prefix in spec.freezable:  # a fine-tuning recipe: early layers frozen, BatchNorm there in eval
        sub = model.get_submodule(prefix)
        sub.requires_grad_(False)
        sub.eval()
    before_hooks, before_state = _hooks(model), _state(model)
    assert not any(before_hooks.values())
    x = _batch(xrays["covid"], 64)
    maps = grad_cam(model, x, spec.cam_layer)
    assert _hooks(model) == before_hooks
    assert _state(model) == before_state
    assert all(p.grad is None for p in model.parameters())  # no gradients left on the parameters
    # The map is computed in eval mode: the same from a model that starts in eval mode.
    torch.testing.assert_close(maps, grad_cam(copy.deepcopy(model).eval(), x, spec.cam_layer))


class _Boom(nn.Module):
    """Runs the network (so the Grad-CAM hook fires), then fails."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.net(x)
        raise RuntimeError("boom")


@pytest.mark.parametrize("failure", ["after_hook", "wrong_shape"])
def test_hooks_removed_and_mode_restored_when_forward_raises(xrays, failure: str):
    spec = get_spec("cxrnet")
    net = build_model("cxrnet")
    net.features[0].requires_grad_(False)
    model, layer, x = _Boom(net), f"net.{spec.cam_layer}", _batch(xrays["covid"], 64)
    if failure == "wrong_shape":
        model, layer, x = net, spec.cam_layer, x.expand(-1, 3, -1, -1)  # 3 channels into a 1-channel stem
    model.train()
    before_hooks, before_state = _hooks(model), _state(model)
    with pytest.raises(RuntimeError):
        grad_cam(model, x, layer)
    assert _hooks(model) == before_hooks
    assert _state(model) == before_state


def test_grad_cam_on_a_frozen_model_under_no_grad(xrays):
    torch.manual_seed(0)
    model = build_model("cxrnet").requires_grad_(False).eval()
    x = _batch(xrays["covid"], 64)
    free = [grad_cam(model, x, "features", class_index=c) for c in (0, 1)]
    with torch.no_grad():
        frozen = [grad_cam(model, x, "features", class_index=c) for c in (0, 1)]
    for maps, expected in zip(frozen, free):
        assert maps.shape == (2, 64, 64)
        _check_maps(maps)
        torch.testing.assert_close(maps, expected)  # no_grad changed nothing
    # An untrained head may point either way, but one of the two classes has positive evidence:
    # a graph existed and a gradient reached the layer.
    assert any(float(m.max()) == 1.0 for maps in frozen for m in maps)
    assert not any(p.requires_grad for p in model.parameters())


def test_unknown_layer_is_refused():
    with pytest.raises(ValueError, match="no_such_layer"):
        grad_cam(build_model("cxrnet"), torch.zeros(1, 1, 64, 64), "no_such_layer")


@pytest.mark.parametrize("name", ALL_ARCHS)
def test_every_registry_architecture(name: str, xrays):
    model = build_model(name).eval().to(memory_format=torch.channels_last)
    x = _batch(xrays["covid"], 64).contiguous(memory_format=torch.channels_last)
    maps = grad_cam(model, x, get_spec(name).cam_layer)
    assert maps.shape == (2, 64, 64)
    _check_maps(maps)


def test_explain_needs_the_torch_backend(xrays):
    onnx_like = SimpleNamespace(model=None, meta={"arch": "tf_efficientnet_lite0"})
    with pytest.raises(CheckpointError, match="torch"):
        explain(onnx_like, xrays["covid"][0])


# ------------------------------------------------------------------------------------- files and overlays


def test_overlay_png_keeps_the_image_size(xrays):
    image = xrays["covid"][0]
    h, w = image.shape
    cam = np.zeros_like(image)
    cam[: h // 2] = 1.0  # hot top half
    with Image.open(io.BytesIO(overlay_png(image, cam))) as png:
        rgb = np.asarray(png.convert("RGB"), dtype=np.float32)
        assert png.size == (w, h)
    # 'jet': hot is red, cold is blue.
    top, bottom = rgb[: h // 2].mean(axis=(0, 1)), rgb[h // 2:].mean(axis=(0, 1))
    assert top[0] > top[2] and bottom[2] > bottom[0]
    with Image.open(io.BytesIO(overlay_png(image, cam, title="P(covid)=0.93"))) as titled:
        assert titled.size == (w, h)
    with pytest.raises(ValueError, match="shape"):
        overlay_png(image, cam[:-1])


def test_explain_files_writes_maps_and_reports_bad_files(predictor: Predictor, xray_paths, tmp_path: Path):
    bad = tmp_path / "in" / "notes.png"
    bad.parent.mkdir()
    bad.write_text("this is a text file, not an X-ray\n")
    covid, normal = xray_paths["covid"][0], xray_paths["normal"][0]
    assert covid.stem == normal.stem  # both are 00001.jpg: the second must not overwrite the first
    out = tmp_path / "out"
    results = list(explain_files(predictor, [covid, bad, normal], out))
    assert isinstance(results[1], ImageError) and results[1].code == "not_an_image" and results[1].source == str(bad)
    assert all(isinstance(results[i], Explained) for i in (0, 2))
    assert [r.prediction.path for r in (results[0], results[2])] == [str(covid), str(normal)]
    assert results[0].overlay != results[2].overlay
    for r, path in ((results[0], covid), (results[2], normal)):
        image = load_image(path)
        p = r.prediction
        assert p.probability == pytest.approx(predictor.predict_path(path).probability, abs=1e-5)
        assert p.label == ("covid" if p.probability >= predictor.threshold else "normal")
        assert p.threshold == predictor.threshold
        with Image.open(r.overlay) as png:
            assert png.format == "PNG" and png.size == image.shape[::-1]
        cam = np.load(r.npy)
        assert cam.shape == image.shape
        _check_maps(cam)
    assert results[0].prediction.label == "covid"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f.name for r in (results[0], results[2]) for f in (r.overlay, r.npy)
    )  # nothing else, no temporary files left behind


def test_explain_a_predictor_and_cli(tmp_path, manifest):
    from covidxray.cli import main
    from covidxray.predictor import Predictor

    root = manifest.parent
    covid = next(root.glob("images/radiography-db/covid/*.jpg"))
    pred = Predictor(backend="torch")
    prob, cam = explain(pred, load_image(covid))
    answer, direct = pred.decide(str(covid), prob), pred.predict(covid)
    assert (answer.label, answer.threshold) == (direct.label, direct.threshold)  # decide() measures no unfamiliarity
    assert answer.probability == pytest.approx(direct.probability, abs=1e-5) and cam.shape == load_image(covid).shape
    assert 0.0 <= cam.min() and cam.max() <= 1.0
    bad = tmp_path / "notes.png"
    bad.write_text("not an x-ray")
    assert main(["explain", str(covid), str(bad), "--out", str(tmp_path / "cams")]) == 2
    assert (tmp_path / "cams" / f"{covid.stem}_gradcam.png").is_file()
    assert np.load(tmp_path / "cams" / f"{covid.stem}_gradcam.npy").shape == cam.shape
