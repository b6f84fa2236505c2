"""Ray Serve (service.ray_app) on a local 2-CPU cluster: v1 and v2 answers equal the single-process service's for
fixed seeds, concurrent requests with one job key merge in one `@serve.batch` engine call, the caps apply."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.config import Settings
from tests.conftest import MODELS, wait_ready

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network here: no usage report
ray = pytest.importorskip("ray", reason="Ray Serve is the .[ray] extra (scripts/setup.sh --dev installs it)")
serve = pytest.importorskip("ray.serve")
ray_app = pytest.importorskip("service.ray_app")

DIGITS = np.load(MODELS / "mnist" / "test_slice.npz")["x"][:8] / 255.0
FLOAT_TOL = 1e-5  # a merged batch sums in another order than a lone request (as tests/test_batcher.py allows)
VOLATILE = {"timings_ms", "batch", "purified_png"}  # per-run timings, batch composition; PNG bytes round floats


def volatile(key: str) -> bool:
    return key in VOLATILE or key.endswith("_ms")  # v2 reports timings as purify_ms, classify_ms parameters


def overrides() -> dict[str, Any]:
    """The settings both services run with: the same threads, a small budget to test the cap, no warm-up."""
    return {"torch_threads": torch.get_num_threads(), "max_request_cost": 2_000, "warm_up": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ray_url() -> Iterator[str]:
    """The application on a fresh local cluster (no dashboard, no metrics export), shut down afterwards."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config={"enable_metrics_collection": False})  # fmt: skip
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = ray_app.build_app({"num_replicas": 1, "num_cpus": 1, "ingress_num_cpus": 0.5, "settings": overrides()})
        serve.run(app, name="mg", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def local() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(**overrides()))) as c:
        wait_ready(c)
        yield c


def same(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two answers differ: floats beyond FLOAT_TOL, anything else at all (VOLATILE keys aside)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if {k for k in a if not volatile(k)} != {k for k in b if not volatile(k)}:
            return [f"{path}: keys {sorted(a)} vs {sorted(b)}"]
        return [d for k in a if not volatile(k) for d in same(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in same(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if abs(a - b) <= FLOAT_TOL else [f"{path}: {a} vs {b}"]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} vs {b!r}"]


def v1(images: np.ndarray, **params: Any) -> tuple[str, dict[str, Any]]:
    return "/v1/classify", {"array": images.tolist(), **params}


def v2(images: np.ndarray, **params: Any) -> tuple[str, dict[str, Any]]:
    tensor = {"name": "images", "shape": [len(images), 1, 28, 28], "datatype": "FP32",
              "data": images.astype(np.float32).ravel().tolist()}  # fmt: skip
    return "/v2/models/mnist-classifier_A/infer", {"inputs": [tensor], "parameters": params}


async def post_all(url: str, calls: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        return await asyncio.gather(*(c.post(path, json=body) for path, body in calls))


def answer(r: httpx.Response) -> tuple[int, Any]:
    return r.status_code, r.json()


def test_ray_answers_equal_the_single_process_and_merge(ray_url: str, local: TestClient) -> None:
    single = [
        v1(DIGITS[:3], defense="none"),
        v1(DIGITS[:2], defense="defense-gan", steps=5, restarts=2, seed=7),
        v1(DIGITS[2:4], defense="invert-classify", seed=3),
        v2(DIGITS[:2], defense="defense-gan", steps=5, restarts=2, seed=7),
        v2(DIGITS[4:5], defense="invert-classify", steps=3, seed=1),
        v1(DIGITS[:1], defense="defense-gan", steps=600),  # over max_steps: 422 either way
        v1(DIGITS[:2], defense="defense-gan", steps=100, restarts=16),  # 3,200 passes > the 2,000 budget: 422
    ]
    # one job key from 6 concurrent callers (and two of another seed): the engine merges each key's requests
    merged = [v1(DIGITS[i : i + 1], defense="defense-gan", steps=20, restarts=2, seed=5) for i in range(6)]
    merged += [v1(DIGITS[i : i + 1], defense="defense-gan", steps=20, restarts=2, seed=6) for i in range(2)]
    ray_single = [answer(r) for r in asyncio.run(post_all(ray_url, single))]
    ray_merged = asyncio.run(post_all(ray_url, merged))
    for (path, body), got in zip(single + merged, ray_single + [answer(r) for r in ray_merged], strict=True):
        want = answer(local.post(path, json=body))
        assert not same(got, want), (path, body.get("defense") or body["parameters"], same(got, want))
    assert [s for s, _ in ray_single] == [200, 200, 200, 200, 200, 422, 422]
    assert "budget" in ray_single[-1][1]["error"] and "max_steps" in ray_single[-2][1]["error"]
    # the check can fail: another seed is another answer
    assert same(ray_merged[0].json(), ray_merged[6].json()), "seeds 5 and 6 gave the same projection"
    sizes = [r.json()["batch"]["requests"] for r in ray_merged]
    assert max(sizes[:6]) >= 2 and max(sizes[6:]) <= 2, sizes  # merged, never across keys
    stats = serve.get_deployment_handle(ray_app.ENGINE, app_name="mg").stats.remote().result()
    merges = [c for c in stats["calls"] if c[0] == "slow" and c[2] >= 2]
    assert merges, stats  # the engine made a call for ≥ 2 requests
    assert any(c[:2] == ["fast", "classify"] for c in stats["calls"]), stats  # defense=none took the fast lane


def test_run_batch_groups_by_job_key_and_isolates_a_failing_request(tiny_registry: Any) -> None:
    """The engine deployment's batch function without a cluster: equal keys are one engine call, answered in the
    batch's order and equal to direct calls; a failing merged call is retried per request."""
    from service.batcher import DefendJob
    from service.engine import Engine
    from service.purify import ProjectionConfig
    from tests.test_batcher import Picky, images

    engine = Engine(tiny_registry, "cpu")
    a = DefendJob("mnist", "classifier_A", "defense-gan", ProjectionConfig(steps=3, restarts=2), 1)
    b = DefendJob("mnist", "classifier_A", "defense-gan", ProjectionConfig(steps=3, restarts=2), 2)
    picky = Picky()
    xs = [images(1, 0), images(2, 1), images(1, 2)]
    blank, grey = torch.zeros(1, 1, 28, 28), torch.full((1, 1, 28, 28), 0.5)
    work = [(a, xs[0]), (b, xs[1]), (a, xs[2]), (picky, blank), (picky, grey)]
    items = [ray_app.Work(job, x, int(x.shape[0])) for job, x in work]
    answers, calls = ray_app.run_batch(engine, items)
    assert [(o.batch_requests, o.batch_images) for o in answers[:3]] == [(2, 2), (1, 2), (2, 2)]
    assert calls == [("defend", 2, 2), ("defend", 1, 2), ("picky", 1, 1)]  # the merged picky call failed
    for answer, job, x in zip(answers[:3], (a, b, a), xs, strict=True):
        direct = engine.defend(x, job.dataset, job.classifier, job.defense, job.cfg, job.seed)
        assert np.array_equal(answer.value.labels, direct.labels)
        assert np.allclose(answer.value.mse, direct.mse, atol=FLOAT_TOL)
    assert isinstance(answers[3], ValueError) and torch.allclose(answers[4].value, torch.tensor([0.5]))


def test_the_config_file_validates_and_builds_the_application() -> None:
    """deploy/ray/serve.yaml passes Ray's own schema, and its import_path with its args builds the application."""
    import yaml
    from pydantic import ValidationError
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    text = (MODELS.parent / "deploy" / "ray" / "serve.yaml").read_text()
    spec = ServeDeploySchema.model_validate(yaml.safe_load(text)).applications[0]
    ingress = import_attr(spec.import_path)(spec.args)._bound_deployment
    engine = ingress.init_args[0]._bound_deployment
    assert (ingress.name, engine.name) == (ray_app.INGRESS, ray_app.ENGINE)
    assert engine.ray_actor_options["num_cpus"] == spec.args["num_cpus"]
    scaling = engine._deployment_config.autoscaling_config
    assert scaling.target_ongoing_requests == spec.args["target_ongoing_requests"] and scaling.max_replicas == 4
    assert engine.init_args[0] == spec.args["settings"] == ingress.init_args[1]
    fixed = ray_app.build_app({"num_replicas": 3, "num_gpus": 0.25})._bound_deployment.init_args[0]._bound_deployment
    assert fixed.num_replicas == 3 and fixed.ray_actor_options["num_gpus"] == 0.25
    assert fixed._deployment_config.autoscaling_config is None
    with pytest.raises(ValidationError, match="num_cpu"):
        ray_app.build_app({"num_cpu": 1})  # a misspelt argument is an error, not a default
