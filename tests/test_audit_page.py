"""The page's Audit view in a real headless Chromium (Debian's `chromium` and `chromium-driver`, as tests/test_page.py
drives it) against a real `python -m service` whose allow-list names a real KServe ModelServer upstream (the shipped
classifier A): load the targets with a key, start an audit, watch its progress, read its report (every figure the
view shows is the API's own for the same audit), and cancel another. Screenshots: runs/page/<test>.png.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from browser import skip_without_chromium
from conftest import MODELS, ROOT
from procs import Proc, free_port
from servers import Server

skip_without_chromium()
pytest.importorskip("kserve", reason="needs the [test] extra: kserve")
pytest.importorskip("torchattacks", reason="needs torchattacks (scripts/setup.sh --dev)")

from selenium import webdriver  # noqa: E402 - after the skip: only needed with a browser
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ARTIFACTS = ROOT / "runs" / "page"
KEY = "audit-page-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A KServe upstream and the service auditing it (audits keyed)."""
    logs = tmp_path_factory.mktemp("audit-page-logs")
    port = free_port()
    up = Proc([sys.executable, "tests/upstreams.py", "kserve", "--port", str(port), "--onnx",
               str(MODELS / "mnist" / "classifier_A.onnx")], logs / "kserve.log", {"OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        up.wait_http(f"http://127.0.0.1:{port}/v2/health/ready")
        upstreams = {"user-model": {"url": f"http://127.0.0.1:{port}", "model": "mnist-nchw", "timeout_s": 60}}
        with Server.running(MODELS, True, MG_WARM_UP="false", MG_DRAIN_S="1", MG_MAX_WAIT_MS="5",
                            MG_FAST_WAIT_MS="1", MG_PROXY__UPSTREAMS=json.dumps(upstreams),
                            MG_AUDIT__API_KEYS=json.dumps([KEY]),
                            MG_AUDIT__REPORTS_DIR=str(tmp_path_factory.mktemp("reports"))) as srv:  # fmt: skip
            yield srv
    finally:
        up.stop()


@pytest.fixture
def page(browser: webdriver.Chrome, server: Server, request: pytest.FixtureRequest) -> Iterator[webdriver.Chrome]:
    """The page loaded, the key typed and the targets loaded; a screenshot after the test, pass or fail."""
    browser.get_log("browser")
    browser.get(server.url + "/")
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")
    browser.find_element(By.ID, "audit-key").send_keys(KEY)
    browser.find_element(By.ID, "audit-load").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "audit-start").is_enabled())
    yield browser
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    w, h = browser.execute_script("const e = document.documentElement; return [e.scrollWidth, e.scrollHeight]")
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                               "clip": {"x": 0, "y": 0, "width": w, "height": h,
                                                                        "scale": 1}})  # fmt: skip
    (ARTIFACTS / f"{request.node.name}.png").write_bytes(base64.b64decode(shot["data"]))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors  # no script error, no CSP violation


def fill(d: webdriver.Chrome, **values: str) -> None:
    for name, value in values.items():
        el = d.find_element(By.ID, f"audit-{name}")
        el.clear()
        if value:
            el.send_keys(value)


def status(d: webdriver.Chrome) -> str:
    return d.find_element(By.ID, "audit-panel").get_attribute("data-status") or ""


def test_the_audit_view_starts_shows_progress_and_the_report(page: webdriver.Chrome, server: Server) -> None:
    assert [o.text for o in Select(page.find_element(By.ID, "audit-target")).options] == ["user-model"]
    fill(page, n="8", queries="40", seeds="20", rounds="1", linf="0.3", l2="", steps="4", restarts="1")
    page.find_element(By.ID, "audit-start").click()
    WebDriverWait(page, 30).until(lambda d: status(d) in ("queued", "running", "done"))
    seen = set()

    def finished(d: webdriver.Chrome) -> bool:
        seen.add((status(d), d.find_element(By.ID, "audit-progress").get_attribute("value")))
        return status(d) in ("done", "failed", "cancelled")

    WebDriverWait(page, 300, poll_frequency=0.2).until(finished)
    assert status(page) == "done", page.find_element(By.ID, "audit-error").text
    assert any(s == "running" and v not in ("0", None) for s, v in seen), seen  # progress was shown on the way
    job = page.find_element(By.ID, "audit-panel").get_attribute("data-audit")
    rep = httpx.get(f"{server.url}/v1/audits/{job}", headers={"X-API-Key": KEY}, timeout=30).json()["report"]
    rows = [[c.text for c in tr.find_elements(By.TAG_NAME, "td")]
            for tr in page.find_elements(By.CSS_SELECTOR, "#audit-worst tbody tr")]  # fmt: skip
    want = [[f"L∞ {w['eps']:g}", w["variant"], w["worst_attack"]] for w in rep["worst"]]
    assert [[r[0], r[1], r[4]] for r in rows] == want
    for r, w in zip(rows, rep["worst"], strict=True):
        assert r[3] == f"{w['accuracy']:.3f} [{w['ci'][0]:.3f}, {w['ci'][1]:.3f}] (n={w['n']})"
    gains = [
        tr.find_elements(By.TAG_NAME, "td")[5].text
        for tr in page.find_elements(By.CSS_SELECTOR, "#audit-gain tbody tr")
    ]
    assert gains == [f"{g['gain']:+.3f}" for g in rep["gain"]]
    assert "HopSkipJump" in page.find_element(By.ID, "audit-not-run").text
    plots = page.find_elements(By.CSS_SELECTOR, "#audit-report img")
    assert plots and all(page.execute_script("return arguments[0].naturalWidth", p) > 0 for p in plots)


def test_the_audit_view_cancels_an_audit(page: webdriver.Chrome) -> None:
    fill(page, n="30", queries="2000", seeds="30", rounds="2", linf="0.3", l2="2", steps="4", restarts="1")
    page.find_element(By.ID, "audit-start").click()
    WebDriverWait(page, 60, poll_frequency=0.2).until(
        lambda d: status(d) == "running" and int(d.find_element(By.ID, "audit-progress").get_attribute("value")) >= 1
    )
    cancel = page.find_element(By.ID, "audit-cancel")
    assert cancel.is_displayed()
    t0 = time.monotonic()
    cancel.click()
    WebDriverWait(page, 10, poll_frequency=0.1).until(lambda d: status(d) == "cancelled")
    assert time.monotonic() - t0 < 5
    assert not page.find_element(By.ID, "audit-cancel").is_displayed()
    assert page.find_element(By.ID, "audit-start").is_enabled()  # the view is ready for the next audit
