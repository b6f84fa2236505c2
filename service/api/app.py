"""The FastAPI application: one lifespan that builds the app's state, edge limits, one error handler.

    create_app(settings=None) -> FastAPI        # uvicorn "service.api.app:create_app" --factory

The lifespan builds, in order, everything the routes use (`app.state`): the verified registry, the engine, the
batcher, the per-client guard, the upstream client and /v2's model repository, the attacks' substitute cache; then
warms up in the background (/readyz answers 200 after). Start-up refuses to run on a manifest whose files do not
match their sha256 (ManifestError, logged in full). Every error is JSON `{"error": "..."}` with a 4xx/5xx status
(`service.api.errors`); 503 answers carry Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import swagger_ui_bundle
import torch
from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import attack, audits, errors, v1, v2
from service.api.schema import with_caps
from service.attacks.runner import SubstituteCache
from service.batcher import Batcher
from service.config import Settings, get_settings
from service.engine import Engine
from service.errors import ServiceError
from service.guard import Guard
from service.imaging import set_pixel_limit
from service.metrics import Metrics
from service.proxy import ProxyClient
from service.registry import ManifestError, Registry
from service.served import ModelRepository

log = logging.getLogger("service.api")

DOCS_ASSETS = "/docs-assets"
STATIC_URL, STATIC_DIR = "/static", Path(__file__).resolve().parent.parent / "static"  # the page's own files
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
STATE = ("registry", "engine", "batcher", "guard", "proxy", "models", "substitutes")  # what the lifespan builds
CLOSE = {"Connection": "close"}  # a body cut short leaves the connection unusable


class PayloadTooLarge(ServiceError):
    """The body is over `max_upload_bytes` (checked here only, as it streams in)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body exceeds the limit of {limit} bytes", 413, CLOSE)


class BodyTimeout(ServiceError):
    def __init__(self, limit: float) -> None:
        super().__init__(f"the request body did not arrive within {limit:g} s", 408, CLOSE)


class EdgeMiddleware:
    """Caps the request body while it streams in (Content-Length is checked too, but not trusted), gives it
    `body_timeout_s` to arrive (408), and records per-route request counts and latencies."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics, body_timeout_s: float = 30.0) -> None:
        self.app, self.max_bytes, self.metrics, self.body_timeout_s = app, max_bytes, metrics, body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]
        response_started = [False]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                response_started[0] = True
            await send(message)

        received, body_done = [0], [False]
        body_deadline = started + self.body_timeout_s

        async def limited_receive() -> Message:
            if body_done[0]:
                return await receive()  # after the body: waiting for a disconnect, no deadline
            try:
                message = await asyncio.wait_for(receive(), max(0.0, body_deadline - time.perf_counter()))
            except TimeoutError:
                raise BodyTimeout(self.body_timeout_s) from None
            if message["type"] == "http.request":
                received[0] += len(message.get("body", b""))
                if received[0] > self.max_bytes:
                    raise PayloadTooLarge(self.max_bytes)
                body_done[0] = not message.get("more_body", False)
            return message

        oip = errors.is_oip(scope.get("path", ""))
        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                raise PayloadTooLarge(self.max_bytes)
            await self.app(scope, limited_receive, send_wrapper)
        except (PayloadTooLarge, BodyTimeout) as exc:  # raised outside a route (else its handler answered)
            if not response_started[0]:
                await errors.response(exc, oip)(scope, receive, send_wrapper)
        finally:
            self.metrics.observe_request(self._route(scope), scope.get("method", ""), status[0],
                                         time.perf_counter() - started)  # fmt: skip

    @staticmethod
    def _route(scope: Scope) -> str:
        """The route template for the metrics label (plain Starlette routes such as /docs and /openapi.json do not
        put themselves in the scope: match them), or "unmatched"."""
        route = scope.get("route")
        if route is None and "app" in scope:
            router = getattr(scope["app"], "router", None)
            route = next((r for r in getattr(router, "routes", []) if r.matches(scope)[0] == Match.FULL), None)
        return getattr(route, "path", None) or "unmatched"


def _warm(app: FastAPI) -> None:
    """Open every ONNX session and run every generator/encoder once (on the engine worker)."""
    engine: Engine = app.state.engine
    engine.warm_up()


async def _warm_up(app: FastAPI) -> None:
    try:
        if app.state.settings.warm_up:
            await app.state.batcher.call(_warm, app, timeout=600)
            registry: Registry = app.state.registry
            ds = app.state.settings.default_dataset
            if registry.has(f"{ds}/generator"):
                await app.state.batcher.calibrate(ds)  # admission's seconds per generator pass
        app.state.ready = True
        log.info("models warmed up; ready")
    except Exception as exc:  # noqa: BLE001 - reported by /readyz
        app.state.not_ready_reason = f"warm-up failed: {exc!r}"
        log.exception("warm-up failed")


async def _build(app: FastAPI) -> None:
    """Every piece of the app's state, on `app.state` (what `service.api.deps` hands the routes)."""
    s: Settings = app.state.settings
    set_pixel_limit(s.max_image_pixels)
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    try:
        registry = await run_in_threadpool(Registry, s.models_dir, True, s.default_ranking)
    except ManifestError as exc:
        log.error("refusing to start: %s", exc)
        raise
    engine = Engine.from_settings(registry, s)
    batcher = app.state.batcher_factory(engine, s, app.state.metrics)
    await batcher.start()
    app.state.registry, app.state.engine, app.state.batcher = registry, engine, batcher
    app.state.guard = Guard.from_settings(s, app.state.metrics) if s.guarded else None
    app.state.proxy = ProxyClient(s.proxy)
    app.state.models = ModelRepository(batcher, app.state.proxy, s, lambda: batcher.running and app.state.ready,
                                       lambda: app.state.guard)  # fmt: skip
    await app.state.models.load()
    app.state.substitutes = SubstituteCache()  # the black-box attack's trained substitutes, per classifier
    log.info("models from %s verified; engine on %s", s.models_dir, engine.device)


async def _close(app: FastAPI) -> None:
    state = app.state
    state.ready = False
    if getattr(state, "audits", None) is not None:  # running audits stop and keep what they measured (docs/audit.md)
        await asyncio.to_thread(state.audits.close)
    if state.batcher is not None:
        await state.batcher.stop()
    if state.proxy is not None:
        await state.proxy.aclose()
    if state.guard is not None:
        await state.guard.aclose()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    try:
        await _build(app)
    except BaseException:
        await _close(app)
        raise
    warm = asyncio.create_task(_warm_up(app))
    try:
        yield
    finally:
        warm.cancel()
        await _close(app)


def _offline_docs(app: FastAPI) -> None:
    """/docs: Swagger UI from the swagger-ui-bundle package's files (Apache-2.0), so it renders offline."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Manifold Guard — API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")  # fmt: skip


def _page(app: FastAPI) -> None:
    """GET /: the page (service/static/index.html), its assets under /static. It calls only the public API; the
    Content-Security-Policy lets it reach nothing but this origin (no CDN, no external font, no inline script)."""
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


BatcherFactory = Callable[[Engine, Settings, Metrics], Batcher]


def create_app(settings: Settings | None = None, batcher_factory: BatcherFactory | None = None) -> FastAPI:
    """The service app. `settings` defaults to the environment's (MG_* variables); `batcher_factory` builds what
    the routes submit work to (default: the in-process `Batcher`; Ray Serve's ingress: `service.ray_app`)."""
    settings = settings or get_settings()
    app = FastAPI(
        docs_url=None,  # served below from the package's own Swagger UI files, not a CDN
        redoc_url=None,
        title="Manifold Guard",
        version="0.1.0",
        description="Classify images robustly by projecting them onto a GAN's range (Defense-GAN) first; "
        "purify, detect adversarial inputs, and proxy Open Inference Protocol servers.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.batcher_factory = batcher_factory or Batcher.from_settings
    app.state.metrics = Metrics()
    app.state.ready = False
    app.state.not_ready_reason = "warming up"
    for name in STATE:  # built by the lifespan; None until then (`service.api.deps` answers 503)
        setattr(app.state, name, None)
    _offline_docs(app)
    _page(app)
    app.add_middleware(EdgeMiddleware, max_bytes=settings.max_upload_bytes, metrics=app.state.metrics,
                       body_timeout_s=settings.body_timeout_s)  # fmt: skip
    errors.install(app)
    app.include_router(v1.router)
    app.include_router(v1.ops_router)
    app.include_router(v2.router)
    # a disabled attack endpoint answers 404, so the schema leaves it out
    app.include_router(attack.router, include_in_schema=settings.attack.enabled)
    app.include_router(audits.router, include_in_schema=bool(settings.audit.api_keys))  # docs/audit.md; keyed
    _schema_with_caps(app, settings)
    return app


def _schema_with_caps(app: FastAPI, settings: Settings) -> None:
    """/openapi.json carries this server's caps as the bounds of steps, restarts and images (`schema.with_caps`)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        doc = generate()
        return with_caps(doc, settings) if fresh else doc

    app.openapi = openapi  # type: ignore[method-assign]
