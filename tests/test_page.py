"""The page at GET / in a real headless Chromium (Debian's `chromium` and `chromium-driver`, driven by selenium with
the system driver: no browser download), against a real `python -m service` on a loopback port (the Server of
tests/test_e2e_http.py, on the shipped models, attacks enabled with a key). Every answer the page shows is checked
against the API's own answer for the same image, parameters and seed. Screenshots (the whole page, after each test,
pass or fail): runs/page/<test>.png; docs/img/page.png is test_attack_panel_shows_the_api_answer.png.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from browser import skip_without_chromium
from conftest import MODELS, ROOT
from PIL import Image
from servers import Server

from training import data

skip_without_chromium()

from selenium import webdriver  # noqa: E402 - after the skip: only needed with a browser
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ARTIFACTS = ROOT / "runs" / "page"
DIGIT = ROOT / "docs" / "examples" / "digit.png"
KEY = "page-test-key"
SEED = 7
WARM = ("invert-classify", 25, 1)  # the encoder start at the L and R its detector threshold is calibrated for


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    # no warm-up (the first request warms what it uses); a 1 s drain, so the cancelled projection does not hold
    # the shutdown; a step cap and a timeout that admit a projection slow enough to cancel
    with Server.running(MODELS, True, MG_ATTACK__ENABLED="true", MG_ATTACK__API_KEYS=json.dumps([KEY]),
                        MG_WARM_UP="false", MG_DRAIN_S="1", MG_MAX_STEPS="2500",
                        MG_REQUEST_TIMEOUT_S="3600") as srv:  # fmt: skip
        yield srv


@pytest.fixture
def page(browser: webdriver.Chrome, server: Server, request: pytest.FixtureRequest) -> Iterator[webdriver.Chrome]:
    """The page freshly loaded, its models read, the console drained of earlier tests' entries; a screenshot of it
    is saved after the test, pass or fail."""
    browser.get_log("browser")
    browser.get(server.url + "/")
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))
    yield browser
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    w, h = browser.execute_script("const e = document.documentElement; return [e.scrollWidth, e.scrollHeight]")
    clip = {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                               "clip": clip})  # fmt: skip
    (ARTIFACTS / f"{request.node.name}.png").write_bytes(base64.b64decode(shot["data"]))


# -- helpers ----------------------------------------------------------------------------------------------
def el(d: webdriver.Chrome, id_: str):  # noqa: ANN201 - a WebElement
    return d.find_element(By.ID, id_)


def submit(d: webdriver.Chrome, button: str, limit_s: float = 60) -> None:
    """Click a button that starts a request and wait until the page has handled its answer (or error)."""
    done = "return Number(document.body.dataset.done || 0)"
    before = d.execute_script(done)
    el(d, button).click()
    WebDriverWait(d, limit_s).until(lambda d: d.execute_script(done) > before)


def set_value(d: webdriver.Chrome, id_: str, value: object) -> None:
    field = el(d, id_)
    field.clear()
    field.send_keys(str(value))


def pipeline(d: webdriver.Chrome, defense: str, steps: int, restarts: int) -> dict[str, str]:
    """Choose classifier A, a defense, its steps and restarts, and SEED on the page; returns the same as API
    parameters."""
    Select(el(d, "classifier")).select_by_value("classifier_A")
    Select(el(d, "defense")).select_by_value(defense)
    set_value(d, "steps", steps)
    set_value(d, "restarts", restarts)
    set_value(d, "seed", SEED)
    return {"model": "mnist/classifier_A", "defense": defense, "steps": str(steps), "restarts": str(restarts),
            "seed": str(SEED)}  # fmt: skip


def shown_prediction(d: webdriver.Chrome) -> tuple[int, list[float]]:
    label = int(el(d, "prediction").get_attribute("data-label"))
    probs = [float(t.get_attribute("data-prob")) for t in d.find_elements(By.CSS_SELECTOR, "#probs .bar-track")]
    return label, probs


def api_classify(server: Server, data: bytes, name: str, params: dict[str, str]) -> httpx.Response:
    files = {"file": (name, data, "application/octet-stream")}
    fields = {**params, "return_input": "true", "return_purified": "true"}
    return httpx.post(server.url + "/v1/classify", data=fields, files=files, timeout=60)


def assert_same_answer(d: webdriver.Chrome, r: httpx.Response) -> None:
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    label, probs = shown_prediction(d)
    assert label == pred["label"]
    assert probs == pytest.approx(pred["probabilities"], abs=1e-6)
    assert el(d, "img-input").get_attribute("src") == "data:image/png;base64," + pred["input_png"]
    assert el(d, "img-purified").get_attribute("src") == "data:image/png;base64," + pred["purified_png"]
    assert d.execute_script("return document.getElementById('img-input').naturalWidth") == 28


def upload_digit(d: webdriver.Chrome) -> dict[str, str]:
    el(d, "file").send_keys(str(DIGIT))
    WebDriverWait(d, 5).until(lambda d: DIGIT.name in el(d, "source").text)
    params = pipeline(d, *WARM)
    submit(d, "run")
    assert el(d, "error").get_attribute("hidden") is not None, el(d, "error").text
    return params


# -- tests ------------------------------------------------------------------------------------------------
def test_page_is_self_contained_labelled_and_keyboard_drawable(page: webdriver.Chrome, server: Server) -> None:
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
    resources = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(u.startswith(server.url + "/") for u in resources), resources  # nothing off-origin
    assert page.get_log("browser") == [], "no script error, CSP violation or failed load on the console"
    models = httpx.get(server.url + "/v1/models").json()
    datasets = [o.get_attribute("value") for o in Select(el(page, "dataset")).options]
    assert datasets == list(models["datasets"])
    assert el(page, "steps").get_attribute("max") == str(models["caps"]["max_steps"])
    assert el(page, "restarts").get_attribute("max") == str(models["caps"]["max_restarts"])
    default = models["datasets"]["mnist"]["default"]
    assert el(page, "classifier").get_attribute("value") == default["classifier"]
    assert el(page, "defense").get_attribute("value") == default["defense"]
    assert el(page, "img-input").value_of_css_property("image-rendering") == "pixelated"
    unlabelled = page.execute_script(
        "return [...document.querySelectorAll('input, select')]"
        ".filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)"
    )
    assert unlabelled == []
    lit = "return [...document.getElementById('pad').getContext('2d').getImageData(0,0,280,280).data].filter((v,i) => i % 4 === 0 && v > 0).length"  # noqa: E501
    assert page.execute_script(lit) == 0
    el(page, "pad").send_keys(Keys.SPACE, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_DOWN)
    assert page.execute_script(lit) > 100  # the pen drew with the keyboard alone


def test_drawn_stroke_is_classified_as_the_api_does(page: webdriver.Chrome, server: Server) -> None:
    pad = el(page, "pad")
    ActionChains(page).move_to_element_with_offset(pad, -10, -80).click_and_hold().move_by_offset(10, 60) \
        .move_by_offset(0, 90).release().perform()  # fmt: skip
    params = pipeline(page, "defense-gan", 4, 2)
    submit(page, "run")
    drawn = page.execute_script("return document.getElementById('pad').toDataURL('image/png')")
    png = base64.b64decode(drawn.split(",", 1)[1])
    assert_same_answer(page, api_classify(server, png, "drawing.png", params))
    assert len(page.find_elements(By.CSS_SELECTOR, "#timings tbody tr")) >= 3
    assert "MSE" in el(page, "detector").text


def test_uploaded_digit_is_classified_as_the_api_does(page: webdriver.Chrome, server: Server) -> None:
    params = upload_digit(page)
    assert_same_answer(page, api_classify(server, DIGIT.read_bytes(), DIGIT.name, params))
    r = api_classify(server, DIGIT.read_bytes(), DIGIT.name, params).json()
    pred, threshold = r["predictions"][0], r["threshold"]
    assert threshold is not None, "the shipped encoder's detector is calibrated at L=25, R=1"
    text = el(page, "detector").text
    assert ("FLAGGED" if pred["flagged"] else "not flagged") in text
    assert f"MSE {pred['mse']:.3g} {'>' if pred['flagged'] else '≤'} threshold {threshold:.3g}" in text


def test_colour_dataset_takes_an_upload_and_is_drawn_in_colour(page: webdriver.Chrome, server: Server,
                                                                tmp_path: Path) -> None:  # fmt: skip
    """The shipped colour set: the pad does not draw, an uploaded colour image is classified as the API does and
    the model's input and purified image come back in colour at the dataset's 32×32; MNIST's pad draws again."""
    if "shapes" not in httpx.get(server.url + "/v1/models").json()["datasets"]:
        pytest.skip("no colour dataset is shipped")
    Select(el(page, "dataset")).select_by_value("shapes")
    assert el(page, "pad").get_attribute("data-drawing") == "false" and "colour" in el(page, "source").text
    x, _ = data.load_slice("shapes")
    upload = tmp_path / "shape.png"
    Image.fromarray(x[0]).resize((96, 64)).save(upload)  # another size and aspect: fitted by the "fill" policy
    el(page, "file").send_keys(str(upload))
    WebDriverWait(page, 5).until(lambda d: upload.name in el(d, "source").text)
    Select(el(page, "defense")).select_by_value("invert-classify")
    set_value(page, "seed", SEED)
    submit(page, "run")
    assert el(page, "error").get_attribute("hidden") is not None, el(page, "error").text
    value = {k: el(page, k).get_attribute("value") for k in ("classifier", "steps", "restarts")}
    params = {"model": f"shapes/{value['classifier']}", "defense": "invert-classify", "steps": value["steps"],
              "restarts": value["restarts"], "seed": str(SEED)}  # fmt: skip
    r = api_classify(server, upload.read_bytes(), upload.name, params)
    label, probs = shown_prediction(page)
    assert label == r.json()["predictions"][0]["label"] and len(probs) == 10
    assert el(page, "img-input").get_attribute("src").endswith(r.json()["predictions"][0]["input_png"])
    spread = """const img = document.getElementById(arguments[0]); const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight; const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data; let m = 0;
        for (let i = 0; i < d.length; i += 4) m = Math.max(m, Math.abs(d[i] - d[i + 2]));
        return [c.width, c.height, m];"""  # the largest red-blue gap: 0 for a gray image
    for img in ("img-input", "img-purified"):
        w, h, gap = page.execute_script(spread, img)
        assert (w, h) == (32, 32) and gap > 30, (img, gap)
    assert page.execute_script("return document.getElementById('img-diff').width") == 32
    Select(el(page, "dataset")).select_by_value("mnist")
    assert el(page, "pad").get_attribute("data-drawing") == "true"


def test_attack_panel_shows_the_api_answer(page: webdriver.Chrome, server: Server) -> None:
    params = upload_digit(page)
    set_value(page, "api-key", KEY)
    Select(el(page, "method")).select_by_value("fgsm")
    set_value(page, "eps", 0.3)
    Select(el(page, "target")).select_by_value("classifier")
    Select(el(page, "attack-defense")).select_by_value(WARM[0])
    submit(page, "attack")
    assert el(page, "error").get_attribute("hidden") is not None, el(page, "error").text
    image = el(page, "img-input").get_attribute("src").split(",", 1)[1]
    body = {"image": image, "method": "fgsm", "params": {"eps": 0.3}, "target": "classifier", "model": params["model"],
            "defense": WARM[0], "steps": WARM[1], "restarts": WARM[2], "seed": SEED}  # fmt: skip
    r = httpx.post(server.url + "/v1/attack", json=body, headers={"X-API-Key": KEY}, timeout=60)
    assert r.status_code == 200, r.text
    a = r.json()
    assert el(page, "img-adv").get_attribute("src") == "data:image/png;base64," + a["adversarial"]["png_base64"]
    cells = page.find_elements(By.CSS_SELECTOR, "#attack-table tbody td")
    expected = [a[when][kind]["label"] for when in ("before", "after") for kind in ("classifier", "defended")]
    assert [int(c.get_attribute("data-label")) for c in cells] == expected
    flagged = a["after"]["defended"]["flagged"]
    assert flagged is not None, "the detector is calibrated for the warm start at L=25, R=1"
    assert ("flags the adversarial" if flagged else "does not flag") in el(page, "attack-verdict").text
    fooled = "is fooled" if a["fooled"]["classifier"] else "is not fooled"
    assert f"the bare classifier {fooled}" in el(page, "attack-verdict").text
    assert f"L∞ {a['adversarial']['linf']:.3f}" in el(page, "pert-caption").text
    el(page, "robustness").find_element(By.TAG_NAME, "summary").click()  # open for the screenshot (README)
    paths = page.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).pathname)")
    api = {p for p in paths if not p.startswith("/static/")}
    assert api == {"/v1/models", "/v1/classify", "/v1/attack"}, "the page calls the public API and nothing else"


def test_api_errors_are_shown_as_the_api_words_them(page: webdriver.Chrome, server: Server,
                                                    tmp_path: Path) -> None:  # fmt: skip
    bad = tmp_path / "notes.txt"
    bad.write_bytes(b"this is not an image")
    el(page, "file").send_keys(str(bad))
    params = pipeline(page, *WARM)
    submit(page, "run")
    r = api_classify(server, bad.read_bytes(), bad.name, params)
    assert r.status_code >= 400
    assert el(page, "error").text == f"HTTP {r.status_code}: {r.json()['error']}"
    upload_digit(page)
    set_value(page, "api-key", "not-the-key")
    submit(page, "attack")
    words = httpx.post(server.url + "/v1/attack", json={}, headers={"X-API-Key": "not-the-key"}).json()["error"]
    assert el(page, "error").text == f"HTTP 403: {words}"


def test_robustness_panel_plots_what_the_api_measured(page: webdriver.Chrome, server: Server) -> None:
    el(page, "robustness").find_element(By.TAG_NAME, "summary").click()
    assert el(page, "robust-plots").is_displayed()
    measured = httpx.get(server.url + "/v1/models").json()["datasets"]["mnist"]["measured"]
    expected = {(threat, f"{clf} + {defense}", cell["accuracy"])
                for clf, m in measured.items() for defense, cells in m["robustness"].items()
                for threat, cell in cells.items() if isinstance(cell, dict) and "accuracy" in cell}  # fmt: skip
    assert expected, "the e2e models carry the shipped classifier A's measured robustness"
    shown = {(plot.get_attribute("data-threat"), bar.get_attribute("data-pipeline"), float(bar.get_attribute(
        "data-accuracy"))) for plot in page.find_elements(By.CSS_SELECTOR, "#robust-plots svg")
        for bar in plot.find_elements(By.CSS_SELECTOR, "g[data-pipeline]")}  # fmt: skip
    assert shown == expected


def test_a_slow_projection_can_be_cancelled(page: webdriver.Chrome) -> None:
    el(page, "file").send_keys(str(DIGIT))
    pipeline(page, "defense-gan", 2500, 4)  # 10,000 generator passes: seconds on a CPU, within the admission's budget
    el(page, "run").click()
    WebDriverWait(page, 5).until(lambda d: el(d, "cancel").is_displayed() or el(d, "error").is_displayed())
    assert not el(page, "error").is_displayed(), el(page, "error").text
    el(page, "cancel").click()
    WebDriverWait(page, 5).until(lambda d: d.execute_script("return document.body.dataset.busy") == "false")
    assert el(page, "busy-text").text == "Cancelled."
    assert el(page, "error").get_attribute("hidden") is not None
    assert el(page, "run").is_enabled()
