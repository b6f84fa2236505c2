"""Benchmark of the per-client defences (service.guard), one thread. Prints tables; no asserts.

    python bench/guard.py                              # cost, memory, detect (≈ 1 minute on a 2-core CPU)
    python bench/guard.py --sections cost,memory,redis

Sections
  cost    the detector's cost per 28×28 image: fingerprint alone and a whole in-process `GuardCore.check`, one image
          per call and 64 per call, on a stream index already holding --prefill queries; other sizes for reference.
  memory  tracemalloc of the in-process state at the default settings: the stream index per stored query, and
          MB per 10,000 tracked clients (one query each, and extrapolated to a full `history`).
  detect  the figures that chose the detector's parameters, on 2,000 MNIST test images (data/mnist.npz; else the
          1,000 of the committed slice): benign clients (20 images each, a quarter re-sent: exact, JPEG q75, crop
          1–2 px + resize, +10 %) — how many of their queries match and how many clients are stopped — and Square
          L∞ (ε 0.3, against classifier A's margin) — at which query it is stopped; for window 20 (the authors'
          CIFAR-10 example) and 50 (ours).
  redis   the same `check` with the state in a redis-server started here (when installed): ms per image, and
          Redis memory per stored query.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
# `python bench/guard.py` puts bench/ first on sys.path, where bench/http.py would shadow the standard library's http
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections import defaultdict  # noqa: E402

import numpy as np  # noqa: E402

from service.config import ClientSettings  # noqa: E402
from service.guard import BlacklightConfig, GuardCore, Throttled  # noqa: E402
from service.guard.detector import Fingerprinter  # noqa: E402
from service.guard.state import MemoryState  # noqa: E402
from service.guard.streams import benign_stream, square_queries  # noqa: E402

UNLIMITED = {"rate_per_s": 1e9, "burst": 10**9, "budget": 0}


def mnist(n: int) -> np.ndarray:
    """n MNIST test images, N×1×28×28 in [0, 1] (the full test set when data/ has it, else the slice)."""
    full = ROOT / "data" / "mnist.npz"
    x = np.load(full)["x_test"] if full.exists() else np.load(ROOT / "models" / "mnist" / "test_slice.npz")["x"]
    return (x[:n] / 255.0).astype(np.float32)[:, None]


def per_call_ms(fn, xs: list[np.ndarray], repeats: int = 1) -> float:  # noqa: ANN001
    """Best of `repeats` of calling fn on each of xs, in ms per image."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for x in xs:
            fn(x)
        best = min(best, time.perf_counter() - t)
    return best / sum(len(x) for x in xs) * 1e3


class Clock:
    def __init__(self) -> None:
        self.t = 1_000.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


def cost(prefill: int) -> None:
    x = mnist(2000)
    fp = Fingerprinter(BlacklightConfig(), os.urandom(32))
    singles, batches = [x[i : i + 1] for i in range(500)], [x[i : i + 64] for i in range(0, 1024, 64)]
    core = GuardCore(ClientSettings(**UNLIMITED), clock=Clock())
    rng = np.random.default_rng(0)
    for i in range(prefill):
        core.check(f"prefill-{i % 500}", x[i % len(x)][None] + rng.random((1, 1, 28, 28), np.float32) * 0.3)
    clients = iter(range(10**9))
    print(f"\n[cost] one thread, {platform.processor() or platform.machine()}; stream index holding {prefill:,} "
          "queries; ms per image")  # fmt: skip
    print(f"  {'':38} {'1 per call':>11} {'64 per call':>12}")
    print(f"  {'fingerprint 28×28':38} {per_call_ms(fp, singles, 3):11.3f} {per_call_ms(fp, batches, 3):12.3f}")
    check = lambda a: core.check(f"c{next(clients) % 1000}", a)  # noqa: E731
    print(f"  {'GuardCore.check 28×28 (limits + detect)':38} {per_call_ms(check, singles):11.3f} "
          f"{per_call_ms(check, batches):12.3f}")  # fmt: skip
    for shape in ((3, 32, 32), (3, 224, 224)):
        imgs = [np.random.default_rng(1).random((1, *shape), np.float32) for _ in range(20)]
        print(f"  {'fingerprint ' + '×'.join(map(str, shape)):38} {per_call_ms(fp, imgs, 3):11.3f}")


def traced(fn) -> int:  # noqa: ANN001
    """Bytes still allocated after fn() (tracemalloc; the result of fn is kept alive while measuring)."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    keep = fn()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del keep
    return after - before


def memory() -> None:
    s = ClientSettings(**UNLIMITED)
    cfg = BlacklightConfig()
    stream_bytes = traced(lambda: MemoryState(s, cfg))
    x = mnist(1000)
    fps, digests = Fingerprinter(cfg, os.urandom(32))(x)
    state = MemoryState(s, cfg)

    def one_query_each() -> None:
        for i in range(10_000):
            name = f"ip:10.{i // 65536}.{i // 256 % 256}.{i % 256}"
            state.admit(name, 1, 1.0)
            state.observe(name, fps[i % 1000 : i % 1000 + 1], digests[i % 1000 : i % 1000 + 1], 1.0)

    per_10k = traced(one_query_each)
    full = MemoryState(s, cfg)

    def full_history(clients: int = 20) -> None:
        for c in range(clients):
            for j in range(s.history):
                k = (c * s.history + j) % 1000
                full.observe(f"c{c}", fps[k : k + 1], digests[k : k + 1], 1.0)

    per_full = traced(full_history) / 20
    print(f"\n[memory] in-process, default settings (stream_history {s.stream_history:,}, history {s.history}, "
          f"top_k {cfg.top_k}), tracemalloc")  # fmt: skip
    print(f"  stream index: {stream_bytes / 2**20:.1f} MB preallocated = {stream_bytes / s.stream_history:.0f} B "
          "per stream query")  # fmt: skip
    print(f"  10,000 tracked clients, one query each: {per_10k / 2**20:.1f} MB ({per_10k / 10_000:.0f} B per client)")
    print(f"  a client with a full history ({s.history} queries): {per_full / 2**10:.1f} kB → "
          f"{per_full * 10_000 / 2**20:.0f} MB per 10,000 such clients "
          f"({(per_full - per_10k / 10_000) / (s.history - 1):.0f} B per remembered query)")  # fmt: skip


def margin_loss():  # noqa: ANN201
    """Classifier A's margin (true logit − best other) as Square's loss, or None (a fair coin) without the model."""
    path = ROOT / "models" / "mnist" / "classifier_A.onnx"
    if not path.exists():
        return None
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def make(label: int):  # noqa: ANN202
        def loss(q: np.ndarray) -> float:
            logits = sess.run(None, {name: q[None].astype(np.float32)})[0][0]
            return float(logits[label] - np.delete(logits, label).max())

        return loss

    return make


def keyed(cfg: BlacklightConfig, key: int) -> GuardCore:
    """An unlimited in-process guard whose fingerprint key is `key` (fixed: the run is reproducible)."""
    core = GuardCore(ClientSettings(**UNLIMITED), clock=Clock(), config=cfg)
    core.fingerprint = Fingerprinter(cfg, key.to_bytes(32, "little"))
    return core


def benign_run(core: GuardCore, stream: list) -> tuple[dict[str, list[int]], int, int]:  # noqa: ANN001
    """(matched flags per re-send kind, clients stopped, highest score) of a benign stream."""
    kinds: dict[str, list[int]] = defaultdict(list)
    for client, a, kind in stream:
        before = core.memory.clients.get(client)
        count = before.history.count if before and before.history else 0
        with contextlib.suppress(Throttled):
            core.check(client, a[None])
        kinds[kind].append(core.memory.clients[client].history.count - count)  # type: ignore[union-attr]
    states = core.memory.clients.values()
    return kinds, sum(c.detected_until > 0 for c in states), max(c.history.score for c in states if c.history)


def detect(n_benign: int, attacks: int, queries: int, keys: int) -> None:
    x = mnist(n_benign + attacks)
    labels = np.load(ROOT / "data" / "mnist.npz")["y_test"] if (ROOT / "data" / "mnist.npz").exists() else None
    stream = benign_stream(x[:n_benign], n_benign // 20, np.random.default_rng(0))
    heavy = benign_stream(x[:n_benign], n_benign // 40, np.random.default_rng(1), resend_fraction=0.5)
    make = margin_loss()
    print(f"\n[detect] benign: {n_benign:,} different MNIST test images, {n_benign // 20} clients × 20, a quarter "
          f"re-sent ({len(stream):,} queries); heavy: {n_benign // 40} clients × 40, half re-sent; Square L∞ ε 0.3 "
          f"on {attacks} other images, {'classifier A margin' if make else 'coin'} as loss; {keys} fingerprint "
          "keys (per key: its figure)")  # fmt: skip
    for window in (20, 50):
        cfg = BlacklightConfig(window=window)
        kinds: dict[str, list[int]] = defaultdict(list)
        stopped, top, heavy_stopped = [], [], []
        for key in range(keys):
            k, n, best = benign_run(keyed(cfg, key), stream)
            for kind, flags in k.items():
                kinds[kind] += flags
            stopped.append(n)
            top.append(best)
            heavy_stopped.append(benign_run(keyed(cfg, key), heavy)[1])
        rates = ", ".join(f"{k} {np.mean(v):.1%}" for k, v in sorted(kinds.items()))
        print(f"  window {window}: benign matched: {rates}; clients stopped {stopped} of {n_benign // 20}, highest "
              f"score {top} (K = {cfg.matches}); heavy: clients stopped {heavy_stopped} of "
              f"{n_benign // 40}")  # fmt: skip
        for p_init in (0.05, 0.3, 0.8):
            at = []
            for j in range(attacks):
                i = n_benign + j
                loss = make(int(labels[i])) if make and labels is not None else None
                qs = square_queries(x[i], queries, np.random.default_rng(j), loss, p_init=p_init)
                for key in range(keys):
                    core = keyed(cfg, key)
                    at.append(next((t + 1 for t, q in enumerate(qs) if refused(core, q)), 0))
            print(f"    Square p_init {p_init}: stopped at query {min(at)}–{max(at)}, median {int(np.median(at))} "
                  f"({sum(a == 0 for a in at)} of {len(at)} not within {queries})")  # fmt: skip


def refused(core: GuardCore, q: np.ndarray) -> bool:
    try:
        core.check("attacker", q[None])
        return False
    except Throttled:
        return True


def redis_section(stream: int) -> None:
    if shutil.which("redis-server") is None:
        print("\n[redis] skipped: redis-server is not installed (apt-get install -y redis-server)")
        return
    import redis

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        r = redis.Redis(port=port)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        base = r.info("memory")["used_memory"]
        x = mnist(2000)
        settings = ClientSettings(**UNLIMITED, stream_history=stream)
        core = GuardCore(settings, f"redis://127.0.0.1:{port}/0", clock=Clock())
        rng = np.random.default_rng(0)
        for i in range(0, 2 * stream, 20):  # two stream lengths: the index at its steady state
            noise = rng.random((20, 1, 28, 28), np.float32) * 0.3
            core.check(f"prefill-{i // 20 % 500}", x[np.arange(i, i + 20) % len(x)] + noise)
        used = r.info("memory")["used_memory"] - base
        singles, batches = [x[i : i + 1] for i in range(300)], [x[i : i + 64] for i in range(0, 640, 64)]
        c = iter(range(10**9))
        check = lambda a: core.check(f"c{next(c) % 1000}", a)  # noqa: E731
        one, many = per_call_ms(check, singles), per_call_ms(check, batches)
        version = r.info()["redis_version"]
        print(f"\n[redis] redis-server {version} on loopback: GuardCore.check 28×28 {one:.3f} ms per image (1 per "
              f"call), {many:.3f} ms (64 per call); Redis memory with stream_history {stream:,} after "
              f"{2 * stream:,} queries: {used / 2**20:.1f} MB = {used / stream / 1024:.2f} kB per stream "
              "query")  # fmt: skip
        core.close()
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="cost,memory,detect,redis")
    p.add_argument("--prefill", type=int, default=5000, help="queries stored before timing")
    p.add_argument("--redis-stream", type=int, default=10_000, help="stream_history of the redis section")
    p.add_argument("--benign", type=int, default=2000, help="different benign images (multiple of 40)")
    p.add_argument("--attacks", type=int, default=5, help="images attacked with Square, per p_init")
    p.add_argument("--keys", type=int, default=3, help="fingerprint keys the detect section is run with")
    p.add_argument("--queries", type=int, default=200, help="Square queries simulated per attack")
    a = p.parse_args()
    logging.getLogger("service.guard").setLevel(logging.ERROR)  # one line per detected attacker would swamp the tables
    sections = a.sections.split(",")
    if "cost" in sections:
        cost(a.prefill)
    if "memory" in sections:
        memory()
    if "detect" in sections:
        detect(a.benign, a.attacks, a.queries, a.keys)
    if "redis" in sections:
        redis_section(a.redis_stream)


if __name__ == "__main__":
    main()
