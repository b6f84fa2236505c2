"""The service's models and proxy built in this process, for `python -m service.audit` (no HTTP server): the same
lifespan `python -m service` runs, its event loop in a background thread, so the guarded pipelines are the
service's own (the proxy in front, in the same process)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from service.audit.target import Host
from service.config import Settings


@contextmanager
def in_process(settings: Settings) -> Iterator[Host]:
    """A `Host` over a freshly built app state (registry verified, batcher started, proxy client open)."""
    from service.api.app import create_app, lifespan

    app = create_app(settings.model_copy(update={"warm_up": False}))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="audit-host", daemon=True)
    thread.start()
    span = lifespan(app)
    try:
        asyncio.run_coroutine_threadsafe(span.__aenter__(), loop).result(600)
        try:
            yield Host(settings, app.state.models, app.state.proxy, loop)
        finally:
            asyncio.run_coroutine_threadsafe(span.__aexit__(None, None, None), loop).result(120)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
