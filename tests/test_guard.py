"""service.guard: client identity, rate limit and budget (an injected clock, no sleeps), the Blacklight detector
(Square stopped within a few dozen queries, benign clients with realistic re-sends not stopped, identities spread
over by an attacker stopped), memory caps, two guards sharing a real redis-server and falling back when it dies, the
async facade, and Chen et al.'s similarity detector."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from service.config import ClientSettings, Settings
from service.guard import BlacklightConfig, Fingerprinter, Guard, GuardCore, Throttled, client_id
from service.guard.streams import benign_stream, square_queries
from service.metrics import Metrics
from training.similarity import SimilarityDetector, pixels

ROOT = Path(__file__).resolve().parent.parent
OPEN = {"rate_per_s": 1e9, "burst": 10**9, "budget": 0}  # limits out of the way of detector tests


@pytest.fixture(scope="module")
def mnist() -> np.ndarray:
    """The committed slice: 1,000 MNIST test images, N×1×28×28 in [0, 1]."""
    return (np.load(ROOT / "models" / "mnist" / "test_slice.npz")["x"] / 255.0).astype(np.float32)[:, None]


class Clock:
    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def core(clock: Clock | None = None, url: str | None = None, metrics: Metrics | None = None, **kw: object) -> GuardCore:
    return GuardCore(ClientSettings(**{**OPEN, **kw}), url, metrics, clock=clock or Clock())  # type: ignore[arg-type]


def first_refusal(g: GuardCore, client: str, queries: list[np.ndarray]) -> tuple[int, Throttled | None]:
    """(1-based index of the first refused query, its exception), or (0, None)."""
    for i, q in enumerate(queries):
        try:
            g.check(client, q[None])
        except Throttled as e:
            return i + 1, e
    return 0, None


# identity


def test_api_key_is_the_client_hashed_never_raw() -> None:
    a = client_id({"X-API-Key": "s3cret-key"}, "10.0.0.1", [])
    assert a.startswith("key:") and "s3cret" not in a
    assert a == client_id({"x-api-key": "s3cret-key"}, "192.168.1.9", [])  # the key, wherever it comes from
    assert a != client_id({"X-API-Key": "other"}, "10.0.0.1", [])


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "expected"),
    [
        ("203.0.113.7", None, [], "ip:203.0.113.7"),
        ("203.0.113.7", "1.2.3.4", [], "ip:203.0.113.7"),  # an untrusted peer's header is ignored
        ("10.0.0.2", "1.2.3.4", ["10.0.0.0/8"], "ip:1.2.3.4"),
        ("10.0.0.2", "6.6.6.6, 1.2.3.4", ["10.0.0.0/8"], "ip:1.2.3.4"),  # spoofed left entries ignored
        ("10.0.0.2", "1.2.3.4, 10.0.0.9", ["10.0.0.0/8"], "ip:1.2.3.4"),  # trusted hops skipped from the right
        ("10.0.0.2", "1.2.3.4, garbage", ["10.0.0.2"], "ip:10.0.0.2"),  # a malformed hop: nothing left of it
        ("::ffff:10.0.0.2", "2001:db8::1", ["10.0.0.2"], "ip:2001:db8::1"),
        (None, "1.2.3.4", ["10.0.0.0/8"], "ip:unknown"),
    ],
)
def test_forwarded_for_trusted_only_from_trusted_proxies(peer: str | None, xff: str | None, trusted: list[str],
                                                         expected: str) -> None:  # fmt: skip
    assert client_id({"X-Forwarded-For": xff} if xff else {}, peer, trusted) == expected


# rate limit and budget


def test_token_bucket_counts_images_and_says_when_to_retry() -> None:
    clock = Clock()
    g = core(clock, rate_per_s=2.0, burst=4, budget=0, detector=False)
    g.check("c", np.zeros((3, 1, 8, 8)))
    g.check("c", np.zeros((1, 1, 8, 8)))
    with pytest.raises(Throttled) as e:
        g.check("c", np.zeros((1, 1, 8, 8)))
    assert (e.value.reason, e.value.status, e.value.retry_after) == ("rate", 429, pytest.approx(0.5))
    assert "2 images/s" in str(e.value) and "retry after 0.50 s" in str(e.value)
    g.check("other", np.zeros((4, 1, 8, 8)))  # per client
    clock.t += 0.5
    g.check("c", np.zeros((1, 1, 8, 8)))
    # a batch above the burst is served from a full bucket, and its debt is paid before the next request
    clock.t += 10
    g.check("c", np.zeros((6, 1, 8, 8)))
    with pytest.raises(Throttled) as e:
        g.check("c", np.zeros((1, 1, 8, 8)))
    assert e.value.retry_after == pytest.approx(1.5)  # from −2 tokens to 1


def test_budget_per_window_and_refusals_charge_nothing() -> None:
    clock = Clock()
    g = core(clock, rate_per_s=1.0, burst=5, budget=8, budget_window_s=100.0, detector=False)
    g.check("c", np.zeros((5, 1, 8, 8)))
    with pytest.raises(Throttled):
        g.check("c", np.zeros((1, 1, 8, 8)))  # rate: must not spend budget
    clock.t += 10
    g.check("c", np.zeros((3, 1, 8, 8)))  # 8 of 8
    clock.t += 10
    with pytest.raises(Throttled) as e:
        g.check("c", np.zeros((1, 1, 8, 8)))
    assert e.value.reason == "budget" and e.value.retry_after == pytest.approx(80.0)
    assert "8 images per client per 100 s" in str(e.value)
    clock.t += 80
    g.check("c", np.zeros((2, 1, 8, 8)))  # a new window


# the detector


def test_fingerprints_of_any_shape_keyed_and_exact_repeats_identical(mnist: np.ndarray) -> None:
    cfg = BlacklightConfig()
    fp = Fingerprinter(cfg, b"k" * 32)
    rng = np.random.default_rng(0)
    for shape in ((1, 28, 28), (3, 32, 32), (3, 5, 4), (1, 1, 1), (3, 64, 48)):
        h, d = fp(rng.random((2, *shape), dtype=np.float32))
        assert h.shape == (2, cfg.top_k) and h.dtype == np.uint32 and d.shape == (2,)
        assert (np.diff(h.astype(np.int64), axis=1) >= 0).all()  # ascending, 0 pads in front
    h1, d1 = fp(mnist[:4])
    h2, d2 = fp(mnist[:4].copy())
    assert (h1 == h2).all() and (d1 == d2).all() and len(set(d1.tolist())) == 4
    assert (np.count_nonzero(h1, axis=1) == cfg.top_k).all()
    other, _ = Fingerprinter(cfg, b"j" * 32)(mnist[:4])
    assert len(np.intersect1d(other[0], h1[0])) < 5  # another key: unrelated hashes


def numpy_fingerprints(fp: Fingerprinter, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The fingerprint as `service.guard.kernels.fingerprints` states it, written with numpy calls."""
    cfg, u64 = fp.cfg, np.uint64
    n = len(x)
    v = np.ascontiguousarray(np.moveaxis(x, 1, -1), dtype=np.float32).reshape(n, -1)
    u = ((np.clip(v, 0, 1) * np.float32(255 / cfg.quant_step)) + fp.salt(v.shape[1])).astype(u64)
    up, down = fp.powers(v.shape[1])
    prefix = np.concatenate([np.zeros((n, 1), u64), np.cumsum(u * up, axis=1, dtype=u64)], axis=1)
    w = min(cfg.window, v.shape[1])
    m = v.shape[1] - w + 1
    h = splitmix((((prefix[:, w:] - prefix[:, :m]) * down[:m])[:, :: cfg.stride]) ^ fp.seed)
    t = np.zeros((n, cfg.top_k), u64)
    for i, row in enumerate(h):
        top = np.unique(row)[-cfg.top_k :]
        t[i, cfg.top_k - len(top) :] = top
    out = (t >> u64(32)).astype(np.uint32)
    out[(t != 0) & (out == 0)] = 1
    return out, splitmix((out.astype(u64) * fp.digest_mult).sum(axis=1, dtype=u64) ^ fp.seed)


def splitmix(z: np.ndarray) -> np.ndarray:
    from service.guard.kernels import SPLITMIX

    z = z + SPLITMIX[0]
    z = (z ^ (z >> np.uint64(30))) * SPLITMIX[1]
    z = (z ^ (z >> np.uint64(27))) * SPLITMIX[2]
    return z ^ (z >> np.uint64(31))


def test_compiled_kernels_compute_what_their_numpy_expressions_state(mnist: np.ndarray) -> None:
    from service.guard import kernels

    rng = np.random.default_rng(1)
    fp = Fingerprinter(BlacklightConfig(), b"k" * 32)
    few_distinct = np.zeros((2, 1, 28, 28), np.float32)  # blank: fewer distinct windows than top_k
    few_distinct[1, 0, 10:12, 3:20] = 1
    for x in (
        mnist[:300],
        few_distinct,
        rng.random((6, 3, 32, 32), dtype=np.float32),
        rng.random((3, 3, 5, 4), dtype=np.float32),
        (rng.random((4, 1, 28, 28)) * 1.4 - 0.2).astype(np.float32),
    ):
        got, want = fp(x), numpy_fingerprints(fp, x)
        assert (got[0] == want[0]).all() and (got[1] == want[1]).all(), x.shape
    rows, _ = fp(mnist[:40])
    rows[5, :20] = 0  # a padded row
    for q in rows[:10]:
        want = np.array([np.isin(r[r != 0], q[q != 0]).sum() for r in rows])
        got = np.array([kernels.shared(r, q) for r in rows])
        assert (got == want).all()
    digests = np.arange(40, dtype=np.uint64)
    for j, digest in ((3, 99), (3, 3), (7, 7), (5, 5)):  # digest 99: row 3 itself under another digest matches
        q = rows[j]
        counts = np.array([np.isin(r[r != 0], q[q != 0]).sum() for r in rows])
        want = bool(((counts > 25) & (digests != digest)).any())
        assert kernels.any_match(rows, digests, q, np.uint64(digest), 25) == want
    assert kernels.any_match(rows, digests, rows[3], np.uint64(99), 25)


def test_square_attack_is_stopped_within_a_few_dozen_queries(mnist: np.ndarray,
                                                             caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    metrics = Metrics()
    clock = Clock()
    g = core(clock, metrics=metrics)
    for j, p_init in enumerate((0.05, 0.05, 0.3)):
        queries = square_queries(mnist[900 + j], 60, np.random.default_rng(j), p_init=p_init)
        with caplog.at_level(logging.WARNING, logger="service.guard"):
            at, e = first_refusal(g, f"attacker-{j}", queries)
        assert 2 <= at <= 40, (p_init, at)
        assert e is not None and e.reason == "detected" and e.retry_after == pytest.approx(3600)
        # still refused while the cooldown lasts, then observed again
        assert first_refusal(g, f"attacker-{j}", queries[at:])[0] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "service.guard"]
    assert len(lines) == 3 and "attacker-2" in lines[2] and "reason matches" in lines[2] and "10 matched" in lines[2]
    value = metrics.registry.get_sample_value
    assert value("mg_query_attacks_detected_total", {"reason": "matches"}) == 3
    assert value("mg_clients_throttled_total", {"reason": "detected"}) == 6


def test_benign_clients_with_realistic_resends_are_not_stopped(mnist: np.ndarray) -> None:
    stream = benign_stream(mnist, 50, np.random.default_rng(0))  # 50 clients × 20 images, a quarter re-sent
    kinds = Counter(kind for _, _, kind in stream)
    assert kinds["original"] == 1000 and all(kinds[k] >= 40 for k in ("exact", "jpeg", "crop", "bright"))
    g = core(Clock())
    stopped = {c for c, a, _ in stream if first_refusal(g, c, [a])[0]}
    assert len(stopped) <= 0.01 * 50, stopped
    scores = [s.history.score for s in g.memory.clients.values() if s.history]
    assert max(scores) < g.config.matches // 2  # far from the limit, not just under it


def test_an_attacker_changing_identity_is_stopped_at_each_new_identitys_first_query(mnist: np.ndarray) -> None:
    g = core(Clock())
    queries = square_queries(mnist[950], 120, np.random.default_rng(5))
    at, _ = first_refusal(g, "first", queries)
    assert 2 <= at <= 40
    for i, q in enumerate(queries[at : at + 8]):  # the attack goes on from new identities
        n, e = first_refusal(g, f"sybil-{i}", [q])
        assert n == 1 and e is not None and e.reason == "detected", i
    # rotating identities before being caught does not reset the count: the score carries over
    g2 = core(Clock())
    queries = square_queries(mnist[960], 120, np.random.default_rng(6))
    refused = next(i for i, q in enumerate(queries) if first_refusal(g2, f"rotating-{i // 4}", [q])[0])
    assert refused < 40


def test_memory_caps_clients_history_and_stream(mnist: np.ndarray) -> None:
    clock = Clock()
    g = core(clock, rate_per_s=1.0, burst=2, max_clients=5, history=8, stream_history=16)
    for i in range(8):
        g.check(f"c{i}", mnist[i : i + 1])
    assert list(g.memory.clients) == [f"c{i}" for i in range(3, 8)]  # the least recently seen evicted
    g.check("c3", mnist[8:9])  # c3 seen again (and its bucket of 2 spent) …
    g.check("c8", mnist[9:10])
    assert "c4" not in g.memory.clients and {"c3", "c5"} <= set(g.memory.clients)
    with pytest.raises(Throttled):
        g.check("c3", mnist[10:11])
    for i in range(5):  # … until it is evicted: then it starts afresh
        g.check(f"d{i}", mnist[20 + i : 21 + i])
    assert "c3" not in g.memory.clients
    g.check("c3", mnist[12:13])
    # history: at most 8 fingerprints per client
    h = core(Clock(), history=8, stream_history=16)
    for i in range(20):
        h.check("many", mnist[100 + i : 101 + i])
    hist = h.memory.clients["many"].history
    assert hist is not None and hist.n == 20 and len(hist.fps) == 8 and len(hist.flags) == 8
    # stream: a near-duplicate of a query 16 queries ago (another client's) no longer matches
    assert h.memory.stream is not None and len(h.memory.stream.fps) == 16
    x = mnist[300:301].copy()
    near = x.copy()
    near[..., 10:14, 10:14] = 1.0 - near[..., 10:14, 10:14]  # a Square-like step
    fresh = core(Clock(), history=8, stream_history=16)
    fresh.check("a", x)
    fresh.check("b", near)
    assert fresh.memory.clients["b"].history.count == 1  # type: ignore[union-attr]
    for i in range(16):
        fresh.check(f"other{i}", mnist[400 + i : 401 + i])
    fresh.check("c", near)
    assert fresh.memory.clients["c"].history.count == 0  # type: ignore[union-attr]


# the shared state: a real redis-server


class RedisServer:
    """A redis-server on a free loopback port, no persistence."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL)  # fmt: skip
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.025)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server() -> object:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server; scripts/setup.sh --dev does)")
    pytest.importorskip("redis", reason="the redis client is not installed (pip install -e '.[state]')")
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def test_two_guards_share_limits_history_and_detection(redis_server: RedisServer, mnist: np.ndarray) -> None:
    clock = Clock()
    g1 = core(clock, redis_server.url, rate_per_s=1.0, burst=10)
    g2 = core(clock, redis_server.url, rate_per_s=1.0, burst=10)
    g1.check("shared", mnist[:6])
    with pytest.raises(Throttled) as e:
        g2.check("shared", mnist[6:12])
    assert e.value.reason == "rate"
    # a Square attack whose queries alternate between the two processes is stopped as if it met one
    a1, a2 = core(clock, redis_server.url), core(clock, redis_server.url)
    queries = square_queries(mnist[901], 60, np.random.default_rng(1))
    at = next((i + 1 for i, q in enumerate(queries) if first_refusal((a1, a2)[i % 2], "attacker", [q])[0]), 0)
    assert 2 <= at <= 40
    for g in (a1, a2):
        with pytest.raises(Throttled) as e:
            g.check("attacker", queries[at][None])
        assert e.value.reason == "detected"
        assert g.health() == {"backend": "redis", "up": True, "error": None}
    assert not a1.memory.clients  # nothing fell back to the in-process state


def test_dead_redis_falls_back_logs_once_and_recovers(redis_server: RedisServer, mnist: np.ndarray,
                                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    clock, metrics = Clock(), Metrics()
    g = core(clock, redis_server.url, metrics, rate_per_s=100.0, burst=100)
    g.check("c", mnist[:2])
    gauge = lambda: metrics.registry.get_sample_value("mg_state_backend_up")  # noqa: E731
    assert g.health()["up"] and gauge() == 1
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="service.guard"):
        for i in range(6):
            clock.t += 0.4  # past retry_s (1 s) now and then: Redis is tried again, still dead
            t = time.perf_counter()
            g.check("c", mnist[10 + i : 11 + i])
            assert time.perf_counter() - t < 0.5
    down = [r for r in caplog.records if r.name == "service.guard"]
    assert len(down) == 1 and "does not answer" in down[0].getMessage()
    health = g.health()
    assert health["backend"] == "redis" and health["up"] is False and "Error" in str(health["error"])
    assert gauge() == 0
    assert "c" in g.memory.clients  # the in-process state took over
    # the fallback still stops an attack
    at, _ = first_refusal(g, "attacker", square_queries(mnist[902], 60, np.random.default_rng(2)))
    assert 2 <= at <= 40
    redis_server.start()
    clock.t += 2
    g.check("c", mnist[20:21])
    assert g.health() == {"backend": "redis", "up": True, "error": None} and gauge() == 1


def test_redis_down_from_the_start(mnist: np.ndarray) -> None:
    pytest.importorskip("redis", reason="the redis client is not installed (pip install -e '.[state]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    g = core(Clock(), f"redis://127.0.0.1:{port}/0")
    g.check("c", mnist[:3])
    assert g.health()["up"] is False


# the async facade


def test_guard_facade_inline_and_threaded(mnist: np.ndarray) -> None:
    settings = Settings(clients=ClientSettings(rate_per_s=1.0, burst=20, budget=100))
    guard = Guard.from_settings(settings, Metrics())

    async def scenario() -> str:
        await guard.check("c", mnist[:2])  # inline
        await guard.check("c", mnist[2:18])  # in a worker thread
        try:
            await guard.check("c", mnist[18:22])
        except Throttled as e:
            return e.reason
        finally:
            await guard.aclose()
        return "admitted"

    assert asyncio.run(scenario()) == "rate"
    assert guard.health() == {"backend": "memory", "up": True, "error": None}
    with pytest.raises(ValueError, match="N×C×H×W"):
        guard.core.check("c", np.zeros((2, 3, 4, 5, 6)))


# Chen, Carlini & Wagner's detector (offline comparison)


def test_similarity_detector_flags_near_duplicates_not_different_images(mnist: np.ndarray) -> None:
    det = SimilarityDetector.calibrate(pixels, mnist[:400], fpr=0.01, k=10)
    assert det.threshold > 0
    benign = [det.observe("benign", a) for a in mnist[400:700]]
    assert sum(benign) <= 0.05 * len(benign)
    attack = [det.observe("attacker", q) for q in square_queries(mnist[950], 40, np.random.default_rng(0))]
    assert any(attack) and attack.index(True) <= 15
    assert det.detections["attacker"] >= 1
