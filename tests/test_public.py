"""The public profile end to end: a real `uvicorn` (MG_PUBLIC=true) in front of a real KServe ModelServer.

What a public caller may not change is refused with a message naming the profile; answers carry what the output
policy allows and never the detector's figures; random starts differ between identical requests; clients over
their rate get 429 with Retry-After; a query-attack stream is stopped while benign repeats are not.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from service.purify import ProjectionConfig, initial_latents

pytest.importorskip("kserve", reason="needs the [test] extra: kserve")
from procs import Proc, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
INSPECT = {"X-API-Key": "inspector-key"}
PIPELINES = {
    "user-model": {"defense": "defense-gan", "steps": 3, "restarts": 2, "output": "probabilities"},
    "mnist-classifier_A": {"output": "top1", "decimals": 2},
}


@pytest.fixture(scope="module")
def public(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("public-logs")
    up_port, mg_port = free_port(), free_port()
    onnx = tiny_models / "mnist" / "classifier_A.onnx"
    upstream = Proc([sys.executable, "tests/upstreams.py", "kserve", "--port", str(up_port), "--onnx", str(onnx)],
                    logs / "kserve.log")  # fmt: skip
    env = {
        "MG_MODELS_DIR": str(tiny_models), "MG_TORCH_THREADS": "1", "MG_PUBLIC": "true",
        "MG_DEFAULT_STEPS": "3", "MG_DEFAULT_RESTARTS": "2",
        "MG_PROXY__UPSTREAMS": json.dumps({"user-model": {"url": f"http://127.0.0.1:{up_port}",
                                                          "model": "mnist-nchw"}}),
        "MG_PROFILE__PIPELINES": json.dumps(PIPELINES), "MG_PROFILE__INSPECT_KEYS": json.dumps(["inspector-key"]),
        "MG_CLIENTS__TRUSTED_PROXIES": json.dumps(["127.0.0.1"]), "MG_CLIENTS__RATE_PER_S": "0.5",
        "MG_CLIENTS__BURST": "40",
    }  # fmt: skip
    mg = Proc([sys.executable, "-m", "uvicorn", "service.api.app:create_app", "--factory", "--host", "127.0.0.1",
               "--port", str(mg_port)], logs / "mg.log", env)  # fmt: skip
    try:
        upstream.wait_http(f"http://127.0.0.1:{up_port}/v2/health/ready")
        mg.wait_http(f"http://127.0.0.1:{mg_port}/readyz")
        yield f"http://127.0.0.1:{mg_port}"
    finally:
        mg.stop()
        upstream.stop()


def _client(name: str) -> dict[str, str]:
    """Headers that make the server count this caller as its own client (the test runs behind a trusted proxy)."""
    return {"X-Forwarded-For": f"198.51.100.{abs(hash(name)) % 250 + 1}, 203.0.113.{len(name)}"}


def _png(x: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.rint(x * 255).astype(np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _infer(x: np.ndarray, **params: object) -> dict:
    body: dict = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                              "data": x.ravel().tolist()}]}  # fmt: skip
    if params:
        body["parameters"] = params
    return body


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    with np.load(ROOT / "models" / "mnist" / "test_slice.npz") as f:
        return (f["x"][:8] / 255.0).astype(np.float32)


@pytest.mark.parametrize("field", ["seed", "defense", "steps", "restarts", "return_purified"])
def test_v1_refuses_pipeline_parameters(public: str, digits: np.ndarray, field: str) -> None:
    value = {"seed": 0, "defense": "none", "steps": 5, "restarts": 1, "return_purified": True}[field]
    r = httpx.post(f"{public}/v1/classify", json={"image": _png(digits[0]), field: value}, headers=_client(field))
    assert r.status_code == 422, r.text
    assert "public profile" in r.json()["error"] and field in r.json()["error"]


def test_v1_answer_follows_the_policy(public: str, digits: np.ndarray) -> None:
    r = httpx.post(f"{public}/v1/classify", json={"images": [_png(d) for d in digits[:2]]}, headers=_client("v1"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "predictions"}  # no defense, steps, threshold, timings, batch
    for p in body["predictions"]:
        assert set(p) == {"label", "class_name", "probability"}  # the default policy: top1; no mse, no flag
        assert abs(p["probability"] - round(p["probability"], 2)) < 1e-6
    downgrade = httpx.post(f"{public}/v1/classify", json={"image": _png(digits[0]), "model": "mnist/classifier_A"},
                           headers=_client("v1"))  # fmt: skip
    assert downgrade.status_code == 422 and "not served under the public profile" in downgrade.json()["error"]


def test_v1_purify_and_detect_need_the_inspect_scope(public: str, digits: np.ndarray) -> None:
    for route in ("purify", "detect"):
        r = httpx.post(f"{public}/v1/{route}", json={"image": _png(digits[0])}, headers=_client("purify"))
        assert r.status_code == 403 and "public profile" in r.json()["error"]
        ok = httpx.post(f"{public}/v1/{route}", json={"image": _png(digits[0]), "format": "json"} if route == "purify"
                        else {"image": _png(digits[0])}, headers=INSPECT)  # fmt: skip
        assert ok.status_code == 200, ok.text


def test_v2_own_model_top1_policy(public: str, digits: np.ndarray) -> None:
    r = httpx.post(
        f"{public}/v2/models/mnist-classifier_A/infer", json=_infer(digits[:3, None]), headers=_client("own")
    )
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert set(out) == {"labels", "top1"} and not r.json().get("parameters")
    top1 = np.asarray(out["top1"]["data"])
    assert np.allclose(top1, np.round(top1, 2)) and ((top1 > 0) & (top1 <= 1)).all()
    refused = httpx.post(f"{public}/v2/models/mnist-classifier_A/infer", json=_infer(digits[:1, None], seed=0),
                         headers=_client("own"))  # fmt: skip
    assert refused.status_code == 400 and "public profile" in refused.json()["error"]
    asked = _infer(digits[:1, None]) | {"outputs": [{"name": "mse"}]}
    r = httpx.post(f"{public}/v2/models/mnist-classifier_A/infer", json=asked, headers=_client("own"))
    assert r.status_code == 400 and "mse" in r.json()["error"]
    inspect = httpx.post(f"{public}/v2/models/mnist-classifier_A/infer",
                         json=_infer(digits[:1, None], seed=0, defense="defense-gan"), headers=INSPECT)  # fmt: skip
    assert inspect.status_code == 200 and "mse" in {o["name"] for o in inspect.json()["outputs"]}


def test_v2_proxied_upstream_reduced_to_probabilities(public: str, digits: np.ndarray) -> None:
    r = httpx.post(f"{public}/v2/models/user-model/infer", json=_infer(digits[:2, None]), headers=_client("proxy"))
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert set(out) == {"labels", "probabilities"}  # the upstream's logits and label are not passed on
    probs = np.asarray(out["probabilities"]["data"]).reshape(2, 10)
    assert np.allclose(probs, np.round(probs, 2)) and abs(probs.sum(1) - 1).max() < 0.06
    labels = np.asarray(out["labels"]["data"])
    assert (probs[np.arange(2), labels] == probs.max(1)).all()  # the label is a top class (ties: rounded scores)
    assert not any(k in r.json().get("parameters", {}) for k in ("max_mse", "flagged", "steps", "purify_ms"))
    refused = httpx.post(f"{public}/v2/models/user-model/infer", json=_infer(digits[:1, None], steps=1),
                         headers=_client("proxy"))  # fmt: skip
    assert refused.status_code == 400 and "public profile" in refused.json()["error"]


def test_identical_requests_start_apart(public: str, digits: np.ndarray) -> None:
    """Unseeded projections draw fresh starts per request and per image (seen through the inspect scope)."""
    x = np.repeat(digits[:1, None], 2, axis=0)
    asked = _infer(x, defense="defense-gan") | {"outputs": [{"name": "purified"}]}
    a, b = (httpx.post(f"{public}/v2/models/mnist-classifier_A/infer", json=asked, headers=INSPECT).json()
            for _ in range(2))  # fmt: skip
    pa, pb = (np.asarray(r["outputs"][0]["data"]).reshape(2, 28 * 28) for r in (a, b))
    assert np.abs(pa[0] - pb[0]).max() > 1e-4  # two requests
    assert np.abs(pa[0] - pa[1]).max() > 1e-4  # two identical images in one request


def test_initial_latents_fresh_per_image_and_fixed_with_a_seed() -> None:
    x = torch.zeros(3, 1, 28, 28)
    cfg = ProjectionConfig(steps=1, restarts=2)
    fresh = initial_latents(x, 8, cfg, None, None).reshape(3, 2, 8)
    assert (fresh[0] - fresh[1]).abs().max() > 0
    seeded = initial_latents(x, 8, cfg, None, 5).reshape(3, 2, 8)
    assert torch.equal(seeded[0], seeded[1]) and torch.equal(
        seeded, initial_latents(x, 8, cfg, None, 5).reshape(3, 2, 8)
    )


def test_rate_limit_answers_429_with_retry_after(public: str, digits: np.ndarray) -> None:
    """Burst 40 images at 0.5 per second: the sixth request of 8 images is over."""
    codes, last = [], None
    for _ in range(6):
        last = httpx.post(f"{public}/v2/models/mnist-classifier_A/infer", json=_infer(digits[:, None]),
                          headers=_client("greedy"))  # fmt: skip
        codes.append(last.status_code)
    assert codes[:5] == [200] * 5 and codes[5] == 429, codes
    assert int(last.headers["Retry-After"]) >= 1 and "rate" in last.json()["error"]
    assert httpx.post(f"{public}/v2/models/mnist-classifier_A/infer", json=_infer(digits[:1, None]),
                      headers=_client("someone else")).status_code == 200  # fmt: skip


def test_square_like_stream_is_stopped_benign_repeats_are_not(public: str, digits: np.ndarray) -> None:
    """A score-based attack's queries differ by a small square each; a benign client re-sends its images."""
    rng = np.random.default_rng(0)
    for i in range(3):  # benign: each image twice, once brightened
        for x in (digits[i], digits[i], np.clip(digits[i] * 1.1, 0, 1)):
            r = httpx.post(f"{public}/v2/models/user-model/infer", json=_infer(x[None, None]), headers=_client("kind"))
            assert r.status_code == 200, r.text
    x, stopped_at = digits[5].copy(), None
    for q in range(40):
        i, j = rng.integers(0, 24, 2)
        x[i : i + 4, j : j + 4] = np.clip(digits[5][i : i + 4, j : j + 4] + rng.choice([-0.3, 0.3]), 0, 1)
        r = httpx.post(f"{public}/v2/models/user-model/infer", json=_infer(x[None, None]), headers=_client("attacker"))
        if r.status_code == 429:
            stopped_at = q
            break
        assert r.status_code == 200, r.text
    assert stopped_at is not None, "the query-attack detector never stopped the stream"
    assert "Retry-After" in r.headers and "detect" in r.json()["error"].lower()
    metrics = httpx.get(f"{public}/metrics").text
    assert "mg_query_attacks_detected_total" in metrics
    ready = httpx.get(f"{public}/readyz").json()
    assert ready["client_state"]["backend"] == "memory"
