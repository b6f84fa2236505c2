"""Ray Serve (service.ray_app) on this machine: throughput of 1 vs 2 engine replicas, and the latency the Ray path
adds to the single process (`python -m service`), for defense=none and invert-classify.

    python -m bench.ray_replicas --requests 48 --concurrency 8 --sequential 30

Every engine (the single process's and each replica) computes on one torch thread, so 2 replicas have twice the
compute of 1 and the single process matches one replica. The local cluster has as many CPUs as the machine, no
dashboard, no metrics export. Prints the figures with the machine's core count and load average; no asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.overload import free_port, load, pct, png, start  # noqa: E402

DEFENSES = ("none", "invert-classify")
SETTINGS = {"torch_threads": 1, "warm_up": False}  # warmed by requests below (every replica gets some)


def params(defense: str) -> dict[str, str]:
    return {"defense": defense, "model": "mnist/classifier_A"}


def measure(url: str, digit: bytes, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Per defense: (requests/s at `concurrency` clients, p50 ms of sequential requests)."""
    out = {}
    for defense in DEFENSES:
        asyncio.run(load(url, digit, params(defense), args.concurrency, 2 * args.concurrency))  # warm every replica
        wall, _, codes = asyncio.run(load(url, digit, params(defense), args.concurrency, args.requests))
        _, lat, seq_codes = asyncio.run(load(url, digit, params(defense), 1, args.sequential))
        if set(codes) | set(seq_codes) != {200}:
            print(f"  ({defense}: statuses {codes} {seq_codes})", file=sys.stderr)
        out[defense] = (args.requests / wall, pct(lat, 50))
    return out


def single_process(digit: bytes, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    port = free_port()
    env = {f"MG_{k.upper()}": str(v).lower() for k, v in SETTINGS.items()}
    proc = start([sys.executable, "-m", "service", "--port", str(port)], env, f"http://127.0.0.1:{port}", "/readyz")
    try:
        return measure(f"http://127.0.0.1:{port}/v1/classify", digit, args)
    finally:
        proc.terminate()
        proc.wait(30)


def on_ray(digit: bytes, args: argparse.Namespace) -> dict[int, dict[str, tuple[float, float]]]:
    """Per replica count: measure() through Ray Serve's HTTP proxy."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from service.ray_app import build_app

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             _system_config={"enable_metrics_collection": False})  # fmt: skip
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    out = {}
    try:
        for replicas in (1, 2):
            share = (os.cpu_count() or 2) / (replicas + 1)  # the ingress and each replica alike
            app = build_app({"num_replicas": replicas, "num_cpus": share, "ingress_num_cpus": share,
                             "settings": SETTINGS})  # fmt: skip
            serve.run(app, name="bench", route_prefix="/")
            out[replicas] = measure(f"http://127.0.0.1:{port}/v1/classify", digit, args)
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=48, help="requests per throughput run")
    p.add_argument("--concurrency", type=int, default=8, help="clients of a throughput run")
    p.add_argument("--sequential", type=int, default=30, help="one-at-a-time requests for the latency p50")
    args = p.parse_args(argv)
    digit = png(np.load(ROOT / "models" / "mnist" / "test_slice.npz")["x"][0])
    t0 = time.perf_counter()
    single = single_process(digit, args)
    ray_figures = on_ray(digit, args)
    load1, _, _ = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPU cores, load average {load1:.1f} at the end (other jobs share the cores)")
    print(f"{args.requests} requests from {args.concurrency} clients; latency p50 over {args.sequential} sequential")
    print("| defense | 1 replica req/s | 2 replicas req/s | ratio 2/1 | single p50 ms | Ray p50 ms | added ms |")
    print("|---|---|---|---|---|---|---|")
    for d in DEFENSES:
        (r1, ray_p50), (r2, _), (_, one_p50) = ray_figures[1][d], ray_figures[2][d], single[d]
        added = ray_p50 - one_p50
        print(f"| {d} | {r1:.1f} | {r2:.1f} | {r2 / r1:.2f} | {one_p50:.1f} | {ray_p50:.1f} | {added:+.1f} |")
    print(f"(took {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
