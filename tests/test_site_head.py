"""A site's own head (`covidxray.headfit.site_head`, ``covidxray site add --refit-head``): the model's last layer refitted
with the site's normal films added to the training films' features the model keeps, applied per film by the CLI, the
API and an int8 graph's re-check.

JSRT's normal films stand in for a hospital the bundled model never saw: 60 onboard it, the other 32 check it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import dicoms
from covidxray.dicomnode import Listener, ListenerConfig
from covidxray.dicomnode.sr import Destination, build_report, send_datasets
from covidxray.backends import CascadeRunner
from covidxray.cli import main
from covidxray.errors import CheckpointError, DataError
from covidxray.headfit import FEATURES_FILE, HeadFeatures, fit_head, site_head
from covidxray.predictor import Predictor
from covidxray.server import create_app
from covidxray.sites import SiteProfile, SiteRegistry


def _kept(rng: np.random.Generator) -> HeadFeatures:
    """Training and validation features: COVID-19 films shifted along feature 0, normals from one origin."""
    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 8))
        x[:, 0] += 2.0 * y
        return x, y
    (x, y), (vx, vy) = split(600), split(300)
    return HeadFeatures(x, y, vx, vy)


def test_site_head_learns_the_sites_normals_and_keeps_the_validation_sensitivity(tmp_path: Path):
    rng = np.random.default_rng(0)
    kept = _kept(rng)
    site = rng.normal(size=(60, 8))
    site[:, 1] += 3.0  # the site's look: its normals lie off the training normals, along feature 1
    site[:, 0] += 1.0  # and halfway to COVID-19 on feature 0: the model's head calls many of them COVID-19
    plain = fit_head(kept.train, kept.train_y, kept.val, kept.val_y, grid=(0.3,)).head
    head = site_head(kept, site, c=0.3, temperature=1.5, threshold=0.6, sensitivity=0.9)
    p = 1 / (1 + np.exp(-head.margin(kept.val[kept.val_y == 1])))
    # The model's threshold is met where 0.90 of the validation COVID-19 films stay at or above it.
    assert (p >= 0.6).mean() >= 0.9 and (p >= 0.6).mean() < 0.9 + 2 / len(p)
    cut_plain = np.quantile(plain.margin(kept.val[kept.val_y == 1]), 0.1, method="lower")
    assert (head.margin(site) < np.log(0.6 / 0.4)).mean() > (plain.margin(site) < cut_plain).mean() + 0.2
    assert head.weight[1] < -0.3 < plain.weight[1] + 0.3  # it learnt that the site's look is not COVID-19
    # Kept beside the weights, checked against model.json's hash, and refused when there is none.
    sha = kept.save(tmp_path)
    back = HeadFeatures.load(tmp_path, {"head_refit": {"features_sha256": sha}})
    assert np.allclose(back.train, kept.train, atol=2e-3) and (back.val_y == kept.val_y).all()
    with pytest.raises(DataError, match="keeps no head features.*covidxray refit-head"):
        HeadFeatures.load(tmp_path, {})
    (tmp_path / FEATURES_FILE).write_bytes(b"x" + (tmp_path / FEATURES_FILE).read_bytes()[1:])
    with pytest.raises(CheckpointError, match="training features do not match model.json .SHA-256 differs"):
        HeadFeatures.load(tmp_path, {"head_refit": {"features_sha256": sha}})


@pytest.mark.parametrize("head", [{"weight": [1.0, float("nan")], "bias": 0.0}, {"weight": [1e308, -1e308], "bias": 0.0},
                                  {"weight": ["a"], "bias": 0.0}, {"weight": [1.0], "bias": "x"}, {"weight": [[1.0], [2.0, 3.0]]},
                                  {"weight": []}, [1.0, 2.0], "x"])
def test_a_profile_refuses_a_head_it_cannot_use(head, tmp_path: Path):
    with pytest.raises(DataError, match="site bad: its head needs a list of weights and a bias, finite and at most"):
        SiteProfile("bad", 0.6, 0.95, "r", "ab" * 32, head=head)
    # From a profile file (hand-edited): the error names the file.
    (tmp_path / "bad.json").write_text(json.dumps({"format": "covidxray-site-1", "name": "bad", "threshold": 0.6,
                                                   "target_specificity": 0.95, "rule": "r", "weights_sha256": "ab" * 32,
                                                   "head": head}))
    with pytest.raises(DataError, match=r"bad\.json: not a usable site profile"):
        SiteRegistry(tmp_path).load("bad")


def test_a_site_head_needs_the_features_and_a_profile_checks_its_head():
    profile = SiteProfile("ok", 0.6, 0.95, "r", "ab" * 32, head={"weight": [1.0, -1.0], "bias": 0.5})
    assert profile.probability(np.array([1.0, 1.0])) == pytest.approx(1 / (1 + np.exp(-0.5)))
    with pytest.raises(CheckpointError, match="its head takes 2 features, the model gives 3"):
        profile.probability(np.zeros(3))


@pytest.fixture(scope="module")
def jsrt_normals(data_root: Path) -> tuple[list[Path], list[Path]]:
    films = sorted((data_root.parent / "jsrt" / "images" / "normal").glob("*.jpg"))
    return films[:60], films[60:]


@pytest.fixture(scope="module")
def onboarded(tmp_path_factory: pytest.TempPathFactory, jsrt_normals) -> tuple[Path, SiteProfile, SiteProfile]:
    """The same 60 films onboard ``jsrt-head`` (--refit-head) and ``jsrt-plain`` (threshold only), target 0.95."""
    folder = tmp_path_factory.mktemp("site-films")
    for p in jsrt_normals[0]:
        (folder / p.name).symlink_to(p)
    registry = tmp_path_factory.mktemp("registry")
    assert main(["site", "add", "jsrt-head", "--normals", str(folder), "--sites", str(registry), "--refit-head"]) == 0
    assert main(["site", "add", "jsrt-plain", "--normals", str(folder), "--sites", str(registry), "--no-validation"]) == 0
    return registry, SiteRegistry(registry).load("jsrt-head"), SiteRegistry(registry).load("jsrt-plain")


def _predict(films: list[Path], registry: Path, site: str | None, capsys, *extra: str) -> list[dict]:
    args = ["predict", *map(str, films), "--format", "json", "--sites", str(registry), *extra]
    assert main(args + (["--site", site] if site else [])) in (0, 3)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_site_add_refit_head_stores_a_head_and_measures_it(onboarded):
    _, head, plain = onboarded
    predictor = Predictor(backend="torch")
    normals = head.cost["site_normals"]
    assert head.head is not None and len(head.head["weight"]) == predictor.familiarity.mean.shape[-1]
    assert head.head["site_films"] == 60 and plain.head is None
    assert head.threshold >= predictor.threshold and "site's own head" in head.rule
    # Held out (each fifth under a head fitted without it) is the honest number; the onboarding films flatter it.
    assert 0.75 <= normals["specificity_held_out"]["value"] <= normals["specificity_after"]["value"]
    # The validation numbers come from the features the model keeps: no training data is needed for them.
    val = head.cost["validation"]
    assert val["films"] > 1000 and val["after"]["sensitivity"]["value"] >= 0.85


def test_the_site_head_decides_its_films_on_the_cli_and_the_api(onboarded, jsrt_normals, capsys):
    registry, head, plain = onboarded
    held = jsrt_normals[1]
    at_head = _predict(held, registry, "jsrt-head", capsys)
    at_plain = _predict(held, registry, "jsrt-plain", capsys)
    default = _predict(held, registry, None, capsys)
    spec = {name: np.mean([a["label"] == "normal" for a in rows if a["label"] != "not_answered"])
            for name, rows in (("head", at_head), ("plain", at_plain), ("default", default))}
    # The 32 films never used to onboard: the site's head calls more of them normal than the model's threshold does.
    assert spec["head"] >= 0.8 and spec["head"] > spec["default"]
    assert {(a["site"], a["threshold"]) for a in at_head} == {("jsrt-head", head.threshold)}
    # The answer says whose head gave its probability; a threshold-only site's answers need no note.
    assert {a["note"] for a in at_head} == {f"decided by site jsrt-head's own head, refitted on {head.head['site_films']} of its normal films"}
    assert {a["note"] for a in at_plain} == {None}
    assert any(abs(a["probability"] - b["probability"]) > 0.01 for a, b in zip(at_head, default) if a["probability"])
    assert "features" not in at_head[0]
    # The API: the same film, the same site head, the same answer as the command line (the bundled int8 graph both).
    with TestClient(create_app(sites=registry)) as client:
        answer = client.post("/v1/predict?site=jsrt-head", files={"file": ("a.jpg", held[0].read_bytes())}).json()
    assert (answer["site"], answer["label"], answer["note"]) == ("jsrt-head", at_head[0]["label"], at_head[0]["note"])
    assert answer["probability"] == pytest.approx(at_head[0]["probability"], abs=1e-4)


def test_an_int8_graph_rechecks_films_near_the_site_heads_threshold(onboarded, jsrt_normals):
    _, head, _ = onboarded
    served, exact = Predictor(), Predictor(backend="torch")
    assert isinstance(served.runner, CascadeRunner)
    served.watch_sites([head])
    assert len(served.runner.heads) == 1 and head.threshold in served.runner.thresholds
    served.watch_sites([head])  # watched once, however often asked
    assert len(served.runner.heads) == 1
    films = jsrt_normals[1]
    fast = [served.at_site(a, head) for a in served.predict_paths(films)]
    slow = [exact.at_site(a, head) for a in exact.predict_paths(films)]
    assert sum(a.label != b.label for a, b in zip(fast, slow)) <= 1
    # A graph without features cannot serve a site with a head: said, not guessed.
    bare = fast[0].__class__(**{**fast[0].to_dict(), "features": None})
    with pytest.raises(CheckpointError, match="site jsrt-head decides with a head of its own.*gave none"):
        served.at_site(bare, head)


def test_site_add_refit_head_with_few_films_and_without_kept_features(jsrt_normals, trained_run: Path, tmp_path: Path,
                                                                        capsys):
    folder = tmp_path / "films"
    folder.mkdir()
    for p in jsrt_normals[1][:22]:
        (folder / p.name).symlink_to(p)
    registry = tmp_path / "registry"
    # 22 films set a threshold, but four fifths of them (17) cannot: no held-out number, and the summary says so.
    assert main(["site", "add", "small", "--normals", str(folder), "--sites", str(registry), "--refit-head",
                 "--no-validation"]) == 0
    assert "held-out specificity not measured (25 films or more needed)" in capsys.readouterr().out
    profile = SiteRegistry(registry).load("small")
    assert profile.head["site_films"] == 22 and "specificity_held_out" not in profile.cost["site_normals"]
    # A model whose head was never refitted keeps no features: refused before a film is scored.
    assert main(["site", "add", "other", "--normals", str(folder), "--sites", str(registry), "--refit-head",
                 "--model", str(trained_run)]) == 2
    assert "keeps no head features" in capsys.readouterr().err and not (registry / "other.json").exists()


def test_the_listener_decides_a_matched_sites_film_with_its_head(onboarded, jsrt_normals, tmp_path: Path):
    _, head, _ = onboarded
    registry = SiteRegistry(tmp_path / "sites")
    registry.save(replace(head, institutions=("Head Hospital",)))
    film = dicoms.xray_pixels(jsrt_normals[1][1], 256)
    ours, other = dicoms.cr(film, InstitutionName="HEAD hospital"), dicoms.cr(film, InstitutionName="Elsewhere")
    predictor = Predictor()
    listener = Listener(ListenerConfig(db=str(tmp_path / "r.db"), port=0, sites=str(registry.folder)), predictor=predictor).start()
    try:
        assert send_datasets([ours, other], Destination("COVIDXRAY", "127.0.0.1", listener.port), "ANY-CR") == [0, 0]
        assert listener.wait_idle(120)
        rows = {r.sop_instance_uid: r for r in listener.store.recent()}
    finally:
        listener.stop()
    mine, theirs = rows[ours.SOPInstanceUID], rows[other.SOPInstanceUID]
    assert (mine.site, mine.threshold, theirs.site, theirs.threshold) == ("jsrt-head", head.threshold, None, predictor.threshold)
    # The database and the structured report say the site's own head gave the probability.
    assert (mine.site_decision, theirs.site_decision) == ("head", None)
    text = next(i.TextValue for i in build_report(ours, mine).ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "site")
    assert text == f"jsrt-head: P(COVID-19) from the site's own head (refitted on its normal films), decided at the site's own threshold {head.threshold:.4f}"
    # The same pixels: the site's head gives its own P(COVID-19), the model's head another.
    assert abs(mine.probability - theirs.probability) > 1e-3
    assert mine.label == ("covid" if mine.probability >= head.threshold else "normal")


def test_a_head_for_other_features_is_refused_before_any_film_meets_it(onboarded, jsrt_normals, tmp_path: Path):
    """A hand-edited profile whose head takes 3 features: the API answers 500 for that site and keeps serving the
    others (its head never reaches the int8 graph's re-check); the listener does not start, naming the site."""
    _, head, _ = onboarded
    registry = SiteRegistry(tmp_path / "sites")
    registry.save(head)
    registry.save(replace(head, name="edited", head={**head.head, "weight": [0.1, 0.2, 0.3]}, institutions=("Edited",)))
    data = jsrt_normals[1][2].read_bytes()
    with TestClient(create_app(sites=registry.folder)) as client:
        edited = client.post("/v1/predict?site=edited", files={"file": ("a.jpg", data)})
        ours = client.post("/v1/predict?site=jsrt-head", files={"file": ("a.jpg", data)})
        plain = client.post("/v1/predict", files={"file": ("a.jpg", data)})
    assert edited.status_code == 500 and edited.json()["error"]["code"] == "broken_site_profile"
    assert (ours.status_code, ours.json()["site"], plain.status_code) == (200, "jsrt-head", 200)
    predictor = Predictor()
    assert predictor.feature_count == len(head.head["weight"])
    listener = Listener(ListenerConfig(db=str(tmp_path / "r.db"), port=0, sites=str(registry.folder)), predictor=predictor)
    try:
        with pytest.raises(DataError, match="site edited: its head takes 3 features, the model .* gives 1280"):
            listener.start()
    finally:
        listener.store.close()
