"""ONNX export of the bundled model: parity with PyTorch on real X-rays, and the ONNX Runtime backend."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from covidxray.backends import CascadeRunner, OnnxRunner, near_thresholds
from covidxray.cache import prepare_images
from covidxray.checkpoint import (contract_path, copy_model, load_model, model_files, read_model_meta, resolve_data,
                                 update_model_meta)
from covidxray.cli import main
from covidxray.data import load_samples
from covidxray.errors import CheckpointError
from covidxray.export import bias_corrected, export_onnx, quantise
from covidxray.imaging import read_image
from covidxray.predictor import Predictor, default_model_path
from covidxray.segment import LungSegmenter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(default_model_path(), out / "model.onnx")
    return out


@pytest.fixture(scope="module")
def xrays(manifest: Path, split_file: Path) -> list:
    test = [s for s in load_samples(manifest, split_file) if s.split == "test"]
    return [s for s in test if s.label == 1][:6] + [s for s in test if s.label == 0][:6]


def test_onnx_matches_torch_on_real_xrays(onnx_dir: Path, xrays: list):
    torch_pred = Predictor(default_model_path(), backend="torch")
    onnx_pred = Predictor(onnx_dir / "model.onnx", backend="onnx")
    assert onnx_pred.backend == "onnx" and torch_pred.backend == "torch"
    images, failed = prepare_images(xrays, torch_pred.preprocess, cache_dir="")
    assert failed == []
    p_torch = torch_pred.predict_prepared(images)
    for batch in (1, 5, 12):  # the batch axis is dynamic
        p_onnx = onnx_pred.predict_prepared(images, batch_size=batch)
        assert np.max(np.abs(p_torch - p_onnx)) < 1e-4
    assert onnx_pred.threshold == torch_pred.threshold and onnx_pred.preprocess == torch_pred.preprocess
    assert len({round(float(p), 3) for p in p_torch}) > 3  # real, varied answers, not a constant


def _optimised_ops(blob: bytes, tmp_path: Path) -> Counter:
    """Operator counts of ``blob`` after ONNX Runtime's own graph optimisation (what actually runs)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(blob, sess_options=opts, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


def test_graphs_have_no_runtime_padding(onnx_dir: Path):
    """timm's TensorFlow-'SAME' convolutions computed their padding from the input shape at run time (Shape,
    Gather, Ceil, Pad before each strided convolution); at the classifier's fixed size it is a constant inside
    the convolution, which lets ONNX Runtime fuse the int8 graph. The segmenter's encoder is the same kind of
    network at its own fixed size: no Pad either (each kept ONNX Runtime's blocked layout from running through)."""
    import onnx

    ops = Counter(n.op_type for n in onnx.load(onnx_dir / "model.onnx").graph.node)
    assert ops["Conv"] == _layers()[0] and not {"Pad", "Shape", "Ceil", "Gather"} & set(ops)
    seg = LungSegmenter(default_model_path())
    seg_ops = Counter(n.op_type for n in onnx.load(onnx_dir / "segmenter.onnx").graph.node)
    same = sum(type(m).__name__ == "Conv2dSame" for m in seg.graph.modules())
    assert same > 0 and "Pad" not in seg_ops and "Ceil" not in seg_ops
    assert seg_ops["Conv"] == sum(isinstance(m, torch.nn.Conv2d) for m in seg.graph.modules())


def _layers() -> tuple[int, int]:
    """The bundled classifier's convolutions and residual sums, counted in PyTorch (Lite0: 49 and 9; Lite1: 64 and 14)."""
    model = load_model(default_model_path())[0]
    return (sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()),
            sum(bool(getattr(m, "has_skip", False)) for m in model.modules()))


def test_int8_graph_runs_every_convolution_in_int8(onnx_dir: Path, xrays: list, tmp_path: Path):
    """The quantised graph ONNX Runtime runs: every convolution and residual sum in its int8 kernels, with no
    float convolution and no quantise/dequantise pair left between layers (else int8 is barely faster)."""
    pred = Predictor(default_model_path(), backend="torch")
    images, failed = prepare_images(xrays, pred.preprocess, cache_dir="")
    assert failed == []
    float_blob = (onnx_dir / "model.onnx").read_bytes()
    ops = _optimised_ops(quantise(float_blob, pred.preprocess.to_tensor(images).numpy()), tmp_path)
    assert (ops["QLinearConv"], ops["QLinearAdd"]) == _layers() and ops["QLinearAdd"] > 0
    assert ops["Conv"] == 0 and ops["Add"] == 0 and ops["Clip"] == 0
    assert ops["QuantizeLinear"] <= 1 and ops["DequantizeLinear"] <= 2  # the input, and the two outputs


def _int8_only(blob: bytes, pred: Predictor, images: torch.Tensor) -> np.ndarray:
    """P(covid) of the graph ``blob`` alone (no re-check), for prepared ``images``."""
    logits = OnnxRunner(blob)(image=pred.preprocess.to_tensor(images))[0]
    return torch.softmax(torch.from_numpy(logits) / pred.temperature, dim=1)[:, 1].numpy()


def test_int8_cascade_rechecks_films_near_a_threshold_in_float(onnx_dir: Path, xrays: list, tmp_path: Path):
    """Served int8 (`CascadeRunner`): a film whose int8 P(covid) lies within the band of a threshold in play gets the
    float graph's answer and features, the others the int8 graph's; a site threshold given to `Predictor.watch` is in
    play too. The int8 graph here is quantised plainly on the films themselves: its errors are real, not made up."""
    folder = _copy_exported(onnx_dir, tmp_path / "m")
    plain = Predictor(folder / "model.onnx")  # the float graph
    images, failed = prepare_images(xrays, plain.preprocess, cache_dir="")
    assert failed == [] and not isinstance(plain.runner, CascadeRunner)
    blob = quantise((folder / "model.onnx").read_bytes(), plain.preprocess.to_tensor(images).numpy())
    p_int8, (p_float, u_float), t = _int8_only(blob, plain, images), plain.classify(images), plain.threshold
    band = float(np.median(np.abs(p_int8 - t)))  # about half the films lie within it
    contract = json.loads((folder / "model.onnx.json").read_text())
    recheck = {"band": band, "float_onnx": "model.onnx", "float_onnx_sha256": contract["onnx_sha256"]}
    (folder / "model.int8.onnx").write_bytes(blob)
    (folder / "model.int8.onnx.json").write_text(json.dumps(contract | {
        "onnx_file": "model.int8.onnx", "onnx_sha256": hashlib.sha256(blob).hexdigest(), "int8": {"recheck": recheck}}))
    served = Predictor(folder)  # auto: the int8 graph, with its float re-check
    assert isinstance(served.runner, CascadeRunner)
    p, u = served.classify(images, batch_size=5)
    near = near_thresholds(p_int8, band, [t])
    assert 0 < near.sum() < len(near) and np.abs(p_int8 - p_float)[near].max() > 1e-4  # int8 alone differs there
    np.testing.assert_allclose(p[near], p_float[near], atol=1e-5)  # the float graph's answer, decision and all
    np.testing.assert_allclose(u[near], u_float[near], atol=1e-5)
    np.testing.assert_allclose(p[~near], p_int8[~near], atol=1e-6)
    assert served.runner.rechecked == near.sum() and served.runner.scored == len(near)
    # A site whose threshold lies at a film the model's threshold leaves to int8: after watch() it is re-checked.
    far = int(np.flatnonzero(~near)[np.argmax(np.abs(p_int8 - p_float)[~near])])
    served.watch([float(p_int8[far])])
    p_site = served.predict_prepared(images)
    assert abs(p_site[far] - p_float[far]) < 1e-5 and abs(p[far] - p_float[far]) > 1e-5
    near_site = near | near_thresholds(p_int8, band, [float(p_int8[far])])
    np.testing.assert_allclose(p_site[near_site], p_float[near_site], atol=1e-5)
    np.testing.assert_allclose(p_site[~near_site], p_int8[~near_site], atol=1e-6)


def _round_weights(model: torch.nn.Module) -> torch.nn.Module:
    """Every convolution's and linear layer's weights rounded as ONNX Runtime does: per output channel, -127..127."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                scale = (m.weight.abs().flatten(1).amax(1).clamp_min(1e-12) / 127).view((-1,) + (1,) * (m.weight.dim() - 1))
                m.weight.copy_(torch.round(m.weight / scale).clamp(-127, 127) * scale)
    return model


def test_bias_correction_cancels_the_mean_error_of_int8_weights(manifest: Path, split_file: Path):
    """Calibrated on half of 31 test films (every 37th), the corrected biases bring the other half's logits closer to
    the float model's once the weights are rounded to int8, and leave the float weights as they were. (On 6 + 6 films
    the Lite1 model's error fell by less than a fifth: too few films to estimate a mean error from.)"""
    pred = Predictor(default_model_path(), backend="torch")
    films = [s for s in load_samples(manifest, split_file) if s.split == "test"][::37]
    images, failed = prepare_images(films, pred.preprocess, cache_dir="")
    assert failed == []
    x = pred.preprocess.to_tensor(images)
    calibrate, held_out = x[::2], x[1::2]
    reference = load_model(default_model_path())[0].eval()
    corrected = bias_corrected(load_model(default_model_path())[0], calibrate.numpy())
    weights = {k: v for k, v in corrected.state_dict().items() if k.endswith("weight")}
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in weights.items())
    with torch.no_grad():
        want = reference(held_out)
        plain_error = (_round_weights(load_model(default_model_path())[0].eval())(held_out) - want).abs().mean()
        corrected_error = (_round_weights(corrected)(held_out) - want).abs().mean()
    assert corrected_error < 0.8 * plain_error, (float(corrected_error), float(plain_error))


def _copy_exported(onnx_dir: Path, folder: Path) -> Path:
    copy_model(onnx_dir, folder)
    for name in ("model.onnx", "model.onnx.json", "segmenter.onnx"):
        (folder / name).write_bytes((onnx_dir / name).read_bytes())
    return folder


def test_contract_names_the_model_and_its_hashes(onnx_dir: Path, tmp_path: Path):
    contract = json.loads((onnx_dir / "model.onnx.json").read_text())
    meta = json.loads((default_model_path() / "model.json").read_text())
    assert contract["model"] == "model.json" and contract["weights_sha256"] == meta["weights_sha256"]
    assert len(contract["onnx_sha256"]) == 64 and len(contract["segmenter_onnx"]["sha256"]) == 64
    # Threshold and preprocessing are the model.json's: recalibrating the model recalibrates the graph.
    copy = _copy_exported(onnx_dir, tmp_path)
    update_model_meta(copy, {"threshold": 0.4321})
    assert Predictor(copy, backend="onnx").threshold == 0.4321


def test_a_graph_of_other_weights_is_refused(onnx_dir: Path, tmp_path: Path):
    _copy_exported(onnx_dir, tmp_path)
    contract = json.loads((tmp_path / "model.onnx.json").read_text())
    (tmp_path / "model.onnx.json").write_text(json.dumps({**contract, "weights_sha256": "0" * 64}))
    with pytest.raises(CheckpointError, match="other weights"):
        Predictor(tmp_path / "model.onnx", backend="onnx")


def test_tampered_onnx_is_refused(onnx_dir: Path, tmp_path: Path):
    _copy_exported(onnx_dir, tmp_path)
    bad = tmp_path / "model.onnx"
    bad.write_bytes((onnx_dir / "model.onnx").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match="SHA-256"):
        Predictor(bad, backend="onnx")


def test_the_segmenter_runs_the_same_behind_either_runner(onnx_dir: Path, xrays: list, tmp_path: Path):
    """The exported `SegmenterGraph` behind the same `Runner` call gives PyTorch's lung maps and gate probabilities."""
    onnx_seg = Predictor(onnx_dir / "model.onnx", backend="onnx").segmenter
    torch_seg = Predictor(default_model_path(), backend="torch").segmenter
    assert onnx_seg.runner.kind == "onnx" and torch_seg.runner.kind == "torch"
    decoded = [read_image(s.path) for s in xrays]
    images, infos = [image for image, _ in decoded], [info for _, info in decoded]
    for a, b in zip(onnx_seg.analyse(images, infos), torch_seg.analyse(images, infos)):
        assert a.lungs.shape == b.lungs.shape == (onnx_seg.size, onnx_seg.size)
        assert np.max(np.abs(a.lungs - b.lungs)) < 1e-3 and np.max(np.abs(a.gate - b.gate)) < 1e-4
    # Its bytes are checked like the classifier's: a tampered graph is refused, naming the file.
    _copy_exported(onnx_dir, tmp_path)
    (tmp_path / "segmenter.onnx").write_bytes((onnx_dir / "segmenter.onnx").read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CheckpointError, match=r"segmenter\.onnx: .*SHA-256 differs"):
        Predictor(tmp_path, backend="onnx")


def test_backend_choice(onnx_dir: Path, tmp_path: Path):
    bare = tmp_path / "bare"  # the bundled model without its ONNX graphs
    bare.mkdir()
    for f in model_files(default_model_path()):
        if ".onnx" not in f.name:
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="no ONNX model"):
        Predictor(bare, backend="onnx")
    assert Predictor(bare, backend="auto").backend == "torch"
    assert Predictor(onnx_dir, backend="auto").backend == "onnx"
    float_onnx = Predictor(onnx_dir / "model.onnx")  # the folder may hold the int8 graph too (copied with the model)
    assert "int8" not in float_onnx.onnx_contract
    # The preprocessing of an ONNX-backed predictor (segmenter in ONNX Runtime too) still describes itself
    # (cache keys, contracts); asdict() once tried to deep-copy the session.
    assert json.loads(json.dumps(float_onnx.preprocess.to_dict()))["size"] == float_onnx.preprocess.size
    shipped = Predictor()  # the package ships its ONNX graph(s): auto serves them, not PyTorch
    assert shipped.backend == "onnx" and shipped.onnx_contract["weights_sha256"] == shipped.meta["weights_sha256"]


def test_cli_export_then_predict_with_onnx(tmp_path: Path, xrays: list, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(default_model_path()), "--onnx", str(out)]) == 0
    assert out.is_file() and (tmp_path / "m.onnx.json").is_file() and (tmp_path / "model.json").is_file()
    capsys.readouterr()
    path = str(xrays[0].path)
    assert main(["predict", path, "--model", str(out), "--backend", "onnx", "--format", "json"]) == 0
    onnx_row = json.loads(capsys.readouterr().out)
    assert main(["predict", path, "--backend", "torch", "--format", "json"]) == 0
    torch_row = json.loads(capsys.readouterr().out)
    assert onnx_row["label"] == torch_row["label"]
    assert abs(onnx_row["probability"] - torch_row["probability"]) < 1e-4


def test_a_film_on_the_threshold_is_a_tie_not_a_changed_decision():
    """A validation-chosen threshold is one validation film's P(covid): float rounding alone decides that film, so the
    parity check counts it as kept; a film 0.001 from the threshold that crosses it is a changed decision."""
    from covidxray.int8_check import TIE, _compare

    t = 0.7213476
    y = np.array([1, 0, 1, 0])
    p_torch = np.array([t, t - 0.001, 0.95, 0.05])
    p_float = p_torch + np.array([-TIE / 10, 0.0, 0.0, 0.0])  # the tie falls just below in float
    p_int8 = p_torch + np.array([-0.01, 0.002, 0.0, 0.0])  # near the threshold: both re-checked at band 0.02
    assert _compare(y, p_torch, p_int8, p_float, 0.02, t)["agreement"] == 1.0
    assert _compare(y, p_torch, p_int8, p_float, 0.0, t)["agreement"] == 0.75  # int8 alone: the second film crosses
    beyond = p_torch + np.array([2 * TIE, 0.0, 0.0, 0.0])  # two tie widths above the threshold: no longer a tie
    assert _compare(y, beyond, p_int8, p_float, 0.02, t)["agreement"] == 0.75


def test_int8_export_checks_itself_against_pytorch(trained_run: Path, xrays: list, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch):
    from covidxray import int8_check

    monkeypatch.setattr(int8_check, "INT8_MIN_AGREEMENT", 1.01)  # no graph can keep more than all decisions: refused
    refused = tmp_path / "refused" / "model.int8.onnx"
    with pytest.raises(CheckpointError, match=r"int8 quantisation changed the model too much .* use the float ONNX file"):
        export_onnx(trained_run, refused, int8=True, calibration_images=32)
    assert not refused.exists() and not contract_path(refused).exists()  # nothing half-written to be picked up

    monkeypatch.setattr(int8_check, "INT8_MIN_AGREEMENT", 0.0)
    monkeypatch.setattr(int8_check, "INT8_MAX_AUC_DROP", 1.0)
    monkeypatch.setattr(int8_check, "RECHECK_BANDS", (0.25, 0.5, 0.6))
    out = tmp_path / "ok" / "model.int8.onnx"
    export_onnx(trained_run, out, int8=True, calibration_images=32, min_band=0.3)  # 0.25 would hold: not tried
    int8 = Predictor(out.parent)  # auto takes the int8 graph, with the float one beside it for the re-check
    parity = int8.onnx_contract["int8"]
    recheck = parity["recheck"]  # the narrowest band from min_band up that holds the limits, and the float graph it uses
    assert recheck["band"] == 0.5 and isinstance(int8.runner, CascadeRunner) and int8.runner.band == 0.5
    assert recheck["float_onnx_sha256"] == hashlib.sha256(out.with_name("model.onnx").read_bytes()).hexdigest()
    assert 0.0 <= recheck["share_test"] == parity["rechecked"] <= 1.0 and 0.0 <= recheck["share_val"] <= 1.0
    assert int8.backend == "onnx" and parity["calibration_images"] == 32 and 0.0 <= parity["agreement"] <= 1.0
    assert parity["roc_auc_drop"] == pytest.approx(parity["roc_auc_torch"] - parity["roc_auc_int8"])
    val = [s for s in load_samples(*resolve_data(trained_run, read_model_meta(trained_run)[0])) if s.split == "val"]
    assert set(parity["val_sources"]) == {s.source for s in val} and len(parity["val_sources"]) >= 2  # every source
    for source, r in parity["val_sources"].items():
        assert r["images"] == sum(s.source == source for s in val) and 0.0 <= r["agreement"] <= 1.0
    export_onnx(trained_run, out.with_name("model.onnx"))
    assert out.stat().st_size < 0.5 * out.with_name("model.onnx").stat().st_size  # int8 weights, not float
    torch_pred = Predictor(out.parent, backend="torch")
    images, failed = prepare_images(xrays, torch_pred.preprocess, cache_dir="")
    assert failed == []
    p_int8, p_torch = int8.predict_prepared(images), torch_pred.predict_prepared(images)
    assert p_int8.shape == p_torch.shape == (len(xrays),) and ((0 <= p_int8) & (p_int8 <= 1)).all()


def test_a_float_export_removes_the_int8_graph_it_leaves_stale(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """An int8 graph re-checks with the float graph its contract names by hash; exporting that float graph again
    (bytes differ across library versions) must not leave a folder that refuses to load."""
    model = copy_model(default_model_path(), tmp_path / "model")
    int8_contract = model / "model.int8.onnx.json"
    contract = json.loads(int8_contract.read_text())
    contract["int8"]["recheck"]["float_onnx_sha256"] = "0" * 64  # as if made beside another export of model.onnx
    int8_contract.write_text(json.dumps(contract))
    export_onnx(model, model / "model.onnx")
    assert not int8_contract.exists() and not (model / "model.int8.onnx").exists()
    assert "removed" in caplog.text and "model.int8.onnx" in caplog.text
    served = Predictor(model)  # auto: the float graph now, not an error
    assert served.backend == "onnx" and "int8" not in served.onnx_contract
