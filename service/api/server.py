"""Serving the app with uvicorn, with the connection limits a public endpoint needs.

    serve(settings, host, port, log_level)     # what `python -m service` runs

- Slow headers: a connection whose request headers have not all arrived `header_timeout_s` after it opened (or
  after its previous response) is closed; uvicorn's keep-alive timer stops at the first byte, so a client sending a
  byte a minute would otherwise hold its socket for ever. Slow bodies are the app's `EdgeMiddleware`'s (408).
- Graceful shutdown: on SIGTERM/SIGINT uvicorn stops accepting and the batcher drains: it admits nothing more
  (503, and /readyz turns 503), lets queued and running work finish for up to `drain_s`, then answers what is left
  503; uvicorn's own limit (drain_s + 5 s) is the backstop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.config import Settings


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for a request's headers."""

    header_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()

    def _arm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _headers_late(self) -> None:
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # headers incomplete (or none) after the deadline

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)


class Server(uvicorn.Server):
    """uvicorn's server; a shutdown signal also starts the batcher's drain."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_s: float) -> None:
        super().__init__(config)
        self.app, self.drain_s = app, drain_s

    def handle_exit(self, sig: int, frame: Any) -> None:
        batcher = getattr(self.app.state, "batcher", None)
        if batcher is not None and not batcher.draining:
            asyncio.get_event_loop().call_soon_threadsafe(batcher.drain, self.drain_s)
        super().handle_exit(sig, frame)


def serve(settings: Settings, host: str, port: int, log_level: str = "info") -> None:
    from service.api.app import create_app

    app = create_app(settings)
    protocol = type("Guarded", (GuardedH11Protocol,), {"header_timeout_s": settings.header_timeout_s})
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, http=protocol,
                            timeout_keep_alive=int(max(1, settings.keep_alive_s)),
                            timeout_graceful_shutdown=int(settings.drain_s + 5))  # fmt: skip
    Server(config, app, settings.drain_s).run()
