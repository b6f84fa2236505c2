"""The one error type of the service: every refusal a request can cause carries its HTTP status.

    raise ServiceError("no such thing", 404)       # or a subclass that fixes the status
    exc.status_for(oip)                            # the status /v1 or the Open Inference Protocol answers
    exc.headers, exc.extra                         # response headers; more keys of /v1's JSON body

The modules that refuse requests (request, imaging, oip, proxy, engine, batcher, attacks.runner) subclass it and
name their status; `service.api.errors` turns any of them into the JSON answer, for /v1, /v2 and the attack route
alike. Nothing here knows HTTP frameworks. The Open Inference Protocol answers 400 where /v1 answers 422 (a bad
parameter, a call over a cap or the compute budget), and its error body is `{"error": "..."}` alone.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request the service refuses. `status` is the HTTP status (the class's, unless given); `headers` go on the
    response (Retry-After, ...); `extra` are more keys of /v1's JSON body (the Open Inference Protocol's has none)."""

    status: int = 500

    def __init__(self, message: str, status: int | None = None, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:  # fmt: skip
        super().__init__(message)
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})
        self.extra: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}

    @property
    def message(self) -> str:
        return str(self)

    def status_for(self, oip: bool) -> int:
        """The status to answer: the Open Inference Protocol has no 422 (a bad request is a 400 there)."""
        return 400 if oip and self.status == 422 else self.status
