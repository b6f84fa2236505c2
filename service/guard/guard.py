"""The one object the routes call: `await guard.check(client, images)` admits a request or raises Throttled (429).

    guard = Guard.from_settings(settings, metrics)
    await guard.check(client_id(request.headers, peer, settings.clients.trusted_proxies), x)   # x: N×C×H×W
    guard.health()       → {"backend": "redis", "up": False, "error": "..."} for /readyz's body
    await guard.aclose()

`check` applies, in order: the detected-client refusal, the rate limit and the budget (N images, nothing charged
when refused), then — with `clients.detector` — Blacklight on the images (service.guard.detector). `GuardCore` is
the same, synchronous (tests drive it without asyncio, with their own clock).

With `state_url` the state is in Redis and shared by processes. When Redis does not answer (timeouts of 50 ms, so a
dead Redis cannot stall a request) the call runs on the in-process state instead: `check` never raises anything but
Throttled, the outage is logged once, `mg_state_backend_up` drops to 0, and Redis is tried again after `retry_s`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from service.config import ClientSettings, Settings
from service.guard import kernels, limits
from service.guard.detector import BlacklightConfig, Fingerprinter, Verdict
from service.guard.limits import Throttled
from service.guard.state import MemoryState, RedisState
from service.metrics import Metrics

log = logging.getLogger("service.guard")

INLINE_IMAGES = 16  # in-process checks of up to this many images run on the event loop (≈ 0.03 ms per image)
REDIS_ERRORS: tuple[type[BaseException], ...] = (OSError,)
try:  # redis is the optional `state` extra
    import redis

    REDIS_ERRORS = (redis.RedisError, OSError)
except ImportError:  # pragma: no cover
    pass


def as_images(x: Any) -> np.ndarray:
    """An N×C×H×W float32 array (H×W and C×H×W are one image)."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim in (2, 3):
        a = a.reshape((1,) * (4 - a.ndim) + a.shape)
    if a.ndim != 4 or 0 in a.shape[1:]:
        raise ValueError(f"expected images N×C×H×W, got shape {a.shape}")
    return a


class GuardCore:
    """Synchronous guard: limits, detector, backend choice and fallback. Thread-safe."""

    def __init__(self, settings: ClientSettings, state_url: str | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time, config: BlacklightConfig | None = None,
                 timeout_s: float = 0.05, retry_s: float = 1.0) -> None:  # fmt: skip
        self.settings, self.metrics, self.clock, self.retry_s = settings, metrics, clock, retry_s
        self.config = config or BlacklightConfig(matches=settings.detector_matches)
        self.memory = MemoryState(settings, self.config)
        self.redis = RedisState(state_url, settings, self.config, timeout_s) if state_url else None
        self.fingerprint = Fingerprinter(self.config, os.urandom(32))
        kernels.warm()
        self.lock, self.mark_lock = threading.Lock(), threading.Lock()  # the in-process state; backend changes
        self.up, self.error, self.retry_at, self.shared_key = True, None, 0.0, False
        self.set_gauge()

    def check(self, client: str, x: Any) -> None:
        """Admit `x` (N images) for `client`, or raise Throttled."""
        x = as_images(x)
        now = self.clock()
        try:
            self.run("admit", client, len(x), now)
            if self.settings.detector:
                self.detect(client, x, now)
        except Throttled as e:
            if self.metrics is not None:
                self.metrics.throttled.labels(e.reason).inc()
            raise

    def detect(self, client: str, x: np.ndarray, now: float) -> None:
        fingerprint = self.fingerprint
        verdict: Verdict = self.run("observe", client, *fingerprint(x), now)
        if fingerprint is not self.fingerprint:  # Redis's shared key arrived meanwhile: hash again with it
            verdict = self.run("observe", client, *self.fingerprint(x), now)
        if verdict.detected:
            log.warning("query attack detected: client %s, reason %s, %d matched queries; refused for %.0f s",
                        client, verdict.reason, verdict.score, self.settings.cooldown_s)  # fmt: skip
            if self.metrics is not None:
                self.metrics.attacks.labels(verdict.reason or "matches").inc()
            raise limits.detected(self.settings.cooldown_s)

    def run(self, op: str, *args: Any) -> Any:
        """`op` on Redis when it answers, else on the in-process state."""
        if self.redis is not None and (self.up or self.clock() >= self.retry_at):
            try:
                if not self.shared_key or not self.up:  # first contact, or back after an outage (maybe emptied)
                    key = self.redis.secret()
                    if key != self.fingerprint.key:
                        self.fingerprint = Fingerprinter(self.config, key)
                    self.shared_key = True
                out = getattr(self.redis, op)(*args)
                self.mark(None)
                return out
            except REDIS_ERRORS as e:
                self.mark(e)
        with self.lock:
            return getattr(self.memory, op)(*args)

    def mark(self, error: BaseException | None) -> None:
        """Record the backend answering (error None) or not; log each change once."""
        if error is None and self.up:
            return
        with self.mark_lock:
            if error is None and not self.up:
                log.warning("state backend redis answers again: per-client state shared again")
            elif error is not None:
                self.retry_at = self.clock() + self.retry_s
                if self.up:
                    log.warning("state backend redis does not answer (%s): per-client state in this process until "
                                "it does", error)  # fmt: skip
            self.up, self.error = error is None, None if error is None else f"{type(error).__name__}: {error}"
            self.set_gauge()

    def set_gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.state_up.set(1 if self.up else 0)

    def health(self) -> dict[str, Any]:
        """The state backend as last seen by a call (no I/O here)."""
        if self.redis is None:
            return {"backend": "memory", "up": True, "error": None}
        return {"backend": "redis", "up": self.up, "error": self.error}

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()


class Guard:
    """The async facade of `GuardCore`: small in-process checks run inline, the rest in a worker thread."""

    def __init__(self, core: GuardCore) -> None:
        self.core = core

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None, **kw: Any) -> Guard:
        return cls(GuardCore(settings.clients, settings.state_url, metrics, **kw))

    async def check(self, client: str, x: Any) -> None:
        """Raise Throttled when `client` may not send `x` (N×C×H×W float32 in [0, 1]) now."""
        if self.core.redis is None and len(x) <= INLINE_IMAGES:
            self.core.check(client, x)
        else:
            await asyncio.to_thread(self.core.check, client, x)

    def health(self) -> dict[str, Any]:
        return self.core.health()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.core.close)
