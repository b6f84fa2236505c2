"""End to end through a real server: `python -m service` (uvicorn) on a loopback port, driven by an HTTP client.

The server's models folder holds the shipped MNIST artifacts where they exist (classifier A, later the generator
and encoder) and the tiny random-weight ones for the rest, so the defended paths run before training finishes.
Labels are checked against the truth only with the shipped classifier; defended answers are checked against the
engine called directly with the same seed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from conftest import MODELS
from PIL import Image
from servers import RESTARTS, STEPS, UPLOAD_CAP, Server, e2e_models

from service.engine import Engine
from service.purify import ProjectionConfig
from service.registry import Registry


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    models, real = e2e_models(tmp_path_factory.mktemp("e2e_models"))
    with Server.running(models, real) as srv:
        yield srv


@pytest.fixture(scope="module")
def engine(server: Server) -> Engine:
    return Engine(Registry(server.models), "cpu")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    with np.load(MODELS / "mnist" / "test_slice.npz", allow_pickle=False) as f:
        return f["x"][:64], f["y"][:64].astype(int)


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a / 255.0).float().reshape(-1, 1, 28, 28)


def batches_over_one(metrics: str, op: str) -> int:
    """Engine calls that merged more than one request, from the mg_batch_requests histogram (0 before any)."""
    count = re.search(rf'mg_batch_requests_count{{op="{op}"}} (\S+)', metrics)
    one = re.search(rf'mg_batch_requests_bucket{{le="1.0",op="{op}"}} (\S+)', metrics)
    return int(float(count.group(1)) - float(one.group(1))) if count and one else 0


def test_each_endpoint(server: Server, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = digits
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json()["status"] == "ready"
        models = c.get("/v1/models").json()
        assert "classifier_A" in models["datasets"]["mnist"]["classifiers"]
        r = c.post("/v1/classify", files={"file": ("d.png", png(x[0]), "image/png")}, params={"return_purified": True})
        body = r.json()
        assert r.status_code == 200 and body["steps"] == STEPS and body["restarts"] == RESTARTS
        assert len(body["predictions"][0]["probabilities"]) == 10 and body["predictions"][0]["purified_png"]
        r = c.post("/v1/purify", content=png(x[0]), headers={"content-type": "image/png"})
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG") and float(r.headers["x-mg-mse"]) >= 0
        r = c.post("/v1/detect", json={"image": base64.b64encode(png(x[1])).decode()})
        assert r.status_code == 200 and r.json()["detections"][0]["score"] >= 0
        r = c.post("/v1/classify", json={"image": base64.b64encode(png(x[0])).decode(), "defense": "invert-classify"})
        assert r.status_code == 200 and r.json()["defense"] == "invert-classify"
        assert "mg_http_requests_total" in c.get("/metrics").text
        assert "/v1/classify" in c.get("/openapi.json").json()["paths"]


async def concurrent(url: str, requests: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as c:
        return await asyncio.gather(*[c.post("/v1/classify", **r) for r in requests])


def test_32_concurrent_classify_requests_are_batched_and_correct(
    server: Server, engine: Engine, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = digits
    direct, _ = engine.classify(tensor(x), "mnist", "classifier_A")
    idx = np.flatnonzero(direct == y)[:32] if server.real else np.arange(32)
    assert len(idx) == 32
    before = httpx.get(server.url + "/metrics").text
    reqs = [{"files": {"file": (f"{i}.png", png(x[i]), "image/png")}, "params": {"defense": "none"}} for i in idx]
    answers = asyncio.run(concurrent(server.url, reqs))
    assert [r.status_code for r in answers] == [200] * 32
    labels = [r.json()["predictions"][0]["label"] for r in answers]
    assert labels == (y[idx] if server.real else direct[idx]).tolist()
    after = httpx.get(server.url + "/metrics").text
    assert batches_over_one(after, "classify") > batches_over_one(before, "classify")
    assert max(r.json()["batch"]["requests"] for r in answers) > 1


def test_concurrent_defended_requests_equal_the_engine(
    server: Server, engine: Engine, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = digits
    reqs = [{"json": {"image": base64.b64encode(png(x[i])).decode(), "seed": 4}} for i in range(12)]
    answers = asyncio.run(concurrent(server.url, reqs))
    assert [r.status_code for r in answers] == [200] * 12
    ref = engine.defend(tensor(x[:12]), "mnist", "classifier_A", "defense-gan",
                        ProjectionConfig(steps=STEPS, restarts=RESTARTS), seed=4)  # fmt: skip
    assert [r.json()["predictions"][0]["label"] for r in answers] == ref.labels.tolist()
    assert np.allclose([r.json()["predictions"][0]["mse"] for r in answers], ref.mse, rtol=1e-4, atol=1e-6)
    assert batches_over_one(httpx.get(server.url + "/metrics").text, "defend") >= 1


def chunks(total: int, size: int = 16_384) -> Iterator[bytes]:
    for start in range(0, total, size):
        yield b"\x89PNG\r\n\x1a\n" + b"\x00" * (min(size, total - start) - 8)


BAD = [
    ({"content": b"GIF89a not supported", "headers": {"content-type": "image/png"}}, 415),
    ({"content": png(np.zeros((28, 28), np.uint8))[:50], "headers": {"content-type": "image/png"}}, 400),
    ({"content": b'{"image": [1, 2', "headers": {"content-type": "application/json"}}, 400),
    ({"json": {"pixels": [0.1]}}, 422),
    ({"content": b'{"array": [[NaN]]}', "headers": {"content-type": "application/json"}}, 400),
    ({"json": {"array": [[-0.5] * 28] * 28}}, 400),
    ({"json": {"array": [[0.5] * 28] * 28, "steps": 51}}, 422),
    ({"json": {"array": [[0.5] * 28] * 28, "restarts": 99}}, 422),
    ({"files": {"file": ("x.txt", b"plain text", "text/plain")}}, 415),
    ({"content": b"\x00" * (UPLOAD_CAP + 1), "headers": {"content-type": "image/png"}}, 413),
    ({"content": chunks(UPLOAD_CAP * 2), "headers": {"content-type": "image/png"}}, 413),  # no Content-Length
]


def test_bad_inputs_then_still_serving(server: Server, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for kwargs, status in BAD:
            r = c.post("/v1/classify", **kwargs)
            assert r.status_code == status, (kwargs.get("headers"), r.text)
            assert r.headers["content-type"] == "application/json" and r.json()["error"]
        r = c.post("/v1/classify", files={"file": ("d.png", png(x[0]), "image/png")}, params={"defense": "none"})
        assert r.status_code == 200
        if server.real:
            assert r.json()["predictions"][0]["label"] == y[0]
        assert c.get("/healthz").status_code == 200
        assert 'status="413"' in c.get("/metrics").text
