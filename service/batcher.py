"""Micro-batching in front of one `Engine`: concurrent requests with the same job key become one engine call.

    await batcher.submit(job, images)        → Outcome(value = this request's slice of the batch result, stats)
    await batcher.defend(images, "mnist", "classifier_A", "defense-gan", cfg)  → DefendResult (a shortcut)
    await batcher.purify(images, "mnist", cfg)                                 → PurifyResult (purify-only)
    await batcher.call(fn, *args)            → fn(*args) run on the engine worker, unbatched (attacks, anything)

A job key is a frozen dataclass (`DefendJob`, `PurifyJob`, or your own with `op`, `run`, `split`): requests with
equal keys are concatenated along the batch axis, up to `max_batch_size` images, waiting at most `max_wait_ms`
for a batch to fill (or 10 % of the previous batch's compute time when that is longer), counted from the later of
the oldest request's arrival and the worker becoming free, so that clients answered by one batch can join the next
instead of forming a second, half-size cohort. The engine runs on ONE worker thread per batcher (one batcher per
device), never in the event loop. At most `max_queue` requests wait; beyond that `submit` raises `QueueFull` (HTTP 503
with Retry-After). Each request has a timeout (queue wait + compute) and raises `RequestTimeout` past it.

With a fixed seed, a batch gives exactly the per-request results: every image of a projection gets the same noise
draws (see service.purify.initial_latents), so batching changes throughput, not answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from service.engine import DefendResult, Engine
from service.metrics import Metrics
from service.purify import ProjectionConfig

log = logging.getLogger(__name__)

FILL_FRACTION = 0.1  # a batch may wait this fraction of the previous batch's compute time to fill


class QueueFull(RuntimeError):
    """The batcher's queue is full; retry after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: float) -> None:
        super().__init__(f"the service is busy ({depth} requests queued); retry later")
        self.retry_after = retry_after


class NotRunning(RuntimeError):
    """The batcher is not started, or is shutting down (HTTP 503)."""


class RequestTimeout(TimeoutError):
    """A request waited and ran longer than its timeout."""


class Job(Protocol):
    """A batch key: hashable, names its operation, runs a batch on the engine and splits the result."""

    @property
    def op(self) -> str: ...

    def run(self, engine: Engine, x: torch.Tensor) -> Any: ...

    def split(self, out: Any, bounds: list[tuple[int, int]]) -> list[Any]: ...


@dataclass
class PurifyResult:
    """Purified images of one request, with per-image MSE and the detector's decision when one is calibrated."""

    images: torch.Tensor  # N×1×28×28 in [0, 1]
    z: torch.Tensor  # N×latent
    mse: np.ndarray  # N
    restart_mse: np.ndarray  # N×R
    threshold: float | None
    fpr: float | None
    flagged: np.ndarray | None  # N bools
    steps: int
    restarts: int
    init: str
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DefendJob:
    """Classify, purifying first unless defense == "none" (then `cfg` and `seed` must be None)."""

    dataset: str
    classifier: str
    defense: str
    cfg: ProjectionConfig | None = None
    seed: int | None = None

    @property
    def op(self) -> str:
        return "classify" if self.defense == "none" else "defend"

    def run(self, engine: Engine, x: torch.Tensor) -> DefendResult:
        return engine.defend(x, self.dataset, self.classifier, self.defense, self.cfg, self.seed)

    def split(self, out: DefendResult, bounds: list[tuple[int, int]]) -> list[DefendResult]:
        def cut(a: Any, i: int, j: int) -> Any:
            return None if a is None else a[i:j]

        return [
            DefendResult(
                out.labels[i:j],
                out.probs[i:j],
                cut(out.purified, i, j),
                cut(out.mse, i, j),
                cut(out.flagged, i, j),
                out.threshold,
                out.timings_ms,
                out.steps,
                out.restarts,
            )
            for i, j in bounds
        ]

    def record(self, metrics: Metrics, out: DefendResult) -> None:
        if self.defense != "none":
            init = self.cfg.init if self.cfg else "random"
            metrics.observe_purification(self.dataset, init, len(out.labels), out.steps)
        if out.flagged is not None:
            n = int(out.flagged.sum())
            metrics.observe_flags(self.dataset, n, len(out.flagged) - n)


@dataclass(frozen=True)
class PurifyJob:
    """Project onto the dataset's generator range only (no classifier): for /v1/purify, /v1/detect, the proxy."""

    dataset: str
    cfg: ProjectionConfig
    seed: int | None = None

    op = "purify"

    def run(self, engine: Engine, x: torch.Tensor) -> PurifyResult:
        t = time.perf_counter()
        p = engine.purify(x, self.dataset, self.cfg, seed=self.seed)
        ms = (time.perf_counter() - t) * 1e3
        det = engine.registry.detector(self.dataset, self.cfg.init)
        mse = p.mse.numpy()
        return PurifyResult(
            p.images,
            p.z,
            mse,
            p.restart_mse.numpy(),
            det.threshold if det else None,
            det.fpr if det else None,
            (mse > det.threshold) if det else None,
            self.cfg.steps,
            self.cfg.restarts,
            self.cfg.init,
            {"purify_ms": ms},
        )

    def split(self, out: PurifyResult, bounds: list[tuple[int, int]]) -> list[PurifyResult]:
        return [
            PurifyResult(
                out.images[i:j],
                out.z[i:j],
                out.mse[i:j],
                out.restart_mse[i:j],
                out.threshold,
                out.fpr,
                None if out.flagged is None else out.flagged[i:j],
                out.steps,
                out.restarts,
                out.init,
                out.timings_ms,
            )
            for i, j in bounds
        ]

    def record(self, metrics: Metrics, out: PurifyResult) -> None:
        metrics.observe_purification(self.dataset, self.cfg.init, len(out.mse), out.steps)
        if out.flagged is not None:
            n = int(out.flagged.sum())
            metrics.observe_flags(self.dataset, n, len(out.flagged) - n)


class _CallJob:
    """An arbitrary function run alone on the worker (never merged: every instance is its own key)."""

    op = "call"

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def run(self, engine: Engine, x: torch.Tensor | None) -> Any:
        return self.fn(*self.args)

    def split(self, out: Any, bounds: list[tuple[int, int]]) -> list[Any]:
        return [out]


@dataclass
class Outcome:
    """One request's share of a batch, with the batch's statistics."""

    value: Any
    batch_images: int
    batch_requests: int
    queue_ms: float
    compute_ms: float


@dataclass
class _Item:
    job: Any
    x: torch.Tensor | None
    n: int
    future: asyncio.Future[Outcome]
    enqueued: float


class Batcher:
    """Collects requests per job key and runs them as batches on one engine worker thread."""

    def __init__(
        self,
        engine: Engine,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        timeout_s: float = 120.0,
        metrics: Metrics | None = None,
        name: str = "cpu",
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0 or timeout_s <= 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_ms >= 0, timeout_s > 0")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1e3
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.name = name
        self._queue: deque[_Item] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._last_batch_s = 0.0
        self._free_since = 0.0

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            return
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mg-engine-{self.name}")
        self._task = asyncio.create_task(self._schedule(), name=f"mg-batcher-{self.name}")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(NotRunning("the service is shutting down"))
        self._set_depth()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        """Requests waiting (not yet handed to the worker)."""
        return len(self._queue)

    # -- submitting ---------------------------------------------------------------------------------
    async def submit(self, job: Any, x: torch.Tensor | None, timeout: float | None = None) -> Outcome:
        """Queue `x` (N×1×28×28) under `job`; wait for this request's share of its batch."""
        if not self.running or self._wake is None:
            raise NotRunning("the batcher is not running")
        if len(self._queue) >= self.max_queue:
            if self.metrics:
                self.metrics.rejected.inc()
            raise QueueFull(len(self._queue), retry_after=max(1.0, self._last_batch_s * 2))
        n = 0 if x is None else int(x.shape[0])
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(job, x, n, fut, time.perf_counter()))
        self._set_depth()
        self._wake.set()
        try:
            return await asyncio.wait_for(fut, timeout if timeout is not None else self.timeout_s)
        except TimeoutError as exc:
            if self.metrics:
                self.metrics.timeouts.inc()
            raise RequestTimeout(f"the request took longer than {timeout or self.timeout_s:g} s") from exc
        finally:
            if fut.cancelled():
                self._set_depth()

    async def defend(
        self,
        x: torch.Tensor,
        dataset: str,
        classifier: str,
        defense: str,
        cfg: ProjectionConfig | None = None,
        seed: int | None = None,
    ) -> DefendResult:
        if defense == "none":
            cfg, seed = None, None
        return (await self.submit(DefendJob(dataset, classifier, defense, cfg, seed), x)).value

    async def purify(
        self, x: torch.Tensor, dataset: str, cfg: ProjectionConfig, seed: int | None = None
    ) -> PurifyResult:
        return (await self.submit(PurifyJob(dataset, cfg, seed), x)).value

    async def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """Run fn(*args) on the engine worker thread, in turn with the batches (for work that must not overlap)."""
        return (await self.submit(_CallJob(fn, args), None, timeout)).value

    # -- the scheduler ------------------------------------------------------------------------------
    def _set_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._queue))

    def _pending_images(self, job: Any) -> int:
        return sum(it.n for it in self._queue if it.job == job and not it.future.done())

    def _take(self, job: Any) -> list[_Item]:
        """Remove and return the oldest requests of `job` that fit in one batch (the first always does)."""
        taken: list[_Item] = []
        rest: deque[_Item] = deque()
        images = 0
        batchable = not isinstance(job, _CallJob)
        for it in self._queue:
            if it.future.done():
                continue
            if it.job == job and (not taken or (batchable and images + it.n <= self.max_batch_size)):
                taken.append(it)
                images += it.n
            else:
                rest.append(it)
        self._queue = rest
        self._set_depth()
        return taken

    async def _schedule(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            while self._queue and self._queue[0].future.done():
                self._queue.popleft()
                self._set_depth()
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._queue[0]
            if not isinstance(head.job, _CallJob):
                # wait for the batch to fill from the later of the oldest arrival and the worker becoming free:
                # clients answered by the last batch get max_wait to send their next request and join this one
                # (adaptive: up to 10 % of the last batch's compute time when that is longer than max_wait)
                window = max(self.max_wait_s, FILL_FRACTION * self._last_batch_s)
                deadline = max(head.enqueued, self._free_since) + window
                while self._pending_images(head.job) < self.max_batch_size and not head.future.done():
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), remaining)
                    except TimeoutError:
                        break
            batch = self._take(head.job)
            if batch:
                await self._run(loop, head.job, batch)
                self._free_since = time.perf_counter()

    async def _run(self, loop: asyncio.AbstractEventLoop, job: Any, batch: list[_Item]) -> None:
        assert self._executor is not None
        xs = [it.x for it in batch if it.x is not None]
        x = (xs[0] if len(xs) == 1 else torch.cat(xs)) if xs else None
        started = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executor, job.run, self.engine, x)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
            if len(batch) > 1:  # one request's problem must not fail the others: retry each alone
                for it in batch:
                    await self._run(loop, job, [it])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        self._last_batch_s = seconds
        bounds, i = [], 0
        for it in batch:
            bounds.append((i, i + it.n))
            i += it.n
        parts = job.split(out, bounds)
        for it, part in zip(batch, parts, strict=True):
            if not it.future.done():
                it.future.set_result(Outcome(part, i, len(batch), (started - it.enqueued) * 1e3, seconds * 1e3))
        if self.metrics:
            self.metrics.observe_batch(job.op, i, len(batch), seconds)
            record = getattr(job, "record", None)
            if record is not None:
                record(self.metrics, out)
