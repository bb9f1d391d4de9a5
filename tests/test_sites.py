"""Site profiles (`covidxray.sites`, ``covidxray site``): a hospital onboarded on its own normal films, the model untouched.

JSRT's normal films stand in for a new hospital the bundled model never saw: 60 of them onboard
the site, the other 32 check what that bought. The films go through ``predict --site``, the API's
``site`` parameter and the DICOM listener (matched by InstitutionName or the calling AE title).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import dicoms
from covidxray.cli import main
from covidxray.dicomnode import Listener, ListenerConfig
from covidxray.dicomnode.sr import Destination, build_report, send_datasets
from covidxray.errors import CheckpointError, DataError
from covidxray.predictor import Predictor
from covidxray.server import create_app
from covidxray.sites import MIN_NORMALS, NOT_ONBOARDED, SiteMatcher, SiteProfile, SiteRegistry, site_threshold

INSTITUTION = "St Elsewhere General"


@pytest.fixture(scope="module")
def predictor(one_torch_thread) -> Predictor:
    return Predictor()


@pytest.fixture(scope="module")
def jsrt_normals(data_root: Path) -> tuple[list[Path], list[Path]]:
    """(60 films that onboard the site, the 32 held out); sorted, so the same on every machine."""
    films = sorted((data_root.parent / "jsrt" / "images" / "normal").glob("*.jpg"))
    assert len(films) >= 90
    return films[:60], films[60:]


@pytest.fixture(scope="module")
def onboarded(tmp_path_factory: pytest.TempPathFactory, jsrt_normals) -> tuple[Path, SiteProfile]:
    """``covidxray site add jsrt-site`` with the bundled model (the site's films only: --no-validation), target 0.99."""
    folder = tmp_path_factory.mktemp("site-films")
    for p in jsrt_normals[0]:
        (folder / p.name).symlink_to(p)
    registry = tmp_path_factory.mktemp("registry")
    assert main(["site", "add", "jsrt-site", "--normals", str(folder), "--sites", str(registry), "--target-specificity",
                 "0.99", "--institution", INSTITUTION, "--ae", "JSRT-CR1", "--no-validation"]) == 0
    return registry, SiteRegistry(registry).load("jsrt-site")


def test_threshold_rule_counts_films_and_keeps_a_floor():
    probs = np.linspace(0.01, 0.60, 40)
    t = site_threshold(probs, 0.95)
    assert (probs < t).mean() >= 0.95 and (probs < np.nextafter(probs[37], -1)).mean() < 0.95  # the lowest that does
    assert site_threshold(probs, 0.95, floor=0.8) == 0.8  # a site never gets a laxer threshold unless it asks
    with pytest.raises(DataError, match=f"19 answered normal films; at least {MIN_NORMALS}"):
        site_threshold(probs[:19], 0.95)
    with pytest.raises(DataError, match=r"target specificity must be in \[0.5, 1\)"):
        site_threshold(probs, 1.0)


def test_registry_round_trip_match_and_refusals(tmp_path: Path):
    registry = SiteRegistry(tmp_path / "sites")
    a = SiteProfile("north", 0.8, 0.95, "a rule", "ab" * 32, institutions=("North  Hospital",), stations=("CR-7",))
    b = SiteProfile("south", 0.7, 0.95, "a rule", "ab" * 32, ae_titles=("SOUTH_CR",))
    path = registry.save(a)
    registry.save(b)
    assert path == tmp_path / "sites" / "north.json" and json.loads(path.read_text())["format"] == "covidxray-site-1"
    assert registry.get("north", "ab" * 32) == a and registry.names() == ["north", "south"]
    matcher = SiteMatcher(registry.all("ab" * 32))
    assert matcher.match(institution="  north hospital ") == a and matcher.match(station="cr-7") == a
    assert matcher.match(institution="Elsewhere", calling_ae="south_cr") == b and matcher.match(institution="x") is None
    with pytest.raises(CheckpointError, match=r"north\.json: this site profile was made for the model with weights"):
        registry.get("north", "cd" * 32)
    with pytest.raises(DataError, match=r"no site 'east' in .*onboarded sites: north, south.*site add east"):
        registry.load("east")
    with pytest.raises(DataError, match="site name 'East Wing'"):
        registry.path("East Wing")
    with pytest.raises(DataError, match="sites north and west both claim the institution"):
        SiteMatcher([a, SiteProfile("west", 0.7, 0.95, "r", "ab" * 32, institutions=("NORTH HOSPITAL",))])
    (tmp_path / "sites" / "broken.json").write_text("{")
    with pytest.raises(DataError, match=r"broken\.json: not a readable site profile"):
        registry.load("broken")
    (tmp_path / "sites" / "copy.json").write_text((tmp_path / "sites" / "north.json").read_text())
    with pytest.raises(DataError, match=r"copy\.json: holds the profile of site 'north', not 'copy'"):
        registry.load("copy")


def test_site_add_refuses_a_header_value_another_site_claims(tmp_path: Path, jsrt_normals, capsys):
    """Two sites claiming one InstitutionName would stop every listener start: ``site add`` refuses it at once."""
    registry = SiteRegistry(tmp_path / "sites")
    registry.save(SiteProfile("north", 0.8, 0.95, "a rule", "ab" * 32, institutions=("North Hospital",)))
    films = tmp_path / "films"
    films.mkdir()
    (films / jsrt_normals[1][0].name).symlink_to(jsrt_normals[1][0])  # one film: refused before any is scored
    assert main(["site", "add", "south", "--normals", str(films), "--sites", str(registry.folder),
                 "--institution", "NORTH  hospital", "--no-validation"]) == 2
    assert "sites north and south both claim the institution 'NORTH  hospital'" in capsys.readouterr().err
    assert registry.names() == ["north"]


def test_site_add_moves_the_threshold_and_held_out_normals_gain(onboarded, jsrt_normals, predictor: Predictor):
    _, profile = onboarded
    cost = profile.cost["site_normals"]
    assert profile.weights_sha256 == predictor.meta["weights_sha256"] and profile.default_threshold == predictor.threshold
    assert profile.threshold > predictor.threshold and cost["answered"] == 60
    assert cost["specificity_after"]["value"] >= 0.99 > cost["specificity_before"]["value"]
    assert profile.institutions == (INSTITUTION,) and profile.ae_titles == ("JSRT-CR1",) and "skipped" in profile.cost["validation"]
    held = [a for a in predictor.predict_paths(jsrt_normals[1]) if a.answered]
    p = np.array([a.probability for a in held])
    # The other 32 films of the site, never used to set the threshold, are called normal more often (not fewer).
    assert (p < profile.threshold).mean() >= (p < predictor.threshold).mean() and (p < profile.threshold).mean() >= 0.9


def test_site_add_refuses_too_few_films_and_an_existing_name(onboarded, jsrt_normals, tmp_path: Path, capsys):
    registry, _ = onboarded
    few = tmp_path / "few"
    few.mkdir()
    for p in jsrt_normals[1][:10]:
        (few / p.name).symlink_to(p)
    assert main(["site", "add", "tiny", "--normals", str(few), "--sites", str(registry), "--no-validation"]) == 2
    assert f"{few}: 10 answered normal films; at least 20" in capsys.readouterr().err
    # A bad target is refused before the films are scored (else the 10 films would be the complaint).
    assert main(["site", "add", "tiny", "--normals", str(few), "--sites", str(registry), "--no-validation",
                 "--target-specificity", "1"]) == 2
    assert "the target specificity must be in [0.5, 1), got 1.0" in capsys.readouterr().err
    assert main(["site", "add", "jsrt-site", "--normals", str(few), "--sites", str(registry)]) == 2
    assert "already onboarded; pass --replace" in capsys.readouterr().err
    assert main(["site", "list", "--sites", str(registry)]) == 0 and capsys.readouterr().out.startswith("jsrt-site\tthreshold")


def test_predict_with_site_uses_its_threshold_and_without_says_not_onboarded(onboarded, jsrt_normals, capsys):
    registry, profile = onboarded
    films = [str(p) for p in jsrt_normals[1]]
    assert main(["predict", *films, "--format", "json", "--sites", str(registry), "--site", "jsrt-site"]) in (0, 3)
    at_site = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["predict", *films, "--format", "json", "--sites", str(registry)]) in (0, 3)
    default = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(a["site"], a["site_onboarded"], a["threshold"], a["note"]) for a in at_site} == {("jsrt-site", True, profile.threshold, None)}
    assert {(a["site"], a["site_onboarded"], a["note"]) for a in default} == {(None, False, NOT_ONBOARDED)}
    flipped = {(a["label"], b["label"]) for a, b in zip(at_site, default, strict=True) if a["label"] != b["label"]}
    assert flipped == {("normal", "covid")}  # the stricter site threshold turns some false alarms into normals
    assert main(["predict", films[0], "--sites", str(registry), "--site", "nowhere"]) == 2
    assert "no site 'nowhere'" in capsys.readouterr().err


def test_api_site_parameter(onboarded, jsrt_normals, predictor: Predictor):
    registry, profile = onboarded
    with TestClient(create_app(predictor=predictor, sites=registry)) as client:
        data = jsrt_normals[1][0].read_bytes()
        at_site = client.post("/v1/predict?site=jsrt-site", files={"file": ("a.jpg", data)}).json()
        plain = client.post("/v1/predict", files={"file": ("a.jpg", data)}).json()
        unknown = client.post("/v1/predict?site=nowhere", files={"file": ("a.jpg", data)})
        batch = client.post("/v1/predict/batch?site=jsrt-site", files=[("files", ("a.jpg", data))]).json()
        (registry / "broken.json").write_text("{")  # the server's fault, not the request's
        broken = client.post("/v1/predict?site=broken", files={"file": ("a.jpg", data)})
        (registry / "broken.json").unlink()
    assert (at_site["site"], at_site["site_onboarded"], at_site["threshold"]) == ("jsrt-site", True, profile.threshold)
    assert "note" not in at_site and at_site["probability"] == pytest.approx(plain["probability"])
    assert (plain.get("site"), plain["site_onboarded"], plain["threshold"], plain["note"]) == (
        None, False, predictor.threshold, NOT_ONBOARDED)
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_site"
    assert batch["results"][0]["site"] == "jsrt-site"
    assert broken.status_code == 500 and broken.json()["error"]["code"] == "broken_site_profile"


def test_listener_picks_the_site_by_institution_or_calling_ae(onboarded, jsrt_normals, predictor: Predictor, tmp_path: Path):
    registry, profile = onboarded
    film = dicoms.xray_pixels(jsrt_normals[1][0], 256)
    by_name = dicoms.cr(film, InstitutionName="  st elsewhere   GENERAL ")
    by_ae, nowhere = dicoms.cr(film), dicoms.cr(film, InstitutionName="Another Hospital")
    listener = Listener(ListenerConfig(db=str(tmp_path / "r.db"), port=0, sites=str(registry)), predictor=predictor).start()
    try:
        to = Destination("COVIDXRAY", "127.0.0.1", listener.port)
        assert send_datasets([by_name, nowhere], to, "OTHER-CR") == [0, 0]
        assert send_datasets([by_ae], to, "JSRT-CR1") == [0]
        assert listener.wait_idle(120)
        rows = {r.sop_instance_uid: r for r in listener.store.recent()}
    finally:
        listener.stop()
    for ds, site, threshold in ((by_name, "jsrt-site", profile.threshold), (by_ae, "jsrt-site", profile.threshold),
                                (nowhere, None, predictor.threshold)):
        row = rows[ds.SOPInstanceUID]
        assert (row.site, row.threshold, row.site_decision) == (site, threshold, "threshold" if site else None)
        text = next(i.TextValue for i in build_report(ds, row).ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "site")
        assert text.startswith("jsrt-site: decided at the site's own threshold" if site else "site not onboarded")


def test_a_profile_for_other_weights_stops_the_listener(onboarded, predictor: Predictor, tmp_path: Path):
    _, profile = onboarded
    registry = SiteRegistry(tmp_path / "sites")
    registry.save(replace(profile, name="stale", weights_sha256="cd" * 32, institutions=("Old Wing",), ae_titles=()))
    listener = Listener(ListenerConfig(db=str(tmp_path / "r.db"), port=0, sites=str(registry.folder)), predictor=predictor)
    try:
        with pytest.raises(CheckpointError, match=r"stale\.json: this site profile was made for the model with weights"):
            listener.start()
    finally:
        listener.store.close()


def test_site_add_measures_the_cost_on_the_models_validation_split(trained_run: Path, jsrt_normals, cache_dir: Path):
    """With the training data at hand, the cost in sensitivity is also measured where the model's threshold was chosen."""
    from covidxray.onboarding import onboard_site

    profile = onboard_site("val-site", jsrt_normals[0][0].parent, target_specificity=0.9, model=trained_run,
                           allow_lower=True, cache_dir=str(cache_dir))
    val = profile.cost["validation"]
    assert val["films"] > 1000 and val["covid"] > 0
    for when in ("before", "after"):
        assert {"sensitivity", "specificity"} <= set(val[when])
        assert val[when]["sensitivity"]["ci_low"] <= val[when]["sensitivity"]["value"] <= val[when]["sensitivity"]["ci_high"]
    # Stricter threshold, fewer COVID-19 calls on validation; laxer, more (allow_lower lets it go either way).
    moved = np.sign(profile.threshold - profile.default_threshold)
    assert np.sign(val["before"]["sensitivity"]["value"] - val["after"]["sensitivity"]["value"]) in (moved, 0)
    assert profile.cost["site_normals"]["specificity_after"]["value"] >= 0.9 and profile.model.endswith("@96px")
