"""End to end: `covidxray serve` in a subprocess, the web page in Debian's headless Chromium (Playwright).

The browser is the system's /usr/bin/chromium (``make test`` installs it); Playwright's own browser
downloads are never used. Set ``COVIDXRAY_SCREENSHOT=path.png`` to keep a screenshot of the result.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

import dicoms
from processes import free_port

from covidxray.explain import overlay_png
from covidxray.predictor import Predictor
from covidxray.results import ResultRow, open_results

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
READY_TIMEOUT_S = 180  # loading the model while other work shares two cores


@pytest.fixture(scope="module")
def results_db(tmp_path_factory: pytest.TempPathFactory, covid_xray: Path) -> Path:
    """A results database as `covidxray listen --heatmaps` leaves it: an answer with a heat map, a refusal, an error."""
    path = tmp_path_factory.mktemp("results") / "results.db"
    image = np.asarray(Image.open(covid_xray).convert("L").resize((256, 256)), dtype=np.float32) / 255
    cam = np.outer(np.hanning(256), np.hanning(256)).astype(np.float32)
    base = {"series_instance_uid": "1.2.9", "modality": "CR", "threshold": 0.2, "model": "tf_efficientnet_lite0@192px",
            "weights_sha256": "ab" * 32}
    rows = [ResultRow(sop_instance_uid=f"1.2.8.{i}", study_instance_uid=f"1.2.7.{i}", received_at=f"2024-03-01T10:0{i}:00.000+00:00",
                      classified_at=f"2024-03-01T10:0{i}:01.000+00:00", **{**base, **extra})
            for i, extra in enumerate([{"label": "covid", "probability": 0.9731},
                                       {"label": "not_answered", "reason": "wrong_modality", "modality": "CT"},
                                       {"label": "error", "reason": "no_pixel_data"}])]
    store = open_results(path)
    store.record(rows, {"1.2.8.0": overlay_png(image, cam)})
    store.close()
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, results_db: Path) -> Iterator[str]:
    """Base URL of a real uvicorn server on the bundled model, on a free loopback port, with a results database."""
    port = free_port()
    log_file = tmp_path_factory.mktemp("server") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "COVIDXRAY_API_KEY"}
    with open(log_file, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "covidxray", "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--db", str(results_db)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"covidxray serve exited with {proc.returncode}:\n{log_file.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server was not ready within {READY_TIMEOUT_S} s:\n{log_file.read_text()}")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"Debian's Chromium is missing ({CHROMIUM}); install it with `make systemdeps` "
                    "(`make test` does it) or `apt-get install chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, server: str):
    """A fresh page on the server; fails the test on any console error or request to another origin."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    pg = context.new_page()
    problems: list[str] = []
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:")) else problems.append(f"request to {r.url}"))
    pg.goto(server + "/")
    yield pg
    context.close()
    assert not [p for p in problems if "status of 4" not in p], problems  # 4xx answers to bad uploads are expected


@pytest.fixture(scope="module")
def covid_xray(manifest: Path) -> Path:
    with open(manifest, newline="") as f:
        return next(manifest.parent / r["path"] for r in csv.DictReader(f) if r["label"] == "covid")


def _wait_for_answer(page) -> None:
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    page.wait_for_function("() => { const i = document.getElementById('heatmap'); return i.complete && i.naturalWidth > 0; }",
                           timeout=10_000)


def _natural_width(page, selector: str) -> int:
    return page.eval_on_selector(selector, "img => img.complete ? img.naturalWidth : 0")


def test_upload_shows_answer_heatmap_and_disclaimer(page, covid_xray: Path, tmp_path: Path):
    bundled = Predictor()
    expected = bundled.predict_path(covid_xray)
    page.wait_for_function("() => !document.getElementById('model-name').textContent.includes('loading')")
    assert bundled.meta["arch"] in page.inner_text("#model-name")  # the served model names itself
    assert "not a diagnosis" in page.inner_text("#disclaimer")

    page.set_input_files("#file", str(covid_xray))
    _wait_for_answer(page)
    assert page.inner_text("#result-label") == ("COVID-19 positive" if expected.label == "covid" else "COVID-19 negative")
    assert float(page.inner_text("#probability")) == pytest.approx(expected.probability, abs=1e-4)
    assert float(page.inner_text("#threshold")) == pytest.approx(expected.threshold, abs=1e-4)
    assert "site not onboarded" in page.inner_text("#site-used")  # no site typed: the model's default threshold
    assert page.is_visible("#heatmap") and not page.is_visible("#xray")
    assert _natural_width(page, "#heatmap") > 0

    page.click("#heatmap-toggle")  # off: the plain X-ray
    assert page.is_visible("#xray") and not page.is_visible("#heatmap")
    assert _natural_width(page, "#xray") > 0
    page.click("#heatmap-toggle")  # on again, for the screenshot
    assert page.is_visible("#heatmap")

    shot = tmp_path / "web.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] > 0
    if os.environ.get("COVIDXRAY_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["COVIDXRAY_SCREENSHOT"])


def test_dicom_is_previewed_by_the_server(page, covid_xray: Path, tmp_path: Path):
    pixels = np.asarray(Image.open(covid_xray).convert("L"), dtype=np.uint16) * 257
    path = dicoms.write(tmp_path / "chest.dcm", dicoms.dx(pixels, bits=16, PatientName="Doe^Jane"))

    page.set_input_files("#file", str(path))
    _wait_for_answer(page)
    assert page.inner_text("#result-label").startswith("COVID-19 ")
    page.click("#heatmap-toggle")
    assert _natural_width(page, "#xray") > 0  # the browser cannot decode DICOM: this is the server's PNG
    assert "Doe" not in page.inner_text("body")  # the text; the base64 PNGs could hold any short string


def test_not_a_chest_xray_gets_a_neutral_no_answer(page, data_root: Path):
    ct = sorted((data_root.parent / "not-frontal-cxr" / "images" / "ct").glob("*.jpg"))[-1]
    page.set_input_files("#file", str(ct))
    page.wait_for_selector("#result:not([hidden])", timeout=60_000)
    label = page.locator("#result-label")
    assert label.inner_text().startswith("No answer: ") and "chest" in label.inner_text()
    assert label.get_attribute("class") == "label none"  # grey, neither the red of a positive nor the green of a negative
    assert not page.is_visible("#scores") and not page.is_visible("#heatmap-control") and not page.is_visible("#heatmap")
    assert page.is_visible("#xray") and _natural_width(page, "#xray") > 0  # the picture itself, so the user sees why


def test_bad_file_shows_an_error_naming_it(page, tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_text("not an X-ray")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert "notes.txt" in page.inner_text("#error")
    assert not page.is_visible("#result")



def test_results_list_shows_what_the_listener_recorded(page):
    page.wait_for_selector("#results-list:not([hidden])", timeout=30_000)
    rows = page.locator("#results-rows tr")
    assert rows.count() == 3
    texts = [rows.nth(i).inner_text() for i in range(3)]  # newest first
    assert "2024-03-01 10:02:00" in texts[0] and "not readable: no_pixel_data" in texts[0]
    assert "not answered: wrong_modality" in texts[1] and "—" in texts[1]
    assert "COVID-19 positive" in texts[2] and "0.9731" in texts[2] and "2024-03-01 10:00:00" in texts[2]
    assert rows.nth(0).locator("button").count() == 0  # a heat map link only where one was stored
    rows.nth(2).locator("button.heatmap-link").click()
    page.wait_for_selector("#results-figure:not([hidden])", timeout=10_000)
    page.wait_for_function("() => { const i = document.getElementById('results-heatmap'); return i.complete && i.naturalWidth > 0; }",
                           timeout=10_000)
    assert _natural_width(page, "#results-heatmap") == 256
