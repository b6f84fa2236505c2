"""Open Inference Protocol (KServe V2 REST) routes: find the model by name, call it, shape the answer.

The models are `service.served`'s objects: our own (`{dataset}-{classifier}`, defended per the request parameters
`defense`, `steps`, `restarts`, `seed`; version "1"), every allow-listed upstream (purified here, classified
there), and the TorchServe-style raw upstreams behind `POST /predictions/{name}` (image bytes in, the purified 28×28
PNG forwarded, purification details in `X-Purification-*` headers). Request bodies may come gzip- or
deflate-compressed; infer answers are compressed when the caller's Accept-Encoding asks. Every error is
`{"error": "..."}` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from service import oip
from service.api import errors, schema
from service.api.deps import get_caller
from service.batcher import Batcher
from service.config import Settings, get_settings
from service.proxy import ProxyClient
from service.served import Model, ModelRepository, RawUpstream

log = logging.getLogger(__name__)
SERVER = {"name": "manifold-guard", "version": "0.1.0", "extensions": ["binary_tensor_data", "model_repository"]}
INDEX = {"type": "array", "items": {"type": "object", "required": ["name", "state"], "properties": {
    "name": {"type": "string"}, "version": {"type": "string"}, "state": {"type": "string"},
    "reason": {"type": "string"}}}}  # fmt: skip
LIVE = {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}}
READY = {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}}
METADATA_RESPONSES = {200: schema.json_body(schema.MODEL_METADATA, "model metadata"), **schema.errors(404, 502, 504)}
READY_RESPONSES = {200: schema.json_body({**READY, "properties": {"name": {"type": "string"}, **READY["properties"]}},
                                         "ready"), **schema.errors(404, 503)}  # fmt: skip


@dataclass
class _State:
    settings: Settings
    batcher: Batcher
    proxy: ProxyClient
    models: ModelRepository


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The pooled upstream client and the model repository; an engine and batcher too when the app did not
    provide them."""
    settings = getattr(app.state, "settings", None) or get_settings()
    proxy = ProxyClient(settings.proxy)
    own_batcher = None
    if getattr(app.state, "batcher", None) is None:  # standalone router (the app usually provides one)
        from service.engine import Engine
        from service.registry import Registry

        engine = Engine.from_settings(Registry(settings.models_dir), settings)
        own_batcher = Batcher.from_settings(engine, settings)
        await own_batcher.start()
    batcher = getattr(app.state, "batcher", None) or own_batcher
    assert batcher is not None

    def server_ready() -> bool:
        """The engine runs and (inside the full app) warm-up finished."""
        return batcher.running and getattr(app.state, "ready", True) is not False

    models = ModelRepository(batcher, proxy, settings, server_ready, lambda: getattr(app.state, "guard", None))
    await models.load()
    app.state.mg_v2 = _State(settings, batcher, proxy, models)
    try:
        yield
    finally:
        await proxy.aclose()
        if own_batcher is not None:
            await own_batcher.stop()


router = APIRouter(tags=["v2"], lifespan=lifespan)


def _state(request: Request) -> _State:
    return request.app.state.mg_v2


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(oip.error_body(message), status_code=status, headers=headers)


class _Reply(Exception):
    """A response to answer at once (raised from inside a route's helpers)."""

    def __init__(self, response: Response) -> None:
        self.response = response


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Map a call's failures to protocol errors (`service.api.errors`; raised as _Reply for the route to return)."""
    try:
        yield
    except _Reply:
        raise
    except Exception as e:  # noqa: BLE001 - every failure gets an answer
        a = errors.answer(e, oip=True)
        if a is None:
            log.exception("v2 request failed")
            raise _Reply(_error(500, "internal error")) from None
        raise _Reply(_error(a.status, a.message, a.headers)) from None


def _reply(resp: oip.InferResponse, binary: set[str] | bool, accept: str | None = None) -> Response:
    """The encoded response, compressed as the caller's `Accept-Encoding` asks (Inference-Header-Content-Length
    stays the uncompressed JSON part's length, as Triton sends it)."""
    body, headers = oip.encode_response(resp, binary)
    if encoding := oip.response_encoding(accept):
        body = oip.compress(body, encoding)
        headers = {**headers, "Content-Encoding": encoding, "Vary": "Accept-Encoding"}
    return Response(body, headers=headers)


async def _body(request: Request, limit: int) -> bytes:
    """The body, size-capped while it streams, then decoded per its `Content-Encoding` (the cap applies again)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise oip.OIPError(f"the body has {declared} bytes; the limit is {limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise oip.OIPError(f"the body exceeds {limit} bytes", status=413)
        chunks.append(chunk)
    return oip.decode_content(b"".join(chunks), request.headers.get("content-encoding"), limit)


def _versioned(st: _State, name: str, version: str | None) -> Model | None:
    """The model `name`, or None; with a `version` the 404 (as _Reply) unless the model has that version."""
    m = st.models.get(name)
    if version is not None and (m is None or not m.versions):
        raise _Reply(_error(404, f"versioned calls go to our own models; call /v2/models/{name}/... for a proxied "
                                 "model"))  # fmt: skip
    if version is not None and m is not None and version not in m.versions:
        raise _Reply(_error(404, f"model {name!r} has version {m.versions[0]!r} only"))
    return m


# -- server-level routes -------------------------------------------------------------------------------------------
@router.get("/v2", responses={200: schema.json_body({"type": "object"}, "server metadata")})
async def server_metadata() -> dict:
    return SERVER


@router.get("/v2/health/live", responses={200: schema.json_body(LIVE, "live")})
async def live() -> Response:
    return JSONResponse({"live": True})  # the body KServe's clients read; Triton's read the status only


@router.get("/v2/health/ready", responses={200: schema.json_body(READY, "ready"), **schema.errors(503)})
async def ready(request: Request) -> Response:
    if _state(request).models.server_ready():
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False, "error": "the engine is not ready"}, status_code=503)


@router.post("/v2/repository/index", responses={200: schema.json_body(INDEX, "the model repository's index"),
                                                **schema.errors(400)})  # fmt: skip
async def repository_index(request: Request) -> Response:
    """The repository extension's index (Triton's `get_model_repository_index`): every name served here, our own
    and the proxied ones, with its state; the body `{"ready": true}` keeps the ready ones only."""
    st = _state(request)
    raw = await request.body()
    try:
        wanted = json.loads(raw or b"{}")
        ready_only = bool(wanted.get("ready", False)) if isinstance(wanted, dict) else None
    except ValueError:
        ready_only = None
    if ready_only is None:
        return _error(400, 'the body must be empty or a JSON object such as {"ready": true}')
    models = {**st.models.own, **st.models.proxied}
    states = await asyncio.gather(*(m.is_ready() for m in models.values()))  # proxied: one upstream call each
    index = []
    for (name, m), ready in zip(models.items(), states, strict=True):
        if ready_only and not ready:
            continue
        entry = {"name": name, "version": m.versions[0] if m.versions else "", "state": "READY" if ready else
                 "UNAVAILABLE"}  # fmt: skip
        index.append(entry if ready else {**entry, "reason": "the engine or the upstream is not ready"})
    return JSONResponse(index)


# -- model-level routes: each path also under /versions/{version} (a version the model must have) ------------------
Handler = Callable[[Request, str, str | None], Awaitable[Response]]


def _twin_routes(method: str, suffix: str, responses: dict, openapi_extra: dict | None = None
                 ) -> Callable[[Handler], Handler]:  # fmt: skip
    """Register `handler(request, name, version)` at /v2/models/{name}{suffix} (version None) and at
    /v2/models/{name}/versions/{version}{suffix}."""

    def register(handler: Handler) -> Handler:
        async def plain(name: str, request: Request) -> Response:
            return await handler(request, name, None)

        async def versioned(name: str, version: str, request: Request) -> Response:
            return await handler(request, name, version)

        for path, endpoint in ((f"/v2/models/{{name}}{suffix}", plain),
                               (f"/v2/models/{{name}}/versions/{{version}}{suffix}", versioned)):  # fmt: skip
            router.add_api_route(path, endpoint, methods=[method], responses=responses, openapi_extra=openapi_extra,
                                 name=handler.__name__.strip("_"))  # fmt: skip
        return handler

    return register


@_twin_routes("GET", "", METADATA_RESPONSES)
async def _metadata(request: Request, name: str, version: str | None) -> Response:
    st = _state(request)
    try:
        m = _versioned(st, name, version)
        if m is None:
            return _error(404, f"unknown model {name!r}; ours: {list(st.models.own)}, proxied: "
                               f"{list(st.models.proxied)}")  # fmt: skip
        if isinstance(m, RawUpstream):
            return _error(404, f"{name!r} is a raw upstream; POST image bytes to /predictions/{name}")
        with _errors():
            return JSONResponse(await m.metadata())
    except _Reply as r:
        return r.response


@_twin_routes("GET", "/ready", READY_RESPONSES)
async def _readiness(request: Request, name: str, version: str | None) -> Response:
    """KServe's model-ready body ({"name", "ready"}), with the reason when not ready (503)."""
    try:
        m = _versioned(_state(request), name, version)
    except _Reply as r:
        return r.response
    if m is None or isinstance(m, RawUpstream):
        return _error(404, f"unknown model {name!r}")
    if await m.is_ready():
        return JSONResponse({"name": name, "ready": True})
    why = "the engine is not ready" if m.versions else f"upstream of {name!r} not ready"
    return JSONResponse({"name": name, "ready": False, "error": why}, status_code=503)


@_twin_routes("POST", "/infer", schema.INFER_RESPONSES, schema.INFER)
async def _infer(request: Request, name: str, version: str | None) -> Response:
    st = _state(request)
    try:
        _versioned(st, name, version)  # a wrong version is a 404 before the body is read
        with _errors():
            body = await _body(request, st.settings.max_upload_bytes)
            t = time.perf_counter()
            req = oip.decode_request(body, request.headers.get(oip.HEADER_LENGTH))
            decode_ms = (time.perf_counter() - t) * 1e3
            m = st.models.get(name)
            if m is None:
                return _error(404, f"unknown model {name!r}")
            if isinstance(m, RawUpstream):
                return _error(400, f"{name!r} is a raw upstream; POST image bytes to /predictions/{name}")
            resp = await m.infer(req, dict(request.headers), decode_ms, await get_caller(request))
            return _reply(resp, req.binary_outputs(), request.headers.get("accept-encoding"))
    except _Reply as r:
        return r.response


# -- raw bytes (TorchServe-style) ----------------------------------------------------------------------------------
@router.post("/predictions/{name}", responses=schema.RAW_RESPONSES, openapi_extra=schema.RAW_IMAGE)
async def predictions(name: str, request: Request) -> Response:
    st = _state(request)
    m = st.models.get(name)
    if not isinstance(m, RawUpstream):
        return _error(404, f"no raw upstream named {name!r}")
    try:
        with _errors():
            body = await _body(request, st.settings.max_upload_bytes)
            query: dict[str, Any] = dict(request.query_params)  # digit strings are integers to `service.request`
            content, ctype, headers = await m.predictions(body, query, dict(request.headers), await get_caller(request))
            return Response(content, media_type=ctype, headers=headers)
    except _Reply as rep:
        return rep.response
