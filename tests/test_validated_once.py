"""A request is validated once: one resolve of its defense and classifier, one scan of its image tensor and one
model lookup, on /v1/classify and on the proxied /v2 path (in-process, tiny models, an upstream answered by a mock
transport)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service import purify, request
from service.api import app as app_module
from service.api.app import create_app
from service.config import Settings
from service.engine import classifier_for
from service.proxy import ProxyClient
from service.served import ModelRepository

UPSTREAM = {"url": "http://upstream.test", "binary_data": False}


def upstream(_: httpx.Request) -> httpx.Response:
    """An Open Inference Protocol model answering ten logits for one image."""
    logits = {"name": "logits", "datatype": "FP32", "shape": [1, 10], "data": np.linspace(0, 1, 10).tolist()}
    body = json.dumps({"model_name": "up", "outputs": [logits]}).encode()
    return httpx.Response(200, headers={"content-type": "application/json"}, stream=httpx.ByteStream(body))


def count(monkeypatch: pytest.MonkeyPatch, calls: Counter[str], name: str, fn: Callable[..., Any]) -> None:
    """Count the calls of `fn` under `name`, wherever a loaded service module holds it."""

    def counted(*args: Any, **kw: Any) -> Any:
        calls[name] += 1
        return fn(*args, **kw)

    for module in [m for k, m in sys.modules.items() if k.startswith("service")]:
        for attr, value in list(vars(module).items()):
            if value is fn:
                monkeypatch.setattr(module, attr, counted)


@pytest.fixture
def counted(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, Counter[str]]]:
    s = Settings(models_dir=tiny_models, device="cpu", warm_up=False, default_steps=2, default_restarts=1,
                 proxy={"upstreams": {"up": UPSTREAM}})  # type: ignore[arg-type]  # fmt: skip
    mock = httpx.MockTransport(upstream)
    monkeypatch.setattr(app_module, "ProxyClient", lambda settings: ProxyClient(settings, transport=mock))
    calls: Counter[str] = Counter()
    for name, fn in (("resolve", request.resolve), ("check_images", purify.check_images),
                     ("classifier_for", classifier_for), ("classifier lookup", request.classifier)):  # fmt: skip
        count(monkeypatch, calls, name, fn)
    get, upstream_of = ModelRepository.get, ProxyClient.upstream
    monkeypatch.setattr(ModelRepository, "get", lambda self, n: (calls.update(["model lookup"]), get(self, n))[1])
    monkeypatch.setattr(
        ProxyClient, "upstream", lambda self, n: (calls.update(["model lookup"]), upstream_of(self, n))[1]
    )
    with TestClient(create_app(s)) as client:
        calls.clear()
        yield client, calls


def test_v1_classify_resolves_checks_and_looks_up_once(counted: tuple[TestClient, Counter[str]]) -> None:
    client, calls = counted
    r = client.post("/v1/classify", json={"array": np.full((28, 28), 0.5).tolist(), "defense": "defense-gan"})
    assert r.status_code == 200, r.json()
    assert calls == {"resolve": 1, "classifier_for": 1, "check_images": 1, "classifier lookup": 1}


def test_proxied_infer_resolves_checks_and_looks_up_once(counted: tuple[TestClient, Counter[str]]) -> None:
    client, calls = counted
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.5] * 784}],
            "parameters": {"defense": "defense-gan"}}  # fmt: skip
    r = client.post("/v2/models/up/infer", json=body)
    assert r.status_code == 200, r.json()
    assert r.json()["parameters"]["purified"] is True and r.json()["outputs"][0]["shape"] == [1, 10]
    assert calls == {"resolve": 1, "check_images": 1, "model lookup": 1}
