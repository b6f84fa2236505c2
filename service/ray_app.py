"""Ray Serve: the service's own FastAPI app as the ingress, the engine as a batched, autoscaled deployment.

    pip install -e '.[ray]'
    serve run deploy/ray/serve.yaml                       # a local cluster (`serve deploy` onto a running one)
    serve.run(build_app({"num_replicas": 2}))             # from Python

Two deployments; `python -m service` (one process, `service.batcher`) stays the default and imports none of this.
- `ingress` serves `service.api.app.create_app` (the same routes, validation, caps and errors) with a `RayBatcher`:
  the compute budget is checked there (`Batcher.check_budget`), then each request goes to the engine deployment's
  lane of the in-process batcher (`fast` for defense=none and magnet, `slow` for projections). Attacks
  (`service.attacks.runner.AttackJob`) and warm-up calls (`Batcher.call`) go through the ingress replica's own
  in-process lanes: admitted, timed out and cancelled there as in the single process.
- `engine` holds an `Engine` per replica on the replica's share of the machine (`num_cpus`, `num_gpus`, fractions
  allowed). Its lanes are `@serve.batch` methods: a batch's requests are grouped by their job key (`DefendJob`,
  `PurifyJob`: dataset, classifier, defense, steps, restarts, init, seed) and each group runs as one engine call,
  split back by `job.split`, as the in-process batcher merges. With a fixed seed the answers equal the single
  process's. The fill window adapts as there (`service.batcher.fill_window`); a started batch runs to its end.
Autoscaling follows the engine's ongoing requests (`target_ongoing_requests`); `num_replicas` fixes the count.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, NamedTuple

import torch
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from service.api.app import BatcherFactory, create_app
from service.batcher import (
    Batcher,
    DefendJob,
    NotRunning,
    Outcome,
    PurifyJob,
    QueueFull,
    RequestTimeout,
    concat,
    fill_window,
    observe_outcome,
    spans,
)
from service.config import Settings
from service.engine import Engine
from service.metrics import Metrics
from service.registry import Registry

ENGINE, INGRESS = "engine", "ingress"  # deployment names (a config file's `deployments:` overrides use them)


class Work(NamedTuple):
    """One request for the engine: its job key, its images, and its weight in a batch (its images, counted at most
    max_batch_size: a larger request still runs, alone, as in the in-process batcher)."""

    job: Any
    x: torch.Tensor | None
    weight: int


def _weight(items: list[Work]) -> int:
    return sum(w.weight for w in items)


def _never() -> bool:
    return False


def run_group(engine: Engine, job: Any, xs: list[torch.Tensor | None], calls: list[tuple[str, int, int]]) -> list[Any]:
    """One engine call for the requests of one job key (appended to `calls` as (op, requests, images)): each
    request's Outcome, or the exception it raised (a failing merged call is retried request by request, so one bad
    request cannot fail the others)."""
    started = time.perf_counter()
    bounds = spans([0 if x is None else int(x.shape[0]) for x in xs])
    try:
        out = job.run(engine, concat(xs), _never)
    except Exception as exc:  # noqa: BLE001 - handed back to the caller, re-raised by the ingress
        if len(xs) > 1:
            return [a for x in xs for a in run_group(engine, job, [x], calls)]
        return [exc]
    ms = (time.perf_counter() - started) * 1e3
    calls.append((job.op, len(xs), bounds[-1][1]))
    return [Outcome(part, bounds[-1][1], len(xs), 0.0, ms) for part in job.split(out, bounds)]


def run_batch(engine: Engine, items: list[Work]) -> tuple[list[Any], list[tuple[str, int, int]]]:
    """The answers to a `@serve.batch` batch, in its order, and the engine calls made: requests with equal job keys
    run as one call."""
    groups: dict[Any, list[int]] = {}
    for i, w in enumerate(items):
        groups.setdefault(w.job, []).append(i)
    answers: list[Any] = [None] * len(items)
    calls: list[tuple[str, int, int]] = []
    for job, idx in groups.items():
        for i, answer in zip(idx, run_group(engine, job, [items[i].x for i in idx], calls), strict=True):
            answers[i] = answer
    return answers, calls


@serve.deployment(name=ENGINE)
class EngineDeployment:
    """An `Engine` per replica; two batched lanes, `fast` (defense=none, magnet) and `slow` (projections)."""

    def __init__(self, overrides: dict[str, Any]) -> None:
        s = Settings(**overrides)
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        self.engine = Engine.from_settings(Registry(s.models_dir, ranking=s.default_ranking), s)
        if s.warm_up:
            self.engine.warm_up()  # before the replica takes requests: Ray waits for the constructor
        self.wait_s = {"fast": s.fast_wait_ms / 1e3, "slow": s.max_wait_ms / 1e3}
        self.max_fill_s = max(s.max_fill_ms, s.max_wait_ms) / 1e3
        for lane, wait in self.wait_s.items():
            getattr(self, lane).set_max_batch_size(s.max_batch_size)
            getattr(self, lane).set_batch_wait_timeout_s(wait)
        self.calls: Counter[tuple[str, str, int, int]] = Counter()  # (lane, op, requests, images) → engine calls

    @serve.batch(batch_size_fn=_weight)
    async def fast(self, items: list[Work]) -> list[Any]:
        return await self._run("fast", items)

    @serve.batch(batch_size_fn=_weight)
    async def slow(self, items: list[Work]) -> list[Any]:
        return await self._run("slow", items)

    async def _run(self, lane: str, items: list[Work]) -> list[Any]:
        started = time.perf_counter()
        answers, calls = await asyncio.to_thread(run_batch, self.engine, items)
        window = fill_window(self.wait_s[lane], time.perf_counter() - started, self.max_fill_s)
        getattr(self, lane).set_batch_wait_timeout_s(window)
        self.calls.update((lane, *c) for c in calls)
        return answers

    def stats(self) -> dict[str, Any]:
        """The replica's device and its engine calls so far: [lane, op, requests, images, how many such calls]."""
        return {"device": str(self.engine.device), "calls": [[*k, n] for k, n in sorted(self.calls.items())]}


async def _result(response: DeploymentResponse) -> Any:
    return await response


REMOTE = (DefendJob, PurifyJob)  # the jobs the engine deployment runs: data-only keys, pickled to the replicas


class RayBatcher(Batcher):
    """The ingress's batcher: the budget is checked here, `DefendJob`s and `PurifyJob`s are batched by the engine
    deployment; any other job (attacks, `call`s such as warm-up) runs on this replica's own lanes, as in the single
    process."""

    handle: DeploymentHandle | None = None
    remote = 0  # requests sent to the engine and not yet answered

    @property
    def depth(self) -> int:
        return super().depth + self.remote

    async def submit(self, job: Any, x: torch.Tensor | None, timeout: float | None = None,
                     budget: bool = True) -> Outcome:  # fmt: skip
        if not isinstance(job, REMOTE):
            return await super().submit(job, x, timeout, budget)
        if not self.running or self.handle is None:
            raise NotRunning("the service is shutting down" if self.draining else "the batcher is not running")
        timeout = self.timeout_s if timeout is None else timeout
        n = 0 if x is None else int(x.shape[0])
        self.check_budget(job, n, budget)
        if self.remote >= self.max_queue:
            raise self._full()
        response = getattr(self.handle, self.lane_of(job).name).remote(Work(job, x, min(n, self.max_batch_size)))
        answer = await self._await(response, timeout)
        if isinstance(answer, BaseException):
            raise answer
        if self.metrics:
            job.record(self.metrics, answer.value)
        observe_outcome(self.metrics, job, answer)
        return answer  # type: ignore[no-any-return]

    async def _await(self, response: DeploymentResponse, timeout: float) -> Any:
        """The engine's answer; queue_ms is the round trip less the compute."""
        started = time.perf_counter()
        self.remote += 1
        self._set_depth()
        try:
            answer = await asyncio.wait_for(_result(response), timeout)
        except TimeoutError as exc:
            response.cancel()
            if self.metrics:
                self.metrics.timeouts.inc()
            raise RequestTimeout(f"the request took longer than {timeout:g} s") from exc
        except BackPressureError as exc:
            raise self._full() from exc
        finally:
            self.remote -= 1
            self._set_depth()
        if isinstance(answer, Outcome):
            answer.queue_ms = max(0.0, (time.perf_counter() - started) * 1e3 - answer.compute_ms)
        return answer

    def _full(self) -> QueueFull:
        if self.metrics:
            self.metrics.rejected.inc()
        return QueueFull(self.remote, retry_after=1.0)


def ray_batcher(handle: DeploymentHandle) -> BatcherFactory:
    """A `create_app` batcher factory whose batchers send work to `handle` (the engine deployment)."""

    def build(engine: Engine, s: Settings, metrics: Metrics) -> Batcher:
        b = RayBatcher.from_settings(engine, s, metrics)
        assert isinstance(b, RayBatcher)
        b.handle = handle
        return b

    return build


@serve.deployment(name=INGRESS)
@serve.ingress()
class Ingress:
    """`service.api.app.create_app` on Ray Serve's HTTP proxy, its batcher the engine deployment."""

    def __init__(self, engine: DeploymentHandle, overrides: dict[str, Any]) -> None:
        self._engine, self._overrides = engine, overrides

    def __serve_build_asgi_app__(self) -> FastAPI:
        # the engine replicas warm up in their constructors; the ingress's own engine (attacks) starts cold on CPU
        s = Settings(**{**self._overrides, "warm_up": False, "device": "cpu"})
        return create_app(s, batcher_factory=ray_batcher(self._engine))


class RayArgs(BaseModel):
    """`build_app`'s arguments (a config file's `args:`)."""

    model_config = ConfigDict(extra="forbid")

    settings: dict[str, Any] = Field(default_factory=dict, description="Settings fields over each replica's MG_* env")
    num_cpus: float = Field(1.0, ge=0, description="CPUs per engine replica (fractions allowed)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per engine replica (0.25: four replicas share one GPU)")
    num_replicas: int | None = Field(None, ge=1, description="a fixed replica count; None: autoscale")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(16.0, gt=0, description="per engine replica, what autoscaling aims at")
    max_ongoing_requests: int = Field(
        64, ge=1, description="per engine replica; ≥ max_batch_size, or batches stay small"
    )
    ingress_num_cpus: float = Field(0.5, ge=0)
    ingress_replicas: int = Field(1, ge=1)
    ingress_max_ongoing_requests: int = Field(256, ge=1)


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The application: `serve run service.ray_app:build_app num_replicas=2`, or a config file's import_path."""
    a = RayArgs.model_validate(args or {})
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": a.num_cpus, "num_gpus": a.num_gpus},
        "max_ongoing_requests": a.max_ongoing_requests,
    }
    if a.num_replicas is not None:
        opts["num_replicas"] = a.num_replicas
    else:
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "target_ongoing_requests": a.target_ongoing_requests}  # fmt: skip
    engine = EngineDeployment.options(**opts).bind(a.settings)
    return Ingress.options(num_replicas=a.ingress_replicas, ray_actor_options={"num_cpus": a.ingress_num_cpus},
                           max_ongoing_requests=a.ingress_max_ongoing_requests).bind(engine, a.settings)  # fmt: skip
