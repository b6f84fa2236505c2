"""The one exception → HTTP status table, for /v1 (the app's handlers) and /v2 (its routes).

    answer(exc, oip=False) -> Answer | None      # None: not a request's fault (the caller logs it: 500)

Every error is JSON `{"error": "..."}`; 503 answers carry Retry-After. The Open Inference Protocol answers 400 where
/v1 answers 422 (a bad parameter, a call over the compute budget) and maps any other ValueError to 400.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from service.attacks.runner import AttackRequestError
from service.batcher import NotRunning, OverBudget, QueueFull, RequestTimeout
from service.engine import NotShipped, ParameterError
from service.guard import Throttled
from service.imaging import ImageError
from service.oip import OIPError
from service.proxy import UpstreamError
from service.request import RequestError


@dataclass(frozen=True)
class Answer:
    status: int
    message: str
    headers: dict[str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # more keys of the JSON body


def _invalid(oip: bool) -> int:
    return 400 if oip else 422


def answer(exc: BaseException, oip: bool = False) -> Answer | None:
    """The answer to a request that raised `exc`, or None for an exception no request causes."""
    msg = str(exc)
    if isinstance(exc, RequestError):
        status = _invalid(oip) if exc.status == 422 else exc.status
        return Answer(status, msg, extra={} if oip or exc.detail is None else {"detail": exc.detail})
    if isinstance(exc, OverBudget):
        return Answer(_invalid(oip), msg, extra={"cost": exc.cost, "budget": exc.budget})
    if isinstance(exc, ParameterError | AttackRequestError):
        return Answer(_invalid(oip), msg)
    if isinstance(exc, ImageError | OIPError):
        return Answer(exc.status, msg)
    if isinstance(exc, UpstreamError):
        return Answer(exc.status, exc.message)
    if isinstance(exc, NotShipped):
        return Answer(404, msg)
    if isinstance(exc, Throttled):
        return Answer(429, msg, {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}, {"reason": exc.reason})
    if isinstance(exc, QueueFull):
        return Answer(503, msg, {"Retry-After": str(math.ceil(exc.retry_after))})
    if isinstance(exc, NotRunning):
        return Answer(503, msg, {"Retry-After": "5"})
    if isinstance(exc, RequestTimeout):
        return Answer(504, msg)
    if isinstance(exc, RecursionError):
        return Answer(400, "the request is nested too deeply")
    if isinstance(exc, MemoryError):
        return Answer(413, "the request needs more memory than the server grants one request")
    if oip and isinstance(exc, ValueError):
        return Answer(400, msg)
    return None


# the exception types `answer` knows, for the app's handlers (ValueError only on /v2)
HANDLED: tuple[type[BaseException], ...] = (RequestError, OverBudget, ParameterError, AttackRequestError,
                                             ImageError, OIPError, UpstreamError, NotShipped, QueueFull, NotRunning,
                                             RequestTimeout, Throttled, RecursionError, MemoryError)  # fmt: skip
