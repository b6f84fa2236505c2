"""service.batcher: merging, batch caps, per-key separation, backpressure, timeouts, error isolation, worker thread.

No test waits on the wall clock: the worker is held on a threading.Event, and a test lets the event loop turn until
the requests it sent are queued (`queued`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from service.batcher import Batcher, DefendJob, OverBudget, PurifyJob, QueueFull, RequestTimeout
from service.engine import Engine
from service.metrics import Metrics
from service.purify import ProjectionConfig
from service.registry import Registry

CFG = ProjectionConfig(steps=3, restarts=2)


@pytest.fixture(scope="module")
def engine(tiny_registry: Registry) -> Engine:
    return Engine(tiny_registry, "cpu")


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def started(engine: Engine, **kw: Any) -> Batcher:
    b = Batcher(engine, **{"max_batch_size": 32, "max_wait_ms": 20, "max_queue": 64, "timeout_s": 60, **kw})
    await b.start()
    return b


async def block(b: Batcher) -> tuple[threading.Event, asyncio.Task[Any]]:
    """Occupy the slow lane's worker until the returned event is set."""
    gate, running = threading.Event(), threading.Event()

    def wait() -> None:
        running.set()
        gate.wait(30)

    task = asyncio.create_task(b.call(wait))
    assert await asyncio.to_thread(running.wait, 30), "the worker never took the blocking call"
    return gate, task


async def until(holds: Callable[[], bool], turns: int = 1_000) -> None:
    """Let the event loop turn until `holds()` (a created task queues its request within a turn or two)."""
    for _ in range(turns):
        if holds():
            return
        await asyncio.sleep(0)  # one turn of the loop, not a wait on the clock
    raise AssertionError("the condition did not hold")


def queued(b: Batcher, n: int) -> Any:
    """Until `n` requests wait in the batcher's queues."""
    return until(lambda: b.depth == n)


def test_concurrent_requests_merge_and_equal_direct_results(engine: Engine) -> None:
    xs = [images(n, i) for i, n in enumerate((1, 2, 1, 3))]
    job = DefendJob("mnist", "classifier_A", "defense-gan", CFG, seed=7)

    async def main() -> list[Any]:
        b = await started(engine, metrics=Metrics())
        gate, blocker = await block(b)  # requests pile up behind the busy worker
        pending = [asyncio.create_task(b.submit(job, x)) for x in xs]
        await queued(b, 4)
        gate.set()
        await blocker
        outs = await asyncio.gather(*pending)
        text = b.metrics.render().decode()  # type: ignore[union-attr]
        await b.stop()
        assert 'mg_batch_size_count{op="defend"} 1.0' in text
        return outs

    outs = run(main())
    assert [o.batch_requests for o in outs] == [4, 4, 4, 4] and outs[0].batch_images == 7
    for x, o in zip(xs, outs, strict=True):
        direct = engine.defend(x, "mnist", "classifier_A", "defense-gan", CFG, seed=7)
        assert np.array_equal(o.value.labels, direct.labels)
        assert np.allclose(o.value.probs, direct.probs, atol=1e-5)
        assert torch.allclose(o.value.purified, direct.purified, atol=1e-5)
        assert np.allclose(o.value.mse, direct.mse, atol=1e-6)


def test_batch_size_cap_and_keys_kept_apart(engine: Engine) -> None:
    a = DefendJob("mnist", "classifier_A", "none")
    p = PurifyJob("mnist", CFG, seed=1)

    async def main() -> list[Any]:
        b = await started(engine, max_batch_size=4)
        gate, blocker = await block(b)
        tasks = [asyncio.create_task(b.submit(a, images(2, i))) for i in range(5)]
        tasks += [asyncio.create_task(b.submit(p, images(1, 10 + i))) for i in range(3)]
        await until(lambda: len(b.lane_of(p).live()) == 3)  # the slow lane's (the fast lane is not held)
        gate.set()
        await blocker
        outs = await asyncio.gather(*tasks)
        await b.stop()
        return outs

    outs = run(main())
    assert all(o.batch_images <= 4 for o in outs)
    assert [o.batch_images for o in outs[:5]] == [4, 4, 4, 4, 2]
    assert [o.batch_requests for o in outs[5:]] == [3, 3, 3]
    assert outs[0].value.probs.shape == (2, 10) and outs[0].value.purified is None
    pr = outs[5].value
    assert pr.images.shape == (1, 1, 28, 28) and pr.mse.shape == (1,) and pr.restart_mse.shape == (1, 2)
    assert pr.threshold == 0.05 and pr.flagged is not None
    direct = engine.purify(images(1, 10), "mnist", CFG, seed=1)
    assert torch.allclose(pr.images, direct.images, atol=1e-5)


SLOW = DefendJob("mnist", "classifier_A", "defense-gan", CFG, seed=0)  # a projection: the slow lane


def test_queue_full_then_recovers(engine: Engine) -> None:
    job = SLOW

    async def main() -> None:
        m = Metrics()
        b = await started(engine, max_queue=2, metrics=m)
        gate, blocker = await block(b)
        waiting = [asyncio.create_task(b.submit(job, images(1, i))) for i in range(2)]
        await queued(b, 2)
        with pytest.raises(QueueFull) as e:
            await b.submit(job, images(1, 9))
        assert e.value.retry_after >= 1
        assert "mg_queue_rejected_total 1.0" in m.render().decode()
        gate.set()
        await blocker
        assert len(await asyncio.gather(*waiting)) == 2
        assert (await b.submit(job, images(1, 3))).value.labels.shape == (1,)
        await b.stop()

    run(main())


def test_timeout_and_the_timed_out_request_is_dropped(engine: Engine) -> None:
    job = SLOW

    async def main() -> None:
        b = await started(engine)
        gate, blocker = await block(b)
        with pytest.raises(RequestTimeout):
            await b.submit(job, images(1, 0), timeout=0.05)
        gate.set()
        await blocker
        out = await b.submit(job, images(2, 1))
        assert out.batch_images == 2  # the expired request was not run with it
        await b.stop()

    run(main())


@dataclass(frozen=True)
class Picky:
    """A job that fails whenever a batch contains an all-zero image."""

    op = "picky"

    def run(self, engine: Engine, x: torch.Tensor, stop: Any) -> torch.Tensor:
        if (x.flatten(1).amax(1) == 0).any():
            raise ValueError("a blank image")
        return x.mean(dim=(1, 2, 3))

    def split(self, out: torch.Tensor, bounds: list[tuple[int, int]]) -> list[torch.Tensor]:
        return [out[i:j] for i, j in bounds]


def test_one_bad_request_does_not_fail_its_batch(engine: Engine) -> None:
    async def main() -> None:
        b = await started(engine)
        gate, blocker = await block(b)
        good = asyncio.create_task(b.submit(Picky(), torch.full((1, 1, 28, 28), 0.5)))
        bad = asyncio.create_task(b.submit(Picky(), torch.zeros(1, 1, 28, 28)))
        await queued(b, 2)
        gate.set()
        await blocker
        assert torch.allclose((await good).value, torch.tensor([0.5]))
        with pytest.raises(ValueError, match="blank"):
            await bad
        await b.stop()

    run(main())


def test_work_runs_on_one_worker_thread_off_the_loop(engine: Engine) -> None:
    async def main() -> set[str]:
        b = await started(engine)
        names = await asyncio.gather(*[b.call(lambda: threading.current_thread().name) for _ in range(4)])
        await b.stop()
        return set(names)

    names = run(main())
    assert len(names) == 1 and next(iter(names)).startswith("mg-slow-")
    assert threading.current_thread().name not in names


def test_stop_fails_waiting_requests_and_submit_needs_start(engine: Engine) -> None:
    async def main() -> None:
        b = await started(engine)
        gate, blocker = await block(b)
        waiting = asyncio.create_task(b.submit(SLOW, images(1, 0)))
        await queued(b, 1)
        await b.stop()
        gate.set()
        with pytest.raises(RuntimeError, match="shutting down"):
            await waiting
        with pytest.raises(RuntimeError, match="not running"):
            await b.submit(DefendJob("mnist", "classifier_A", "none"), images(1, 0))
        blocker.cancel()

    run(main())


# -- lanes, budget, admission, cancellation (hostile and overloaded traffic) ---------------------------------------
def test_undefended_requests_never_wait_behind_a_projection(engine: Engine) -> None:
    async def main() -> None:
        b = await started(engine)
        gate, blocker = await block(b)  # the slow lane's worker is busy
        out = await asyncio.wait_for(b.submit(DefendJob("mnist", "classifier_A", "none"), images(1, 0)), 10)
        assert out.value.labels.shape == (1,) and not blocker.done()
        gate.set()
        await blocker
        await b.stop()

    run(main())


def test_a_request_over_the_compute_budget_is_refused_before_queueing(engine: Engine) -> None:
    async def main() -> None:
        b = await started(engine, max_request_cost=100)
        big = DefendJob("mnist", "classifier_A", "defense-gan", ProjectionConfig(steps=30, restarts=2), seed=0)
        with pytest.raises(OverBudget, match=r"costs 240 generator passes \(4 image\(s\) × 30 steps × 2") as e:
            await b.submit(big, images(4, 0))
        assert e.value.budget == 100 and b.depth == 0
        assert (await b.submit(big, images(1, 0))).value.labels.shape == (1,)  # 60 ≤ 100
        await b.stop()

    run(main())


def test_admission_refuses_at_once_what_cannot_finish_in_time(engine: Engine) -> None:
    async def main() -> None:
        b = await started(engine)
        await b.submit(SLOW, images(2, 0))  # a measured batch: the lane's seconds per generator pass
        lane = b.lane_of(SLOW)
        assert lane.unit_s is not None and lane.unit_s > 0
        gate, blocker = await block(b)
        heavy = DefendJob("mnist", "classifier_A", "defense-gan", ProjectionConfig(steps=200, restarts=4), seed=1)
        ahead = [asyncio.create_task(b.submit(heavy, images(8, i))) for i in range(3)]
        await until(lambda: b.depth + sum(t.done() for t in ahead) == 3)  # each queued, or refused already
        timeout = lane.estimated_wait() / 2  # less than the queue ahead of it needs
        with pytest.raises(QueueFull, match="past its") as e:
            await b.submit(SLOW, images(1, 9), timeout=timeout)
        assert e.value.retry_after >= 1
        for t in ahead:
            t.cancel()
        gate.set()
        await blocker
        await b.stop()

    run(main())


def test_a_timed_out_projection_stops_within_a_step(engine: Engine) -> None:
    async def main() -> None:
        b = await started(engine, metrics=Metrics())
        endless = DefendJob("mnist", "classifier_A", "defense-gan", ProjectionConfig(steps=10**7, restarts=1))
        with pytest.raises(RequestTimeout):
            await b.submit(endless, images(1, 0), timeout=0.3)
        # one worker per lane: the next projection runs only once the endless one (hours of steps) has stopped
        assert (await asyncio.wait_for(b.submit(SLOW, images(1, 1)), 30)).value.labels.shape == (1,)
        assert b.lane_of(endless).running is None
        assert "mg_cancelled_batches_total 1.0" in b.metrics.render().decode()  # type: ignore[union-attr]
        await b.stop()

    run(main())


def test_the_fill_window_is_per_lane_and_bounded(engine: Engine) -> None:
    async def main() -> None:
        b = await started(engine, max_wait_ms=1, max_fill_ms=20)
        b.lanes["slow"].last_batch_s = 1000.0  # as after a very long batch: 10 % would be 100 s
        b.lanes["slow"].free_since = time.perf_counter()
        out = await asyncio.wait_for(b.submit(SLOW, images(1, 0)), 30)
        assert out.queue_ms < 5_000  # bounded by max_fill_ms, not 100 s
        fast = await b.submit(DefendJob("mnist", "classifier_A", "none"), images(1, 0))
        assert fast.queue_ms < 5_000 and b.lanes["fast"].last_batch_s < 1000.0
        await b.stop()

    run(main())


def test_calibration_gives_admission_a_rate_and_unmeasured_lanes_take_one_batch(engine: Engine) -> None:
    async def main() -> None:
        b = await started(engine, max_batch_size=4)
        gate, blocker = await block(b)
        lane = b.lane_of(SLOW)
        waiting = [asyncio.create_task(b.submit(SLOW, images(2, i))) for i in range(2)]  # 4 images: one batch
        await queued(b, 2)
        with pytest.raises(QueueFull):  # no rate measured yet: no more than one batch of costed work
            await b.submit(SLOW, images(1, 5))
        gate.set()
        await blocker
        await asyncio.gather(*waiting)
        c = await started(engine, max_request_cost=10)  # the server's own calibration batch costs more: it runs
        await c.calibrate("mnist")
        assert c.lane_of(SLOW).unit_s is not None and c.lane_of(SLOW).unit_s > 0 and lane.unit_s is not None
        await b.stop()
        await c.stop()

    run(main())
