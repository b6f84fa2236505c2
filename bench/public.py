"""What the public profile costs on the cheapest path: /v1/classify with defense none (the served default), with the
per-client rate limit and query-attack detector on, against the same server without them, side by side.

    python -m bench.public --requests 2000 --concurrency 8 --clients 200 --rounds 7

Two `python -m service` processes on loopback (the shipped models): one plain, one with MG_PUBLIC=true (the proxy
address trusted, so each request's X-Forwarded-For is its client; rate and budget set high enough that no benign
client is throttled). The same distinct held-out MNIST test images go to both (after an untimed warm-up pass
each), in rounds of one pass each whose order alternates (plain first, then public first, …) so drift in the
machine's load falls on both; each request comes from one of `--clients` identities. Prints
images/s per round, each round's ratio public / plain (the two passes run back to back), their median and range,
and the detector's own cost per image and memory per 10,000 tracked clients (service.guard measured in this
process). No asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import tracemalloc
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.http import png, spawn, wait_ready  # noqa: E402
from service.config import ClientSettings  # noqa: E402
from service.guard import GuardCore  # noqa: E402


def held_out(n: int) -> np.ndarray:
    """n MNIST test images outside the committed slice (test[1000:]) when the dataset is cached, else the slice."""
    cached = ROOT / "data" / "mnist.npz"
    if cached.exists():
        with np.load(cached) as f:
            return f["x_test"][1000 : 1000 + n]
    with np.load(ROOT / "models" / "mnist" / "test_slice.npz") as f:
        return f["x"][:n]


async def run(url: str, bodies: list[bytes], concurrency: int, clients: int) -> tuple[float, int]:
    """(images per second, non-200 answers) for one pass over `bodies`."""
    todo = iter(range(len(bodies)))
    bad = 0

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal bad
        for i in todo:
            who = f"198.51.100.{i % clients % 250 + 1}, 203.0.113.{i % clients // 250 + 1}"
            r = await c.post("/v1/classify", content=bodies[i], headers={"content-type": "image/png",
                                                                         "X-Forwarded-For": who})  # fmt: skip
            bad += r.status_code != 200

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        t = time.perf_counter()
        await asyncio.gather(*[worker(c) for _ in range(concurrency)])
        return len(bodies) / (time.perf_counter() - t), bad


def guard_costs(images: np.ndarray) -> tuple[float, float]:
    """(ms per 28×28 image of GuardCore.check, one image per call; MB per 10,000 tracked clients, one query each)."""
    x = (images[:, None] / 255.0).astype(np.float32)
    core = GuardCore(ClientSettings(rate_per_s=1e9, burst=10**9, budget=10**12))
    t = time.perf_counter()
    for i in range(len(x)):
        core.check(f"c{i}", x[i : i + 1])
    per_image = (time.perf_counter() - t) * 1e3 / len(x)
    core = GuardCore(ClientSettings(rate_per_s=1e9, burst=10**9, budget=10**12, max_clients=10_000))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(10_000):
        core.check(f"m{i}", x[i % len(x) : i % len(x) + 1])
    mb = (tracemalloc.get_traced_memory()[0] - before) / 1e6
    tracemalloc.stop()
    return per_image, mb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000, help="requests per round (distinct images)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args(argv)
    imgs = held_out(a.requests)
    bodies = [png(im) for im in imgs]
    common = {"MG_TORCH_THREADS": "1"}
    public = {"MG_PUBLIC": "true", "MG_CLIENTS__TRUSTED_PROXIES": json.dumps(["127.0.0.1"]),
              "MG_CLIENTS__RATE_PER_S": "1000", "MG_CLIENTS__BURST": "1000",
              "MG_CLIENTS__BUDGET": "1000000"}  # fmt: skip
    servers = {"plain": spawn(ROOT / "models", common), "public": spawn(ROOT / "models", {**common, **public})}
    try:
        for proc, url in servers.values():
            wait_ready(url, proc=proc)
        for _, url in servers.values():  # untimed: first-call costs (allocations, caches) out of round 1
            asyncio.run(run(url, bodies[:100], a.concurrency, a.clients))
        rates: dict[str, list[float]] = {k: [] for k in servers}
        for r in range(a.rounds):
            for name in ("plain", "public") if r % 2 == 0 else ("public", "plain"):  # neither always goes first
                ips, bad = asyncio.run(run(servers[name][1], bodies, a.concurrency, a.clients))
                rates[name].append(ips)
                print(f"round {r + 1} {name:6s} {ips:8.1f} images/s" + (f" ({bad} not 200)" if bad else ""),
                      flush=True)  # fmt: skip
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    plain, pub = float(np.median(rates["plain"])), float(np.median(rates["public"]))
    ratios = np.array(rates["public"]) / np.array(rates["plain"])
    print(f"\nmedian of {a.rounds} rounds, {a.requests} requests, concurrency {a.concurrency}, {a.clients} clients:")
    print(f"  plain {plain:.1f} images/s | public (rate limit + detector) {pub:.1f} images/s")
    print(
        f"  ratio public / plain per round: median {np.median(ratios):.3f} (range {ratios.min():.3f}–"
        f"{ratios.max():.3f})"
    )
    ms, mb = guard_costs(imgs)
    print(f"  guard check (limits + detector) {ms:.3f} ms per 28×28 image; {mb:.1f} MB per 10,000 tracked clients")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
