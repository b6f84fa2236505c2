"""Open Inference Protocol (KServe V2 REST) routes: find the model by name, call it, shape the answer.

The models are `service.served`'s objects: our own (`{dataset}-{classifier}`, defended per the request parameters
`defense`, `steps`, `restarts`, `seed`; version "1"), every allow-listed upstream (purified here, classified
there), and the TorchServe-style raw upstreams behind `POST /predictions/{name}` (image bytes in, the purified 28×28
PNG forwarded, purification details in `X-Purification-*` headers). Request bodies may come gzip- or
deflate-compressed; infer answers are compressed when the caller's Accept-Encoding asks. Every error is raised
and answered by the app's one handler (`service.api.errors`): `{"error": "..."}` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service import oip
from service.api import schema
from service.api.deps import get_caller, get_models
from service.errors import ServiceError
from service.served import Model, RawUpstream

SERVER = {"name": "manifold-guard", "version": "0.1.0", "extensions": ["binary_tensor_data", "model_repository"]}
INDEX = {"type": "array", "items": {"type": "object", "required": ["name", "state"], "properties": {
    "name": {"type": "string"}, "version": {"type": "string"}, "state": {"type": "string"},
    "reason": {"type": "string"}}}}  # fmt: skip
LIVE = {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}}
READY = {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}}
METADATA_RESPONSES = {200: schema.json_body(schema.MODEL_METADATA, "model metadata"), **schema.errors(404, 502, 504)}
READY_RESPONSES = {200: schema.json_body({**READY, "properties": {"name": {"type": "string"}, **READY["properties"]}},
                                         "ready"), **schema.errors(404, 503)}  # fmt: skip


router = APIRouter(tags=["v2"])


def _reply(resp: oip.InferResponse, binary: set[str] | bool, accept: str | None = None) -> Response:
    """The encoded response, compressed as the caller's `Accept-Encoding` asks (Inference-Header-Content-Length
    stays the uncompressed JSON part's length, as Triton sends it)."""
    body, headers = oip.encode_response(resp, binary)
    if encoding := oip.response_encoding(accept):
        body = oip.compress(body, encoding)
        headers = {**headers, "Content-Encoding": encoding, "Vary": "Accept-Encoding"}
    return Response(body, headers=headers)


async def _body(request: Request, limit: int) -> bytes:
    """The body (the app's `EdgeMiddleware` caps it as it streams in), decoded per its `Content-Encoding` (the cap
    applies again to what it inflates to)."""
    return oip.decode_content(await request.body(), request.headers.get("content-encoding"), limit)


async def _lookup(request: Request, name: str, version: str | None) -> Model | None:
    """The model `name` (looked up once per request), or None; with a `version` a 404 unless it has that one."""
    m = (await get_models(request)).get(name)
    if version is not None and (m is None or not m.versions):
        raise ServiceError(f"versioned calls go to our own models; call /v2/models/{name}/... for a proxied model",
                           404)  # fmt: skip
    if version is not None and m is not None and version not in m.versions:
        raise ServiceError(f"model {name!r} has version {m.versions[0]!r} only", 404)
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
    if (await get_models(request)).server_ready():
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False, "error": "the engine is not ready"}, status_code=503)


@router.post("/v2/repository/index", responses={200: schema.json_body(INDEX, "the model repository's index"),
                                                **schema.errors(400)})  # fmt: skip
async def repository_index(request: Request) -> Response:
    """The repository extension's index (Triton's `get_model_repository_index`): every name served here, our own
    and the proxied ones, with its state; the body `{"ready": true}` keeps the ready ones only."""
    repo = await get_models(request)
    raw = await request.body()
    try:
        wanted = json.loads(raw or b"{}")
        ready_only = bool(wanted.get("ready", False)) if isinstance(wanted, dict) else None
    except ValueError:
        ready_only = None
    if ready_only is None:
        raise ServiceError('the body must be empty or a JSON object such as {"ready": true}', 400)
    models = {**repo.own, **repo.proxied}
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


def _unknown(name: str) -> ServiceError:
    return ServiceError(f"unknown model {name!r}", 404)


@_twin_routes("GET", "", METADATA_RESPONSES)
async def _metadata(request: Request, name: str, version: str | None) -> Response:
    m = await _lookup(request, name, version)
    if m is None:
        repo = await get_models(request)
        raise ServiceError(f"unknown model {name!r}; ours: {list(repo.own)}, proxied: {list(repo.proxied)}", 404)
    if isinstance(m, RawUpstream):
        raise ServiceError(f"{name!r} is a raw upstream; POST image bytes to /predictions/{name}", 404)
    return JSONResponse(await m.metadata())


@_twin_routes("GET", "/ready", READY_RESPONSES)
async def _readiness(request: Request, name: str, version: str | None) -> Response:
    """KServe's model-ready body ({"name", "ready"}), with the reason when not ready (503)."""
    m = await _lookup(request, name, version)
    if m is None or isinstance(m, RawUpstream):
        raise _unknown(name)
    if await m.is_ready():
        return JSONResponse({"name": name, "ready": True})
    why = "the engine is not ready" if m.versions else f"upstream of {name!r} not ready"
    return JSONResponse({"name": name, "ready": False, "error": why}, status_code=503)


@_twin_routes("POST", "/infer", schema.INFER_RESPONSES, schema.INFER)
async def _infer(request: Request, name: str, version: str | None) -> Response:
    m = await _lookup(request, name, version)  # a wrong version is a 404 before the body is read
    body = await _body(request, request.app.state.settings.max_upload_bytes)
    t = time.perf_counter()
    req = oip.decode_request(body, request.headers.get(oip.HEADER_LENGTH))
    decode_ms = (time.perf_counter() - t) * 1e3
    if m is None:
        raise _unknown(name)
    if isinstance(m, RawUpstream):
        raise ServiceError(f"{name!r} is a raw upstream; POST image bytes to /predictions/{name}", 400)
    resp = await m.infer(req, dict(request.headers), decode_ms, await get_caller(request))
    return _reply(resp, req.binary_outputs(), request.headers.get("accept-encoding"))


# -- raw bytes (TorchServe-style) ----------------------------------------------------------------------------------
@router.post("/predictions/{name}", responses=schema.RAW_RESPONSES, openapi_extra=schema.RAW_IMAGE)
async def predictions(name: str, request: Request) -> Response:
    m = (await get_models(request)).get(name)
    if not isinstance(m, RawUpstream):
        raise ServiceError(f"no raw upstream named {name!r}", 404)
    body = await _body(request, request.app.state.settings.max_upload_bytes)
    query: dict[str, Any] = dict(request.query_params)  # digit strings are integers to `service.request`
    content, ctype, headers = await m.predictions(body, query, dict(request.headers), await get_caller(request))
    return Response(content, media_type=ctype, headers=headers)
