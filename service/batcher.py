"""Micro-batching in front of one `Engine`: concurrent requests with the same job key become one engine call.

    await batcher.submit(job, images)        → Outcome(value = this request's slice of the batch result, stats)
    await batcher.defend(images, "mnist", "classifier_A", "defense-gan", cfg)  → DefendResult (a shortcut)
    await batcher.purify(images, "mnist", cfg)                                 → PurifyResult (purify-only)
    await batcher.call(fn, *args)            → fn(*args) run on the engine worker, unbatched (warm-up, anything)

A job key is a frozen dataclass (`DefendJob`, `PurifyJob`, or your own with `op`, `run`, `split`, `cost`; with
`alone = True` it is never merged nor waits for a batch to fill: `service.attacks.runner.AttackJob`, `call`):
requests with equal keys are concatenated along the batch axis, up to `max_batch_size` images (from_settings: on a
GPU engine MG_CUDA_BATCH_SIZE, see `service.device.batch_size`), waiting for a batch to fill at most `max_wait_ms`
(or 10 % of the lane's previous batch when that is longer, never more than `max_fill_ms`), counted from the later
of the oldest request's arrival and the worker becoming free.

Two lanes, each with its own queue, worker thread and fill window: `fast` for undefended classification and
MagNet (ONNX and a small autoencoder, milliseconds; its window is `fast_wait_ms`), `slow` for projections, attacks
and calls. A `defense=none` or `magnet` request never waits behind a projection.

Limits, checked at `submit` before anything is queued:
- the compute budget: a request's cost (generator passes, images × steps × restarts) above `max_request_cost`
  raises `OverBudget` (a 4xx that states both numbers);
- admission: at most `max_queue` live requests per lane, and a request whose estimated wait (the queued and
  running cost × the lane's measured seconds per unit) plus its own compute exceeds its timeout raises
  `QueueFull` at once, with that estimate as Retry-After, instead of timing out later.
Deadlines: a caller that times out (or goes) leaves its future cancelled; the scheduler never starts such an item,
and a running batch whose callers are all gone is stopped between two projection steps, or an attack between two
passes of its model (`service.purify.Cancelled`).

With a fixed seed, a batch gives exactly the per-request results: every image of a projection gets the same noise
draws (see service.purify.initial_latents), so batching changes throughput, not answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from service.config import Settings
from service.device import batch_size
from service.engine import PROJECTING, DefendResult, Engine, PurifyResult, Stop
from service.errors import ServiceError
from service.metrics import STAGES, Metrics, observe_stages
from service.purify import Cancelled, ProjectionConfig

log = logging.getLogger(__name__)

FILL_FRACTION = 0.1  # a batch may wait this fraction of the previous batch's compute time to fill
FAST_OPS = ("classify", "reform")  # no projection: undefended classification and MagNet's autoencoder pass
UNIT_EWMA = 0.3  # weight of the newest batch in the lane's seconds-per-cost-unit estimate
ADMIT_MARGIN = 1.25  # admission wants the estimate × this within the timeout (rates drift under load)


class OverBudget(ServiceError, ValueError):
    """A request costs more than the per-request compute budget (422 on /v1, 400 on /v2; both numbers in the
    /v1 body)."""

    status = 422

    def __init__(self, cost: int, budget: int, what: str) -> None:
        super().__init__(f"the request costs {cost:,} generator passes ({what}); the per-request budget is "
                         f"{budget:,} (MG_MAX_REQUEST_COST): send fewer images, steps or restarts",
                         cost=cost, budget=budget)  # fmt: skip
        self.cost, self.budget = cost, budget


def projection_cost(n: int, cfg: ProjectionConfig) -> tuple[int, str]:
    """(generator passes, how they add up) of projecting n images with cfg."""
    return n * max(cfg.steps, 1) * cfg.restarts, f"{n} image(s) × {cfg.steps} steps × {cfg.restarts} restarts"


def fill_window(base_s: float, last_batch_s: float, max_fill_s: float) -> float:
    """How long a batch waits to fill: `base_s`, or 10 % of the previous batch when longer, at most `max_fill_s`."""
    return min(max(base_s, FILL_FRACTION * last_batch_s), max_fill_s)


def concat(xs: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The requests' images as one batch (None when no request carries images)."""
    present = [x for x in xs if x is not None]
    return (present[0] if len(present) == 1 else torch.cat(present)) if present else None


def spans(sizes: list[int]) -> list[tuple[int, int]]:
    """Each request's [start, end) rows in the concatenated batch."""
    out, i = [], 0
    for n in sizes:
        out.append((i, i + n))
        i += n
    return out


def observe_outcome(metrics: Metrics | None, job: Any, out: Outcome) -> None:
    """A request's queue wait and its engine stages (purify, classify) in `mg_stage_seconds`."""
    timings = getattr(out.value, "timings_ms", None) or {}
    ms = {"queue": out.queue_ms, **{STAGES[k]: v for k, v in timings.items() if k in STAGES}}
    observe_stages(metrics, getattr(job, "model", None), ms)


class QueueFull(ServiceError, RuntimeError):
    """The request cannot be served in time (queue full, or the estimated wait exceeds its timeout): 503, retry
    after `retry_after` seconds."""

    status = 503

    def __init__(self, depth: int, retry_after: float, estimate: float | None = None,
                 timeout: float | None = None) -> None:  # fmt: skip
        why = f"{depth} requests queued"
        if estimate is not None and timeout is not None and estimate > timeout:
            why += f"; it would finish in about {estimate:.1f} s, past its {timeout:g} s timeout"
        retry = {"Retry-After": str(math.ceil(retry_after))}
        super().__init__(f"the service is busy ({why}); retry later", headers=retry)
        self.retry_after = retry_after


class NotRunning(ServiceError, RuntimeError):
    """The batcher is not started, or is shutting down."""

    status = 503

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Retry-After": "5"})


class RequestTimeout(ServiceError, TimeoutError):
    """A request waited and ran longer than its timeout."""

    status = 504


class Job(Protocol):
    """A batch key: hashable, names its operation, runs a batch on the engine and splits the result."""

    @property
    def op(self) -> str: ...

    def run(self, engine: Engine, x: torch.Tensor, stop: Stop) -> Any: ...

    def split(self, out: Any, bounds: list[tuple[int, int]]) -> list[Any]: ...

    def cost(self, n: int) -> tuple[int, str]: ...


@dataclass(frozen=True)
class DefendJob:
    """Classify, purifying first unless defense == "none" (MagNet: reformed by its autoencoder; `cfg` and `seed`
    are None for both). `classifier` is the one that classifies: the enhanced twin for enhanced-invert-classify
    (`service.request.resolve` names it)."""

    dataset: str
    classifier: str
    defense: str
    cfg: ProjectionConfig | None = None
    seed: int | None = None

    @property
    def op(self) -> str:
        return {"none": "classify", "magnet": "reform"}.get(self.defense, "defend")

    @property
    def model(self) -> str:
        """The metrics' model label."""
        return f"{self.dataset}/{self.classifier}"

    def run(self, engine: Engine, x: torch.Tensor, stop: Stop) -> DefendResult:
        return engine.run_defense(x, self.dataset, self.classifier, self.defense, self.cfg, self.seed, stop)

    def cost(self, n: int) -> tuple[int, str]:
        if self.defense not in PROJECTING:
            return 0, f"{n} image(s), no projection"
        return projection_cost(n, self.cfg or ProjectionConfig())

    def split(self, out: DefendResult, bounds: list[tuple[int, int]]) -> list[DefendResult]:
        return [out.rows(i, j) for i, j in bounds]

    def record(self, metrics: Metrics, out: DefendResult) -> None:
        if self.defense in PROJECTING:
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

    @property
    def model(self) -> str:
        """The metrics' model label: the dataset whose generator purifies."""
        return self.dataset

    def cost(self, n: int) -> tuple[int, str]:
        return projection_cost(n, self.cfg)

    def run(self, engine: Engine, x: torch.Tensor, stop: Stop) -> PurifyResult:
        return engine.purify_result(x, self.dataset, self.cfg, self.seed, stop)

    def split(self, out: PurifyResult, bounds: list[tuple[int, int]]) -> list[PurifyResult]:
        return [out.rows(i, j) for i, j in bounds]

    def record(self, metrics: Metrics, out: PurifyResult) -> None:
        metrics.observe_purification(self.dataset, self.cfg.init, len(out.mse), out.steps)
        if out.flagged is not None:
            n = int(out.flagged.sum())
            metrics.observe_flags(self.dataset, n, len(out.flagged) - n)


class _CallJob:
    """An arbitrary function run alone on the worker (never merged: every instance is its own key)."""

    op = "call"
    alone = True

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args

    def run(self, engine: Engine, x: torch.Tensor | None, stop: Stop) -> Any:
        return self.fn(*self.args)

    def split(self, out: Any, bounds: list[tuple[int, int]]) -> list[Any]:
        return [out]

    def cost(self, n: int) -> tuple[int, str]:
        return 0, "a call (its own caps apply)"


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
    cost: int
    future: asyncio.Future[Outcome]
    enqueued: float
    deadline: float


@dataclass
class _Running:
    """The batch a lane's worker is computing."""

    started: float
    estimate_s: float
    cancel: threading.Event
    batch: list[_Item]


class _Lane:
    """One queue, one worker thread, one fill window and one cost estimate."""

    def __init__(self, name: str, wait_s: float) -> None:
        self.name = name
        self.wait_s = wait_s  # the fill window's base (10 % of the last batch when longer, up to max_fill)
        self.queue: deque[_Item] = deque()
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task[None] | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.last_batch_s = 0.0
        self.free_since = 0.0
        self.unit_s: float | None = None  # measured seconds per cost unit (None until a costed batch ran)
        self.running: _Running | None = None

    def live(self) -> list[_Item]:
        return [it for it in self.queue if not it.future.done()]

    def estimated_wait(self) -> float:
        """Seconds until a request queued now would start: the queued cost plus what is left of the running batch."""
        if self.unit_s is None:
            return 0.0
        wait = sum(it.cost for it in self.live()) * self.unit_s
        if self.running is not None:
            wait += max(0.0, self.running.estimate_s - (time.perf_counter() - self.running.started))
        return wait

    def abandon(self, why: str) -> None:
        """Fail every waiting and running request with NotRunning(why) and stop the running batch."""
        if self.running is not None:
            self.running.cancel.set()
            for it in self.running.batch:
                if not it.future.done():
                    it.future.set_exception(NotRunning(why))
        while self.queue:
            item = self.queue.popleft()
            if not item.future.done():
                item.future.set_exception(NotRunning(why))

    def learn(self, cost: int, seconds: float) -> None:
        if cost > 0:
            per = seconds / cost
            self.unit_s = per if self.unit_s is None else (1 - UNIT_EWMA) * self.unit_s + UNIT_EWMA * per


class Batcher:
    """Collects requests per job key and runs them as batches on one worker thread per lane."""

    def __init__(
        self,
        engine: Engine,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        timeout_s: float = 120.0,
        metrics: Metrics | None = None,
        name: str = "cpu",
        max_request_cost: int | None = None,
        max_fill_ms: float = 50.0,
        fast_wait_ms: float | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0 or timeout_s <= 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_ms >= 0, timeout_s > 0")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1e3
        self.max_fill_s = max(max_fill_ms, max_wait_ms) / 1e3
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self.max_request_cost = max_request_cost
        self.metrics = metrics
        self.name = name
        fast_s = self.max_wait_s if fast_wait_ms is None else fast_wait_ms / 1e3
        self.lanes = {"fast": _Lane("fast", fast_s), "slow": _Lane("slow", self.max_wait_s)}
        self.draining = False

    @classmethod
    def from_settings(cls, engine: Engine, s: Settings, metrics: Metrics | None = None) -> Batcher:
        return cls(engine, batch_size(s, engine.device), s.max_wait_ms, s.max_queue, s.request_timeout_s, metrics,
                   name=str(engine.device), max_request_cost=s.max_request_cost, max_fill_ms=s.max_fill_ms,
                   fast_wait_ms=s.fast_wait_ms)  # fmt: skip

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.running:
            return
        for lane in self.lanes.values():
            lane.wake = asyncio.Event()
            lane.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"mg-{lane.name}-{self.name}")
            lane.task = asyncio.create_task(self._schedule(lane), name=f"mg-batcher-{lane.name}-{self.name}")

    async def stop(self) -> None:
        """Fail what waits with NotRunning, stop the running batches at their next step, free the workers."""
        for lane in self.lanes.values():
            if lane.task is None:
                continue
            lane.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lane.task
            lane.task = None
            lane.abandon("the service is shutting down")
            if lane.executor is not None:
                lane.executor.shutdown(wait=False, cancel_futures=True)
                lane.executor = None
        self._set_depth()

    def drain(self, limit_s: float) -> None:
        """Begin a graceful shutdown (call in the event loop): admit nothing more (503), let the queued and running
        work finish for up to `limit_s`, then answer what is left 503 and stop its batches."""
        self.draining = True
        self._set_depth()

        def abandon() -> None:
            for lane in self.lanes.values():
                lane.abandon(f"the service is shutting down: not finished within the {limit_s:g} s drain limit")

        asyncio.get_running_loop().call_later(limit_s, abandon)

    @property
    def running(self) -> bool:
        """Started, not stopped, not draining: it admits work."""
        return not self.draining and all(lane.task is not None and not lane.task.done() for lane in self.lanes.values())

    @property
    def depth(self) -> int:
        """Requests waiting (not yet handed to a worker) whose callers still wait."""
        return sum(len(lane.live()) for lane in self.lanes.values())

    def lane_of(self, job: Any) -> _Lane:
        return self.lanes["fast" if getattr(job, "op", None) in FAST_OPS else "slow"]

    async def calibrate(self, dataset: str) -> None:
        """Run one small projection batch through the slow lane so admission has a measured rate from the first
        request on (warm-up does it). The server's own job: the per-request budget does not apply to it."""
        x = torch.full((8, *self.engine.registry.spec(dataset).shape), 0.5)
        job = PurifyJob(dataset, ProjectionConfig(steps=5, restarts=4), seed=0)
        await self.submit(job, x, timeout=600, budget=False)

    # -- submitting ---------------------------------------------------------------------------------
    def check_budget(self, job: Any, n: int, budget: bool = True) -> int:
        """The request's cost (generator passes of 28×28 gray images: a larger image counts as its value count over
        784, `DatasetSpec.cost`), or OverBudget above `max_request_cost` (`budget` False: never)."""
        cost, what = job.cost(n) if hasattr(job, "cost") else (0, "")
        dataset = getattr(job, "dataset", None)
        scale = self.engine.registry.spec(dataset).cost if cost and isinstance(dataset, str) else 1.0
        if scale != 1.0:
            c, h, w = self.engine.registry.spec(dataset).shape  # type: ignore[arg-type]
            cost, what = math.ceil(cost * scale), f"{what}, × {scale:.2f} for {c}×{h}×{w} images"
        if budget and self.max_request_cost is not None and cost > self.max_request_cost:
            raise OverBudget(cost, self.max_request_cost, what)
        return int(cost)

    def admit(self, job: Any, n: int, timeout: float, budget: bool = True) -> tuple[_Lane, int]:
        """(lane, cost) for a request, or OverBudget (unless `budget` is False) / QueueFull before anything is
        queued."""
        cost = self.check_budget(job, n, budget)
        lane = self.lane_of(job)
        live = len(lane.live())
        wait = lane.estimated_wait()
        own = cost * (lane.unit_s or 0.0)
        # until a costed batch has run, the lane cannot estimate: it admits one batch's worth of costed work
        unmeasured = (
            cost > 0 and lane.unit_s is None and sum(it.n for it in lane.live() if it.cost) >= self.max_batch_size
        )
        if live >= self.max_queue or (wait + own) * ADMIT_MARGIN > timeout or unmeasured:
            if self.metrics:
                self.metrics.rejected.inc()
            raise QueueFull(live, retry_after=max(1.0, wait, 2 * lane.last_batch_s), estimate=wait + own,
                            timeout=timeout)  # fmt: skip
        return lane, cost

    async def submit(self, job: Any, x: torch.Tensor | None, timeout: float | None = None,
                     budget: bool = True) -> Outcome:  # fmt: skip
        """Queue `x` (N×1×28×28) under `job`; wait for this request's share of its batch (`budget` False: the
        per-request budget does not apply, for the server's own jobs)."""
        if not self.running:
            raise NotRunning("the service is shutting down" if self.draining else "the batcher is not running")
        timeout = timeout if timeout is not None else self.timeout_s
        n = 0 if x is None else int(x.shape[0])
        lane, cost = self.admit(job, n, timeout, budget)
        assert lane.wake is not None
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        now = time.perf_counter()
        lane.queue.append(_Item(job, x, n, cost, fut, now, now + timeout))
        self._set_depth()
        lane.wake.set()
        try:
            out = await asyncio.wait_for(fut, timeout)
        except TimeoutError as exc:
            if self.metrics:
                self.metrics.timeouts.inc()
            raise RequestTimeout(f"the request took longer than {timeout:g} s") from exc
        finally:
            if fut.cancelled():
                self._set_depth()
        observe_outcome(self.metrics, job, out)
        return out

    async def defend(
        self,
        x: torch.Tensor,
        dataset: str,
        classifier: str,
        defense: str,
        cfg: ProjectionConfig | None = None,
        seed: int | None = None,
    ) -> DefendResult:
        if defense not in PROJECTING:
            cfg, seed = None, None
        return (await self.submit(DefendJob(dataset, classifier, defense, cfg, seed), x)).value

    async def purify(
        self, x: torch.Tensor, dataset: str, cfg: ProjectionConfig, seed: int | None = None
    ) -> PurifyResult:
        return (await self.submit(PurifyJob(dataset, cfg, seed), x)).value

    async def call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """Run fn(*args) on the slow lane's worker thread, in turn with the projections (work that must not
        overlap them)."""
        return (await self.submit(_CallJob(fn, args), None, timeout)).value

    # -- the scheduler ------------------------------------------------------------------------------
    def _set_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(self.depth)

    def _pending_images(self, lane: _Lane, job: Any) -> int:
        return sum(it.n for it in lane.queue if it.job == job and not it.future.done())

    def _take(self, lane: _Lane, job: Any) -> list[_Item]:
        """Remove and return the oldest live requests of `job` that fit in one batch (the first always does);
        requests whose callers are gone are dropped."""
        taken: list[_Item] = []
        rest: deque[_Item] = deque()
        images = 0
        batchable = not getattr(job, "alone", False)
        for it in lane.queue:
            if it.future.done():
                continue
            if it.job == job and (not taken or (batchable and images + it.n <= self.max_batch_size)):
                taken.append(it)
                images += it.n
            else:
                rest.append(it)
        lane.queue = rest
        self._set_depth()
        return taken

    async def _fill(self, lane: _Lane, head: _Item) -> None:
        """Wait for the head's batch to fill, from the later of its arrival and the worker becoming free: clients
        answered by the last batch get a moment to send their next request and join this one."""
        assert lane.wake is not None
        window = fill_window(lane.wait_s, lane.last_batch_s, self.max_fill_s)
        deadline = max(head.enqueued, lane.free_since) + window
        while self._pending_images(lane, head.job) < self.max_batch_size and not head.future.done():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            lane.wake.clear()
            try:
                await asyncio.wait_for(lane.wake.wait(), remaining)
            except TimeoutError:
                return

    async def _schedule(self, lane: _Lane) -> None:
        assert lane.wake is not None
        loop = asyncio.get_running_loop()
        while True:
            while lane.queue and lane.queue[0].future.done():
                lane.queue.popleft()
                self._set_depth()
            if not lane.queue:
                lane.wake.clear()
                await lane.wake.wait()
                continue
            head = lane.queue[0]
            if not getattr(head.job, "alone", False):
                await self._fill(lane, head)
            batch = self._take(lane, head.job)
            if batch:
                await self._run(loop, lane, head.job, batch)
                lane.free_since = time.perf_counter()

    def _late(self, lane: _Lane, batch: list[_Item]) -> list[_Item]:
        """The batch without the requests it could not finish before their deadlines at the lane's current rate:
        those get 503 now (admitted on an earlier, faster rate) instead of a 504 after the work."""
        if lane.unit_s is None:
            return batch
        done_at = time.perf_counter() + sum(it.cost for it in batch) * lane.unit_s
        keep = []
        for it in batch:
            if done_at > it.deadline and it.cost > 0:
                if self.metrics:
                    self.metrics.rejected.inc()
                it.future.set_exception(
                    QueueFull(
                        len(lane.queue),
                        retry_after=max(1.0, lane.estimated_wait()),
                        estimate=done_at - it.enqueued,
                        timeout=it.deadline - it.enqueued,
                    )
                )
            else:
                keep.append(it)
        return keep

    async def _run(self, loop: asyncio.AbstractEventLoop, lane: _Lane, job: Any, batch: list[_Item]) -> None:
        assert lane.executor is not None
        batch = self._late(lane, batch)
        if not batch:
            return
        x = concat([it.x for it in batch])
        cost = sum(it.cost for it in batch)
        cancel = threading.Event()

        def gone(_: asyncio.Future[Outcome]) -> None:
            if all(it.future.done() for it in batch):
                cancel.set()  # every caller has its answer or has gone: a projection still running stops

        for it in batch:
            it.future.add_done_callback(gone)
        started = time.perf_counter()
        lane.running = _Running(started, cost * (lane.unit_s or 0.0), cancel, batch)
        try:
            out = await loop.run_in_executor(lane.executor, job.run, self.engine, x, cancel.is_set)
        except Cancelled:
            log.info("%s batch of %d request(s) cancelled: its callers are gone", job.op, len(batch))
            if self.metrics:
                self.metrics.cancelled.inc()
            return
        except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
            if len(batch) > 1:  # one request's problem must not fail the others: retry each alone
                for it in batch:
                    await self._run(loop, lane, job, [it])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        finally:
            lane.running = None
        seconds = time.perf_counter() - started
        lane.last_batch_s = seconds
        lane.learn(cost, seconds)
        bounds = spans([it.n for it in batch])
        i = bounds[-1][1]
        parts = job.split(out, bounds)
        for it, part in zip(batch, parts, strict=True):
            if not it.future.done():
                it.future.set_result(Outcome(part, i, len(batch), (started - it.enqueued) * 1e3, seconds * 1e3))
        if self.metrics:
            self.metrics.observe_batch(job.op, i, len(batch), seconds)
            record = getattr(job, "record", None)
            if record is not None:
                record(self.metrics, out)
