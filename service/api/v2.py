"""Open Inference Protocol (KServe V2 REST) routes: our own models, and the purification proxy.

Model names:
- `{dataset}-{classifier}` (e.g. `mnist-classifier_A`): our classifier over the protocol, defended per request
  parameters `defense` ("none", "defense-gan", "invert-classify", "enhanced-invert-classify" (the warm start, then
  the classifier's `_enhanced` counterpart); when absent, the manifest's default for it:
  `service.engine.default_defense`), `steps`, `restarts`, `seed`.
- every name in `settings.proxy.upstreams`: the image input is purified with the dataset's generator (same
  parameters), forwarded to the allow-listed upstream, and the upstream's response comes back with the
  purification's parameters added (`purified`, `defense`, `steps`, `restarts`, `purify_ms`, ...).

`POST /predictions/{name}` is the raw-bytes twin for TorchServe-style upstreams (`protocol: raw`): image bytes
in, the purified 28×28 PNG forwarded, the upstream's reply back, purification details in `X-Purification-*`
headers. Every error is `{"error": "..."}` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from service import imaging, oip
from service.api import schema
from service.batcher import Batcher, QueueFull, RequestTimeout
from service.config import Settings, get_settings
from service.engine import (
    DEFENSES,
    PROJECTING,
    DefendResult,
    NotShipped,
    ParameterError,
    PurifyResult,
    classifier_for,
    default_defense,
    projection_config,
)
from service.proxy import ProxyClient, UpstreamError, purify_and_forward
from service.purify import ProjectionConfig

log = logging.getLogger(__name__)
VERSION = "1"  # the one version of each of our own models
SERVER = {"name": "manifold-guard", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
OWN_OUTPUTS = ("probabilities", "labels", "mse", "flagged", "purified")
OUR_PARAMETERS = ("defense", "steps", "restarts", "seed")
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


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The pooled upstream client; an engine and batcher too when the app did not provide them."""
    settings = getattr(app.state, "settings", None) or get_settings()
    proxy = ProxyClient(settings.proxy)
    own_batcher = None
    if getattr(app.state, "batcher", None) is None:  # standalone router (the app usually provides one)
        from service.engine import Engine
        from service.registry import Registry

        engine = Engine.from_settings(Registry(settings.models_dir), settings)
        own_batcher = Batcher.from_settings(engine, settings)
        await own_batcher.start()
    app.state.mg_v2 = _State(settings, getattr(app.state, "batcher", None) or own_batcher, proxy)
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


def _reply(resp: oip.InferResponse, binary: set[str] | bool, accept: str | None = None) -> Response:
    """The encoded response, compressed as the caller's `Accept-Encoding` asks (Inference-Header-Content-Length
    stays the uncompressed JSON part's length, as Triton sends it)."""
    body, headers = oip.encode_response(resp, binary)
    if encoding := oip.response_encoding(accept):
        body = oip.compress(body, encoding)
        headers = {**headers, "Content-Encoding": encoding, "Vary": "Accept-Encoding"}
    return Response(body, headers=headers)


@contextlib.contextmanager
def _errors() -> Any:
    """Map the failures of a call to protocol errors (raised as _Reply so a route returns them)."""
    try:
        yield
    except oip.OIPError as e:
        raise _Reply(_error(e.status, str(e))) from None
    except imaging.ImageError as e:
        raise _Reply(_error(e.status, str(e))) from None
    except UpstreamError as e:
        raise _Reply(_error(e.status, e.message)) from None
    except QueueFull as e:
        raise _Reply(_error(503, str(e), {"Retry-After": f"{e.retry_after:.0f}"})) from None
    except RequestTimeout as e:
        raise _Reply(_error(504, str(e))) from None
    except ValueError as e:
        raise _Reply(_error(400, str(e))) from None
    except RecursionError:
        raise _Reply(_error(400, "the request is nested too deeply")) from None
    except MemoryError:
        raise _Reply(_error(413, "the request needs more memory than the server grants one request")) from None
    except Exception:
        log.exception("v2 request failed")
        raise _Reply(_error(500, "internal error")) from None


class _Reply(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


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


# -- names ---------------------------------------------------------------------------------------------------------
def _own(st: _State, name: str) -> tuple[str, str] | None:
    """(dataset, classifier) when `name` is one of our models."""
    ds, sep, clf = name.partition("-")
    if not sep:
        return None
    reg = st.batcher.engine.registry
    try:
        return (ds, clf) if ds in reg.datasets() and clf in reg.classifiers(ds) else None
    except Exception:  # noqa: BLE001 - an unknown dataset is just not ours
        return None


def _own_names(st: _State) -> list[str]:
    reg = st.batcher.engine.registry
    return [f"{ds}-{clf}" for ds in reg.datasets() for clf in reg.classifiers(ds)]


# -- purification parameters ---------------------------------------------------------------------------------------
@dataclass
class _Purification:
    defense: str
    cfg: ProjectionConfig | None  # None for a defense that does not project (none, magnet)
    seed: int | None


def _purification(params: dict[str, Any], st: _State, dataset: str, classifier: str | None) -> _Purification:
    """Our request parameters, checked and capped (the projection built once, before any work); they are removed
    from `params` (never forwarded). `classifier` None: a proxied model (it classifies upstream)."""
    s = st.settings
    proxied = classifier is None
    reg = st.batcher.engine.registry
    defense = params.pop("defense", None) or default_defense(reg, dataset, classifier, s.default_defense, proxied)
    # a proxied model classifies upstream: it is purified by a projection (never "none", MagNet or our enhanced
    # classifiers)
    allowed = tuple(d for d in DEFENSES if d in PROJECTING and d != "enhanced-invert-classify") if proxied else DEFENSES
    if defense not in allowed:
        raise oip.OIPError(f"parameter 'defense' must be one of {list(allowed)}, got {defense!r}")
    seed = params.pop("seed", None)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= 2**31 - 1):
        raise oip.OIPError(f"parameter 'seed' must be an integer in [0, {2**31 - 1}], got {seed!r}")
    steps, restarts = params.pop("steps", None), params.pop("restarts", None)
    try:
        cfg = projection_config(defense, steps, restarts, s)
    except ParameterError as exc:
        raise oip.OIPError(f"parameter {exc}") from None
    return _Purification(defense, cfg, seed)


def _purify_parameters(p: _Purification, dataset: str, r: PurifyResult | DefendResult, images: int) -> dict:
    """Scalar response parameters describing the purification (the protocol's parameters are scalars)."""
    out: dict[str, Any] = {
        "purified": p.defense != "none",
        "defense": p.defense,
        "dataset": dataset,
        "steps": r.steps,
        "restarts": r.restarts,
        "images": images,
    }
    if p.seed is not None:
        out["seed"] = p.seed
    if r.mse is not None:
        out["max_mse"] = float(np.max(r.mse))
    if r.threshold is not None and r.flagged is not None:
        out["detector_threshold"] = float(r.threshold)
        out["flagged"] = int(np.sum(r.flagged))
    for k, v in r.timings_ms.items():
        out[k] = round(float(v), 3)
    return out


# -- server-level routes -------------------------------------------------------------------------------------------
@router.get("/v2", responses={200: schema.json_body({"type": "object"}, "server metadata")})
async def server_metadata() -> dict:
    return SERVER


@router.get("/v2/health/live", responses={200: schema.json_body(LIVE, "live")})
async def live() -> Response:
    return JSONResponse({"live": True})  # the body KServe's clients read; Triton's read the status only


@router.get("/v2/health/ready", responses={200: schema.json_body(READY, "ready"), **schema.errors(503)})
async def ready(request: Request) -> Response:
    if _ready(request):
        return JSONResponse({"ready": True})
    return JSONResponse({"ready": False, "error": "the engine is not ready"}, status_code=503)


def _ready(request: Request) -> bool:
    """The engine runs and (inside the full app) warm-up finished."""
    return _state(request).batcher.running and getattr(request.app.state, "ready", True) is not False


# -- model-level routes --------------------------------------------------------------------------------------------
@router.get("/v2/models/{name}", responses=METADATA_RESPONSES)
async def model_metadata(name: str, request: Request) -> Response:
    st = _state(request)
    own = _own(st, name)
    if own is not None:
        return JSONResponse(
            {
                "name": name,
                "versions": [VERSION],
                "platform": "manifold-guard",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
                "outputs": [
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                    {"name": "labels", "datatype": "INT64", "shape": [-1]},
                    {"name": "mse", "datatype": "FP32", "shape": [-1]},
                    {"name": "flagged", "datatype": "BOOL", "shape": [-1]},
                    {"name": "purified", "datatype": "FP32", "shape": [-1, 1, 28, 28]},
                ],
            }
        )
    up = st.proxy.upstream(name)
    if up is None:
        return _error(
            404, f"unknown model {name!r}; ours: {_own_names(st)}, proxied: {list(st.settings.proxy.upstreams)}"
        )
    if up.protocol != "v2":
        return _error(404, f"{name!r} is a raw upstream; POST image bytes to /predictions/{name}")
    try:
        with _errors():
            return JSONResponse(await st.proxy.metadata(name))
    except _Reply as r:
        return r.response


@router.get("/v2/models/{name}/ready", responses=READY_RESPONSES)
async def model_ready(name: str, request: Request) -> Response:
    st = _state(request)
    if _own(st, name) is not None:
        return _readiness(name, _ready(request), "the engine is not ready")
    up = st.proxy.upstream(name)
    if up is None or up.protocol != "v2":
        return _error(404, f"unknown model {name!r}")
    return _readiness(name, await st.proxy.ready(name), f"upstream of {name!r} not ready")


def _readiness(name: str, ok: bool, why: str) -> JSONResponse:
    """KServe's model-ready body ({"name", "ready"}), with the reason when not ready (503)."""
    return JSONResponse({"name": name, "ready": ok, **({} if ok else {"error": why})}, status_code=200 if ok else 503)


# -- versioned model routes: our models have one version, "1" -------------------------------------------------------
def _version(st: _State, name: str, version: str) -> Response | None:
    """None when `version` names a version of `name` we serve, else the 404 to answer."""
    if _own(st, name) is not None:
        return None if version == VERSION else _error(404, f"model {name!r} has version {VERSION!r} only")
    return _error(404, f"versioned calls go to our own models; call /v2/models/{name}/... for a proxied model")


@router.get("/v2/models/{name}/versions/{version}", responses=METADATA_RESPONSES)
async def version_metadata(name: str, version: str, request: Request) -> Response:
    return _version(_state(request), name, version) or await model_metadata(name, request)


@router.get("/v2/models/{name}/versions/{version}/ready", responses=READY_RESPONSES)
async def version_ready(name: str, version: str, request: Request) -> Response:
    return _version(_state(request), name, version) or await model_ready(name, request)


@router.post("/v2/models/{name}/versions/{version}/infer", responses=schema.INFER_RESPONSES, openapi_extra=schema.INFER)
async def version_infer(name: str, version: str, request: Request) -> Response:
    return _version(_state(request), name, version) or await infer(name, request)


@router.post("/v2/models/{name}/infer", responses=schema.INFER_RESPONSES, openapi_extra=schema.INFER)
async def infer(name: str, request: Request) -> Response:
    st = _state(request)
    try:
        with _errors():
            body = await _body(request, st.settings.max_upload_bytes)
            req = oip.decode_request(body, request.headers.get(oip.HEADER_LENGTH))
            if (own := _own(st, name)) is not None:
                resp = await _infer_own(st, name, own, req)
            elif (up := st.proxy.upstream(name)) is None:
                return _error(404, f"unknown model {name!r}")
            elif up.protocol != "v2":
                return _error(400, f"{name!r} is a raw upstream; POST image bytes to /predictions/{name}")
            else:
                resp = await _infer_proxied(st, name, req, dict(request.headers))
            return _reply(resp, req.binary_outputs(), request.headers.get("accept-encoding"))
    except _Reply as r:
        return r.response


def _images(t: oip.Tensor, max_images: int) -> torch.Tensor:
    """Our models' input: N×1×28×28, N×28×28×1 or N×28×28; FP16/32/64 in [0, 1] or UINT8 in [0, 255]."""
    a = t.data
    if t.datatype not in ("FP16", "FP32", "FP64", "UINT8"):
        raise oip.OIPError(f"input {t.name!r} must be FP32, FP64, FP16 or UINT8, got {t.datatype}")
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim == 4 and a.shape[-1] == 1 and a.shape[1] != 1:
        a = a.transpose(0, 3, 1, 2)
    if a.ndim != 4 or tuple(a.shape[1:]) != (1, 28, 28) or a.shape[0] == 0:
        raise oip.OIPError(f"input {t.name!r} must have shape N×1×28×28, N×28×28×1 or N×28×28, got {t.shape}")
    if a.shape[0] > max_images:
        raise oip.OIPError(f"{a.shape[0]} images in one request; the limit is {max_images}", status=413)
    x = a.astype(np.float32) / (255.0 if t.datatype == "UINT8" else 1.0)
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise oip.OIPError(f"input {t.name!r} values must be finite and lie in [0, 1] ([0, 255] for UINT8)")
    return torch.from_numpy(np.ascontiguousarray(x))


async def _infer_own(st: _State, name: str, own: tuple[str, str], req: oip.InferRequest) -> oip.InferResponse:
    ds, clf = own
    if len(req.inputs) != 1:
        raise oip.OIPError(f"model {name!r} takes one input tensor, got {len(req.inputs)}")
    x = _images(req.inputs[0], st.settings.max_batch_images)
    params = dict(req.parameters)
    p = _purification(params, st, ds, clf)
    try:
        classifier_for(st.batcher.engine.registry, ds, clf, p.defense)  # checked before any work
    except NotShipped as exc:
        raise oip.OIPError(str(exc), status=404) from None
    r = await st.batcher.defend(x, ds, clf, p.defense, p.cfg, p.seed)
    wanted = [o.name for o in req.outputs] if req.outputs is not None else None
    for w in wanted or []:
        if w not in OWN_OUTPUTS:
            raise oip.OIPError(f"unknown output {w!r}; outputs: {list(OWN_OUTPUTS)}")
    tensors = {"probabilities": r.probs.astype(np.float32), "labels": r.labels.astype(np.int64)}
    if r.mse is not None:
        tensors["mse"] = np.asarray(r.mse, dtype=np.float32)
    if r.flagged is not None:
        tensors["flagged"] = np.asarray(r.flagged, dtype=bool)
    if wanted is not None and "purified" in wanted:
        if r.purified is None:
            raise oip.OIPError("output 'purified' needs a defense other than 'none'")
        tensors["purified"] = r.purified.numpy().astype(np.float32)
    missing = [w for w in wanted or [] if w not in tensors]
    if missing:
        raise oip.OIPError(f"outputs {missing} are not produced with defense {p.defense!r}")
    names = wanted if wanted is not None else [k for k in tensors if k != "purified"]
    outputs = [oip.Tensor.from_numpy(k, tensors[k]) for k in names]
    resp = oip.InferResponse(name, outputs, VERSION, req.id, _purify_parameters(p, ds, r, x.shape[0]))
    resp.parameters["classifier"] = clf
    return resp


async def _infer_proxied(st: _State, name: str, req: oip.InferRequest, headers: dict[str, str]
                         ) -> oip.InferResponse:  # fmt: skip
    up = st.proxy.upstream(name)
    assert up is not None
    p = _purification(req.parameters, st, up.dataset, None)  # strips our parameters from what is forwarded
    cfg = p.cfg
    assert cfg is not None  # a proxied model always purifies
    result: list[PurifyResult] = []

    async def purify(x: torch.Tensor, dataset: str) -> torch.Tensor:
        if x.shape[0] > st.settings.max_batch_images:
            raise oip.OIPError(
                f"{x.shape[0]} images in one request; the limit is {st.settings.max_batch_images}", status=413
            )
        r = await st.batcher.purify(x, dataset, cfg, p.seed)
        result.append(r)
        return r.images

    fwd = await purify_and_forward(st.proxy, name, req, purify, headers)
    fwd.response.parameters.update(_purify_parameters(p, up.dataset, result[0], fwd.images))
    return fwd.response


# -- raw bytes (TorchServe-style) ----------------------------------------------------------------------------------
@router.post("/predictions/{name}", responses=schema.RAW_RESPONSES, openapi_extra=schema.RAW_IMAGE)
async def predictions(name: str, request: Request) -> Response:
    st = _state(request)
    up = st.proxy.upstream(name)
    if up is None or up.protocol != "raw":
        return _error(404, f"no raw upstream named {name!r}")
    try:
        with _errors():
            s = st.settings
            body = await _body(request, s.max_upload_bytes)
            x = imaging.to_tensor(imaging.load_bytes(body, s.max_image_pixels, 1), 1)
            params = {k: _int_or_str(v) for k, v in request.query_params.items()}
            p = _purification(params, st, up.dataset, None)
            if params:
                raise oip.OIPError(f"unknown query parameters {sorted(params)}")
            r = await st.batcher.purify(x, up.dataset, p.cfg, p.seed)
            png = await asyncio.to_thread(imaging.encode_png, r.images[0])
            content, ctype = await st.proxy.predictions(name, png, "image/png", dict(request.headers))
            meta = _purify_parameters(p, up.dataset, r, 1)
            headers = {f"X-Purification-{k.replace('_', '-').title()}": str(v) for k, v in meta.items()}
            return Response(content, media_type=ctype, headers=headers)
    except _Reply as rep:
        return rep.response


def _int_or_str(v: str) -> int | str:
    return int(v) if v.lstrip("-").isdigit() else v
