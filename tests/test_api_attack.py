"""POST /v1/attack in-process (TestClient, lifespan included) on the tiny random-weight registry: off by default,
API key, caps, bad input, and the shape of a real answer."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_ready
from fastapi.testclient import TestClient
from PIL import Image

from service.api.app import create_app
from service.config import AttackSettings, Settings
from training import data

KEY = "test-key-1"
XS, YS = data.load_slice("mnist")


def settings(models: Path, **attack: object) -> Settings:
    caps = {"enabled": True, "api_keys": [KEY, "other-key"], "max_iterations": 20, "max_generator_evals": 400,
            "max_eot_samples": 2, "adaptive_steps": 2, "substitute_rounds": 3}  # fmt: skip
    return Settings(models_dir=models, device="cpu", default_steps=2, default_restarts=2, encoder_steps=2,
                    max_steps=20, max_restarts=4, max_wait_ms=1.0,
                    attack=AttackSettings(**{**caps, **attack}))  # fmt: skip


@pytest.fixture(scope="module")
def client(tiny_models: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings(tiny_models))) as c:
        wait_ready(c)
        yield c


def png(i: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(XS[i]).save(buf, format="PNG")
    return buf.getvalue()


def body(**kw: object) -> dict:
    return {"image": base64.b64encode(png()).decode(), "method": "fgsm", **kw}


def post(client: TestClient, key: str | None = KEY, **kw: object):  # noqa: ANN201
    return client.post("/v1/attack", json=body(**kw), headers={"X-API-Key": key} if key else {})


# -- off by default, then behind a key ------------------------------------------------------------------
def test_disabled_by_default_answers_404(tiny_models: Path) -> None:
    s = Settings(models_dir=tiny_models, device="cpu", warm_up=False)
    assert s.attack.enabled is False
    with TestClient(create_app(s)) as c:
        r = c.post("/v1/attack", json=body(), headers={"X-API-Key": KEY})
        assert r.status_code == 404


def test_missing_key_401_wrong_key_403(client: TestClient) -> None:
    r = post(client, key=None)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "ApiKey" and "X-API-Key" in r.json()["error"]
    r = post(client, key="not-a-key")
    assert r.status_code == 403
    r = post(client, key=KEY + "x")
    assert r.status_code == 403


def test_enabled_without_keys_refuses_everyone(tiny_models: Path) -> None:
    with TestClient(create_app(settings(tiny_models, api_keys=[]).model_copy(update={"warm_up": False}))) as c:
        assert c.post("/v1/attack", json=body(), headers={"X-API-Key": ""}).status_code == 401
        assert c.post("/v1/attack", json=body(), headers={"X-API-Key": KEY}).status_code == 403


# -- answers ----------------------------------------------------------------------------------------------
def test_fgsm_answer(client: TestClient) -> None:
    r = post(client, params={"eps": 0.2}, label=int(YS[0]), seed=1)
    assert r.status_code == 200, r.json()
    a = r.json()
    assert a["method"] == "fgsm" and a["target"] == "classifier" and a["label"] == int(YS[0])
    assert a["label_source"] == "given" and a["params"] == {"eps": 0.2} and a["threat_model"] == "linf"
    adv = np.array(a["adversarial"]["array"])
    x = XS[0] / 255.0
    assert adv.shape == (28, 28) and adv.min() >= 0 and adv.max() <= 1
    assert a["adversarial"]["linf"] <= 0.2 + 1e-6
    assert abs(a["adversarial"]["linf"] - np.abs(adv - x).max()) < 1e-5
    assert abs(a["adversarial"]["l2"] - np.linalg.norm(adv - x)) < 1e-3
    img = Image.open(io.BytesIO(base64.b64decode(a["adversarial"]["png_base64"])))
    assert img.size == (28, 28) and img.mode == "L"
    assert np.abs(np.asarray(img) / 255.0 - adv).max() <= 0.5 / 255 + 1e-6
    for when in ("before", "after"):
        assert len(a[when]["classifier"]["probabilities"]) == 10
        assert a[when]["defended"]["mse"] is not None  # the tiny registry has a generator
    assert a["fooled"]["classifier"] == (a["after"]["classifier"]["label"] != a["label"])
    assert a["steps"] == 2 and a["restarts"] == 2 and a["defense"] == "defense-gan"


def test_multipart_with_params_as_json_string(client: TestClient) -> None:
    r = client.post("/v1/attack", files={"file": ("d.png", png(), "image/png")},
                    data={"method": "pgd", "params": json.dumps({"eps": 0.1, "steps": 5}), "target_label": "3"},
                    headers={"X-API-Key": KEY})  # fmt: skip
    assert r.status_code == 200, r.json()
    a = r.json()
    assert a["params"]["steps"] == 5 and a["target_label"] == 3 and a["label_source"] == "predicted"
    assert a["adversarial"]["linf"] <= 0.1 + 1e-6
    assert a["fooled"]["classifier"] == (a["after"]["classifier"]["label"] == 3)


def test_adaptive_attack_on_the_defended_pipeline(client: TestClient) -> None:
    r = post(client, method="bpda", target="defended", seed=0)
    assert r.status_code == 200, r.json()
    a = r.json()
    assert a["params"]["steps"] == 2 and a["cost"]["generator_evals"] == 3 * 2 * 2
    assert a["adversarial"]["linf"] <= 0.3 + 1e-6
    r = post(client, method="latent", target="defended", params={"steps": 4, "check_every": 2})
    assert r.status_code == 200, r.json()


def test_substitute_is_black_box(client: TestClient) -> None:
    r = post(client, method="substitute", params={"eps": 0.25})
    assert r.status_code == 200, r.json()
    assert r.json()["adversarial"]["linf"] <= 0.25 + 1e-6


# -- caps and bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, status, words",
    [
        ({"method": "pgd", "params": {"steps": 21}}, 422, "max_iterations"),
        ({"method": "eot", "target": "defended", "params": {"samples": 3}}, 422, "max_eot_samples"),
        ({"method": "pgd", "target": "defended", "params": {"steps": 20}, "steps": 10, "restarts": 4}, 422,
         "generator evaluations"),
        ({"method": "cw", "target": "defended", "params": {"steps": 20}}, 422, "generator evaluations"),
        ({"method": "bpda"}, 422, "target=defended"),
        ({"method": "fgsm", "params": {"eps": 5}}, 422, "eps"),
        ({"method": "fgsm", "params": {"targeted": True}}, 422, "target_label"),
        ({"method": "fgsm", "params": {"bogus": 1}}, 422, "unknown parameter"),
        ({"method": "fgsm", "params": "{not json"}, 422, "params"),
        ({"method": "zap"}, 422, "unknown method"),
        ({"method": "advgan"}, 422, "no AdvGAN"),
        ({"method": "fgsm", "steps": 21}, 422, "max_steps"),
        ({"method": "fgsm", "label": 10}, 422, "label"),
        ({"method": "fgsm", "model": "mnist/classifier_Z"}, 404, "no classifier"),
        ({"method": "fgsm", "image": "bm90IGFuIGltYWdl"}, 415, ""),
    ],
)  # fmt: skip
def test_caps_and_bad_requests(client: TestClient, kw: dict, status: int, words: str) -> None:
    r = post(client, **kw)
    assert r.status_code == status, r.json()
    assert words in r.json()["error"]


def test_one_image_only_and_no_image(client: TestClient) -> None:
    b64 = base64.b64encode(png()).decode()
    r = client.post("/v1/attack", json={"images": [b64, b64], "method": "fgsm"}, headers={"X-API-Key": KEY})
    assert r.status_code == 422 and "one image" in r.json()["error"]
    r = client.post("/v1/attack", json={"method": "fgsm"}, headers={"X-API-Key": KEY})
    assert r.status_code in (400, 422)


def test_an_attack_past_its_timeout_is_504_and_stops(tiny_models: Path) -> None:
    """The attack is the batcher's work: its timeout answers 504 and stops it, so the lane serves the next call."""
    s = settings(tiny_models, max_iterations=10**6, timeout_s=0.5).model_copy(update={"warm_up": False})
    with TestClient(create_app(s)) as c:
        r = post(c, method="pgd", params={"steps": 10**6})  # hours of steps
        assert r.status_code == 504, r.json()
        r = c.post("/v1/classify", json={"image": body()["image"], "defense": "defense-gan"})  # the same (slow) lane
        assert r.status_code == 200, r.json()
        assert "mg_cancelled_batches_total 1.0" in c.get("/metrics").text
