"""HTTP throughput and latency of /v1/classify against a running server, next to the engine called directly.

    python -m service &                                    # or let the bench start one: --spawn
    python -m bench.http --url http://127.0.0.1:8000 --concurrency 1,4,16,32 --requests 64 --steps 50 --restarts 4

For each concurrency c: requests/s, p50 and p99 latency, the mean number of requests the server merged per engine
call (from /metrics), the engine's own throughput on the same images at batch size min(c, max batch) with the same
defense, steps and restarts (measured in this process, server idle), and the ratio HTTP / direct. Prints a table;
no asserts. CPU is shared between the client, the server and the direct run: run it on an otherwise idle machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: keep bench/ off sys.path, or this file would shadow the stdlib's http
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import asyncio
import io
import os
import re
import subprocess
import time

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.config import Settings  # noqa: E402
from service.engine import Engine  # noqa: E402
from service.purify import ProjectionConfig  # noqa: E402
from service.registry import Registry  # noqa: E402
from training.processes import free_port  # noqa: E402


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def batch_stats(metrics: str, op: str) -> tuple[float, float]:
    """(sum of requests merged, engine calls) of `op` from the mg_batch_requests histogram."""
    s = re.search(rf'mg_batch_requests_sum{{op="{op}"}} (\S+)', metrics)
    c = re.search(rf'mg_batch_requests_count{{op="{op}"}} (\S+)', metrics)
    return (float(s.group(1)) if s else 0.0), (float(c.group(1)) if c else 0.0)


async def load(url: str, images: list[bytes], concurrency: int, total: int, params: dict) -> tuple[float, list[float]]:
    """Send `total` requests from `concurrency` workers; (wall seconds, per-request latencies)."""
    latencies: list[float] = []
    counter = iter(range(total))
    errors = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:
            data = images[i % len(images)]
            t = time.perf_counter()
            r = await client.post("/v1/classify", params=params, content=data, headers={"content-type": "image/png"})
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await client.post("/v1/classify", params=params, content=images[0], headers={"content-type": "image/png"})
        t = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        wall = time.perf_counter() - t
    if errors:
        print(f"  ({errors} requests failed)", file=sys.stderr)
    return wall, latencies


def direct_throughput(engine: Engine, x: torch.Tensor, batch: int, total: int, defense: str, cfg: ProjectionConfig,
                      dataset: str, classifier: str) -> float:  # fmt: skip
    """Images per second of engine.defend at this batch size."""
    engine.defend(x[:batch], dataset, classifier, defense, cfg)  # warm
    n, t = 0, time.perf_counter()
    while n < total:
        engine.defend(x[n % len(x) : n % len(x) + batch], dataset, classifier, defense, cfg)
        n += batch
    return n / (time.perf_counter() - t)


def spawn(models_dir: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m service` (real uvicorn) on a free loopback port with these MG_ settings: (process, base URL)."""
    port = free_port()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # keep carried packages
    full = {**os.environ, "MG_MODELS_DIR": str(models_dir), "PYTHONPATH": path, **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--log-level", "warning"],
                            env=full, cwd=ROOT)  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, timeout_s: float = 180.0, proc: subprocess.Popen | None = None) -> None:
    """Poll /readyz until it answers 200 (warm-up done); TimeoutError past `timeout_s` or if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise TimeoutError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not ready within {timeout_s:g} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--spawn", action="store_true", help="start `python -m service` on a free port for the run")
    p.add_argument("--models-dir", type=Path, default=None, help="models of the direct run (and of --spawn)")
    p.add_argument("--concurrency", default="1,4,16,32")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--defense", default="defense-gan", choices=["none", "defense-gan", "invert-classify"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--restarts", type=int, default=4)
    p.add_argument("--model", default="mnist/classifier_A")
    p.add_argument("--threads", type=int, default=None, help="torch threads (server with --spawn, and direct run)")
    a = p.parse_args(argv)

    settings = Settings(**({"models_dir": a.models_dir} if a.models_dir else {}))
    if a.threads:
        torch.set_num_threads(a.threads)
    dataset, classifier = a.model.split("/")
    with np.load(ROOT / "models" / dataset / "test_slice.npz", allow_pickle=False) as f:
        raw = f["x"][:256]
    images = [png(im) for im in raw]
    x = torch.from_numpy(raw / 255.0).float()[:, None]
    params: dict = {"model": a.model, "defense": a.defense}
    if a.defense != "none":
        params |= {"steps": a.steps, "restarts": a.restarts}

    proc = None
    url = a.url
    if a.spawn:
        proc, url = spawn(settings.models_dir, {"MG_TORCH_THREADS": str(a.threads)} if a.threads else None)
    try:
        wait_ready(url, proc=proc)
        info = httpx.get(url + "/v1/models", timeout=10).json()
        max_batch = int(os.environ.get("MG_MAX_BATCH_SIZE", settings.max_batch_size))
        engine = Engine(Registry(settings.models_dir), "cpu")
        cfg = None
        if a.defense != "none":
            init = "encoder" if a.defense == "invert-classify" else "random"
            cfg = ProjectionConfig(init=init, steps=a.steps, restarts=a.restarts)
        print(f"server {url}  model {a.model}  defense {a.defense}"
              + (f"  steps {a.steps}  restarts {a.restarts}" if cfg else "")
              + f"  torch threads {torch.get_num_threads()}  caps {info['caps']}")  # fmt: skip
        op = "classify" if a.defense == "none" else "defend"
        cols = ("conc", 5), ("reqs", 5), ("req/s", 8), ("p50 ms", 9), ("p99 ms", 9), ("merged", 7), ("direct img/s", 13)
        head = " ".join(f"{name:>{w}}" for name, w in cols) + f" {'ratio':>6}"
        print(head)
        print("-" * len(head))
        for c in [int(v) for v in a.concurrency.split(",")]:
            total = max(a.requests, c)
            before = batch_stats(httpx.get(url + "/metrics").text, op)
            wall, lat = asyncio.run(load(url, images, c, total, params))
            after = batch_stats(httpx.get(url + "/metrics").text, op)
            merged = (after[0] - before[0]) / max(after[1] - before[1], 1)
            rps = total / wall
            batch = min(c, max_batch)
            direct = direct_throughput(engine, x, batch, max(total, batch * 2), a.defense, cfg, dataset, classifier)
            ms = np.array(lat) * 1e3
            print(f"{c:>5} {total:>5} {rps:>8.1f} {np.percentile(ms, 50):>9.1f} {np.percentile(ms, 99):>9.1f} "
                  f"{merged:>7.1f} {direct:>13.1f} {rps / direct:>6.2f}")  # fmt: skip
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
