"""Per-client rate limit and query budget, counted in images (a request of N images costs N).

Rate: a token bucket of `burst` images refilled at `rate_per_s`. A request is admitted when the bucket holds
min(N, burst) tokens and then takes all N: the bucket may go into debt, so a batch larger than the burst is served
from a full bucket and the sustained rate still holds (the debt is paid before the next request).
Budget: `budget` images per window of `budget_window_s`, the window starting at the client's first request in it.
Both are checked before either is charged, so a refused request costs nothing. A limit ≤ 0 is off.

The arithmetic here is the in-process one; service.guard.state's Redis script does the same in Lua.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from service.config import ClientSettings
from service.errors import ServiceError

Reason = Literal["rate", "budget", "detected"]


class Throttled(ServiceError):
    """A client is refused for now: 429 with Retry-After (whole seconds, at least 1) and the `reason` in /v1's body."""

    status = 429

    def __init__(self, reason: Reason, retry_after: float, message: str | None = None) -> None:
        self.reason: Reason = reason
        self.retry_after = max(float(retry_after), 0.0)
        super().__init__(
            message or f"{reason} limit exceeded; retry after {self.retry_after:.1f} s",
            headers={"Retry-After": str(max(1, math.ceil(self.retry_after)))},
            reason=reason,
        )


@dataclass(frozen=True)
class Limits:
    rate_per_s: float = 20.0
    burst: int = 128
    budget: int = 20_000
    budget_window_s: float = 86_400.0

    @classmethod
    def from_settings(cls, s: ClientSettings) -> Limits:
        return cls(s.rate_per_s, s.burst, s.budget, s.budget_window_s)


@dataclass(slots=True)
class Allowance:
    """One client's bucket and budget; `ts` and `window_start` are clock seconds (None: never seen)."""

    tokens: float = 0.0
    ts: float | None = None
    used: int = 0
    window_start: float | None = None


def admit(a: Allowance, n: int, now: float, lim: Limits) -> None:
    """Charge n images to `a`, or raise Throttled (and change nothing)."""
    tokens = lim.burst if a.ts is None else min(lim.burst, a.tokens + max(now - a.ts, 0.0) * lim.rate_per_s)
    fresh = a.window_start is None or now >= a.window_start + lim.budget_window_s
    used = 0 if fresh else a.used
    if lim.rate_per_s > 0 and tokens < min(n, lim.burst):
        raise rate_exceeded(n, (min(n, lim.burst) - tokens) / lim.rate_per_s, lim)
    if lim.budget > 0 and used + n > lim.budget:
        start = now if fresh or a.window_start is None else a.window_start
        raise budget_exceeded(n, start + lim.budget_window_s - now, lim)
    a.tokens, a.ts = tokens - n, now
    a.used, a.window_start = used + n, (now if fresh else a.window_start)


def rate_exceeded(n: int, retry_after: float, lim: Limits) -> Throttled:
    return Throttled("rate", retry_after, f"rate limit: {lim.rate_per_s:g} images/s per client (bursts of "
                     f"{lim.burst}); this request has {n} image(s); retry after {retry_after:.2f} s")  # fmt: skip


def budget_exceeded(n: int, retry_after: float, lim: Limits) -> Throttled:
    too_big = f" (a request of {n} images never fits)" if n > lim.budget else ""
    return Throttled("budget", retry_after, f"query budget: {lim.budget:,} images per client per "
                     f"{lim.budget_window_s:g} s used up{too_big}; retry after {retry_after:.0f} s")  # fmt: skip


def detected(retry_after: float) -> Throttled:
    return Throttled("detected", retry_after, "query-based attack detected (many near-identical queries): this "
                     f"client is refused; retry after {retry_after:.0f} s")  # fmt: skip
