"""/v1: classify, purify, detect, models; and the operational routes /healthz, /readyz, /metrics.

Routes only parse, call and shape: bytes → `service.imaging` (in a worker thread) → `Batcher` → JSON or PNG.
An image comes as a multipart upload (any file field), a raw body (Content-Type image/png, image/jpeg, image/webp,
application/x-npy or application/octet-stream) or JSON (`image` base64, `images` list of base64, or `array`
nested list). Parameters come in the query string or, for JSON and multipart, as body fields (body wins); they are
`service.request`'s typed fields, resolved there (defaults, per-dataset defaults, caps) as for /v2 and /v1/attack.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import imaging
from service.api.deps import Serving, get_caller, get_metrics, get_registry, get_serving, get_settings
from service.api.schema import errors
from service.attacks import runner
from service.batcher import DefendJob, PurifyJob
from service.config import Settings
from service.engine import DefendResult, PurifyResult, default_classifier, default_defense, offered_defenses
from service.errors import ServiceError
from service.metrics import Metrics, observe_stages
from service.profile import Caller, admit, fix_pipeline, reduce, restricted, served_model
from service.registry import Registry, grid_key
from service.request import ClassifyFields, DetectFields, Fields, PurifyFields, RequestError, image_cap, resolve

ERRORS = errors(400, 404, 408, 413, 415, 422, 503, 504)
EXAMPLE_PNG = imaging.png_base64(np.zeros((28, 28), dtype=np.float32))  # a real (blank) image the schema can send

router = APIRouter(prefix="/v1", tags=["v1"], responses=ERRORS)
ops_router = APIRouter(tags=["operations"])

RAW_TYPES = {
    "image/png",
    "image/jpeg",
    "image/webp",
    "application/x-npy",
    "application/npy",
    "application/octet-stream",
}
IMAGE_KEYS = ("image", "images", "array")
INLINE_BYTES = 64 * 1024  # a small PNG or JSON body is decoded in the event loop (≤ ~1 ms); others in a thread
INLINE_VALUES = 16 * 32 * 32 * 3  # and images of up to this many values are fitted to the model there


async def _off_loop(small: bool, fn: Any, *args: Any) -> Any:
    """fn(*args) inline when it is cheap (a thread hop costs more than decoding a digit), else in a worker thread."""
    return fn(*args) if small else await run_in_threadpool(fn, *args)


# -- responses (for the schema) ---------------------------------------------------------------------
class Prediction(BaseModel):
    label: int
    class_name: str
    probabilities: list[float]
    mse: float | None = Field(None, description="reconstruction MSE of the purified image (defended calls)")
    flagged: bool | None = Field(None, description="detector: MSE above the calibrated threshold")
    purified_png: str | None = Field(None, description="base64 PNG, with return_purified=true")
    input_png: str | None = Field(None, description="the model's input (the dataset's size and channels) as base64 "
                                  "PNG, with return_input=true")  # fmt: skip


class PublicPrediction(BaseModel):
    label: int = Field(description="−1: the server abstained (a flagged input, where the operator chose so)")
    class_name: str
    probability: float | None = Field(None, description="the label's probability, rounded (output policy top1)")
    probabilities: list[float] | None = Field(None, description="rounded (output policy probabilities)")


class PublicClassifyResponse(BaseModel):
    """The answer under the public profile: the operator's output policy, no detector figures or timings."""

    model: str
    predictions: list[PublicPrediction]


class _Projected(BaseModel):
    """The figures of the projection every defended answer carries."""

    defense: str
    steps: int
    restarts: int
    threshold: float | None = Field(description="calibrated on clean images for this start, L and R; else null")
    detector_note: str | None = Field(
        None, description="why `flagged` is null after a projection: no threshold is calibrated for its start, L and R"
    )


class ClassifyResponse(_Projected):
    model: str
    predictions: list[Prediction]
    timings_ms: dict[str, float]
    batch: dict[str, int]


class PurifiedImage(BaseModel):
    png_base64: str
    mse: float
    flagged: bool | None


class PurifyResponse(_Projected):
    dataset: str
    images: list[PurifiedImage]
    timings_ms: dict[str, float]


class Detection(BaseModel):
    score: float = Field(description="reconstruction MSE")
    flagged: bool | None


class DetectResponse(_Projected):
    dataset: str
    fpr: float | None = Field(description="the clean false-positive rate the threshold was set for")
    detections: list[Detection]
    timings_ms: dict[str, float]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` references replaced by the definitions (a schema embedded in an
    OpenAPI document cannot point at `#/$defs/...`: that path is resolved against the document's root)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    return resolve(schema)


def _query(prop: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema for the query string, where a null cannot be written (leave the parameter out)."""
    branches = [b for b in prop.get("anyOf", []) if b.get("type") != "null"]
    if len(branches) != 1:
        return prop
    return {**{k: v for k, v in prop.items() if k != "anyOf"}, **branches[0]}


def _openapi(params: type[Fields], example: dict[str, Any]) -> dict[str, Any]:
    """Query parameters and the three body forms, for the OpenAPI schema (the route parses the body itself). The
    caps (steps, restarts, images) are written in when the app is built (`schema.with_caps`)."""
    schema = params.model_json_schema()
    parameters = [
        {"name": name, "in": "query", "required": False, "schema": _query(prop),
         "description": prop.get("description", "")}
        for name, prop in schema["properties"].items()
    ]  # fmt: skip
    images = {"type": "string", "minLength": 1, "description": "base64 PNG/JPEG/WebP/.npy (data URLs accepted)"}
    json_props = {
        "image": images,
        "images": {"type": "array", "items": images, "description": "several base64 images"},
        "array": {"type": "array", "items": {}, "description": "nested list: H×W, N×H×W, N×1×H×W, ..."},
        **schema["properties"],
    }
    json_schema = {"type": "object", "properties": json_props, "additionalProperties": False,
                   "anyOf": [{"required": [k]} for k in IMAGE_KEYS]}  # fmt: skip
    binary = {"schema": {"type": "string", "format": "binary"}}
    upload = {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}, "required": ["file"]}
    return {
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": upload},
                "application/json": {"schema": json_schema, "example": example},
                "image/png": binary,
                "image/jpeg": binary,
                "image/webp": binary,
                "application/x-npy": binary,
            },
        },
    }


# -- input ------------------------------------------------------------------------------------------
def _replay(body: bytes) -> Any:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def read_input(request: Request, settings: Settings) -> tuple[list[np.ndarray], dict[str, Any], float]:
    """(images as they came, H×W×C; parameters from query and body; decode ms). The body is size-capped while it
    streams. `model_input` fits the images to the dataset the parameters name."""
    params: dict[str, Any] = dict(request.query_params)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    t = time.perf_counter()
    s = settings
    small = len(body) <= INLINE_BYTES
    vr = _value_range(params)
    if ctype == "multipart/form-data":
        try:
            form = await Request(request.scope, _replay(body)).form(max_files=s.max_batch_images, max_fields=32)
        except (ValueError, StarletteHTTPException) as exc:
            raise ServiceError(f"malformed multipart body: {getattr(exc, 'detail', exc)}", 400) from exc
        files: list[bytes] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append(await value.read())
            else:
                params[key] = value
        if not files:
            raise RequestError("the multipart body has no file part")
        vr = _value_range(params)
        cheap = small and all(imaging.small_png(f) for f in files)
        x = await _off_loop(cheap, imaging.read_files, files, s.max_image_pixels, s.max_batch_images, vr)
    elif ctype == "application/json" or ctype.endswith("+json"):
        try:
            doc = await _off_loop(small, json.loads, body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise ServiceError(f"the body is not valid JSON: {str(exc)[:200]}", 400) from exc
        if not isinstance(doc, dict):
            raise RequestError("the JSON body must be an object with `image`, `images` or `array`")
        inputs = {k: doc.pop(k) for k in IMAGE_KEYS if k in doc}
        params.update(doc)
        vr = _value_range(params)
        image, images = inputs.get("image"), inputs.get("images")
        if image is not None and not isinstance(image, str):
            raise RequestError("`image` must be a base64 string")
        if images is not None and not (isinstance(images, list) and all(isinstance(i, str) for i in images)):
            raise RequestError("`images` must be a list of base64 strings")
        cheap = small and image is None and images is None  # base64 files may decode to many pixels
        x = await _off_loop(
            cheap, imaging.read_json, image, images, inputs.get("array"), s.max_image_pixels, s.max_batch_images, vr
        )
    elif ctype in RAW_TYPES:
        cheap = small and imaging.small_png(body)
        x = await _off_loop(cheap, imaging.read_files, [body], s.max_image_pixels, s.max_batch_images, vr)
    elif not ctype:
        raise ServiceError("set a Content-Type: multipart/form-data, application/json or image/png (...)", 415)
    else:
        raise ServiceError(f"unsupported Content-Type {ctype!r}", 415)
    return x, params, (time.perf_counter() - t) * 1e3


async def model_input(images: list[np.ndarray], dataset: str, registry: Registry, settings: Settings
                      ) -> tuple[torch.Tensor, float]:  # fmt: skip
    """(N×C×H×W tensor of the dataset's spec, ms it took): channels and size by the dataset's policy
    (`imaging.to_tensor`), inline for a few small images, else in a worker thread."""
    t = time.perf_counter()
    small = sum(g.size for g in images) <= INLINE_VALUES
    spec = registry.spec(dataset)
    x = await _off_loop(small, imaging.to_tensor, images, image_cap(settings, spec), spec)
    return x, (time.perf_counter() - t) * 1e3


def _value_range(params: dict[str, Any]) -> float:
    try:
        return float(params.get("value_range", 1.0))
    except (TypeError, ValueError):
        return 1.0  # the parameter model reports it


def _projected(r: DefendResult | PurifyResult) -> dict[str, Any]:
    """The projection's figures every defended answer carries: L, R, the threshold, or why there is none."""
    return {"steps": r.steps, "restarts": r.restarts, "threshold": r.threshold, "detector_note": r.detector_note}


async def _pngs(images: Any) -> list[str] | None:
    """Base64 PNGs of N×C×H×W images (in a worker thread), or None for None."""
    if images is None:
        return None
    return await run_in_threadpool(lambda: [imaging.png_base64(img) for img in images])


# -- routes -----------------------------------------------------------------------------------------
@router.post(
    "/classify",
    response_model=ClassifyResponse | PublicClassifyResponse,
    summary="Classify images, purified first",
    openapi_extra=_openapi(
        ClassifyFields,
        {
            "image": EXAMPLE_PNG,
            "model": "mnist/classifier_A",
            "defense": "defense-gan",
            "steps": 200,
            "restarts": 10,
        },
    ),
)
async def classify(request: Request, sv: Serving = Depends(get_serving), caller: Caller = Depends(get_caller)
                   ) -> Any:  # fmt: skip
    """Label, class name and probabilities per image; with a defense also the reconstruction MSE, the detector's
    flag and (with `return_purified`) the purified image. Under the public profile: the operator's pipeline and
    output policy (`PublicClassifyResponse`)."""
    settings, registry, batcher = sv.settings, sv.registry, sv.batcher
    t0 = time.perf_counter()
    images, raw, decode_ms = await read_input(request, settings)
    p = ClassifyFields.parse(raw)
    public = restricted(caller, settings)
    name = served_model(p.model, settings) if public else ""
    p = fix_pipeline(p, name, caller, settings)
    req = resolve(p, settings, registry)
    x, fit_ms = await model_input(images, req.dataset, registry, settings)
    decode_ms += fit_ms
    await admit(request.app.state.guard, caller, x)
    observe_stages(batcher.metrics, req.model, {"decode": decode_ms})
    ds, clf, defense = req.dataset, req.classifier, req.defense
    assert clf is not None  # the fields name a classifier
    out = await batcher.submit(DefendJob(ds, clf, defense, req.cfg, req.job_seed), x)
    r: DefendResult = out.value
    if public:
        return _public_answer(r, name, settings, registry.class_names(ds))
    pngs = await _pngs(r.purified if p.return_purified else None)
    inputs = await _pngs(x if p.return_input else None)
    names = registry.class_names(ds)
    preds = []
    for i in range(len(r.labels)):
        label = int(r.labels[i])
        preds.append(
            {
                "label": label,
                "class_name": names[label] if label < len(names) else str(label),
                "probabilities": [float(v) for v in r.probs[i]],
                "mse": None if r.mse is None else float(r.mse[i]),
                "flagged": None if r.flagged is None else bool(r.flagged[i]),
                "purified_png": None if pngs is None else pngs[i],
                "input_png": None if inputs is None else inputs[i],
            }
        )
    timings = {
        "decode_ms": decode_ms,
        "queue_ms": out.queue_ms,
        **r.timings_ms,
        "engine_ms": out.compute_ms,
        "total_ms": (time.perf_counter() - t0) * 1e3,
    }
    return {
        "model": f"{ds}/{clf}",
        "defense": defense,
        **_projected(r),
        "predictions": preds,
        "timings_ms": timings,
        "batch": {"images": out.batch_images, "requests": out.batch_requests},
    }


def _public_answer(r: DefendResult, name: str, s: Settings, names: list[str]) -> JSONResponse:
    """/v1/classify's answer under the public profile (`service.profile.reduce`)."""
    out = reduce(r.probs, r.flagged, s.profile.pipeline(name))
    preds = []
    for i, label in enumerate(int(v) for v in out.labels):
        pred: dict[str, Any] = {"label": label, "class_name": names[label] if 0 <= label < len(names) else "abstain"}
        if out.top1 is not None:
            pred["probability"] = float(out.top1[i])
        if out.probabilities is not None:
            pred["probabilities"] = [float(v) for v in out.probabilities[i]]
        preds.append(pred)
    return JSONResponse(PublicClassifyResponse(model=name, predictions=preds).model_dump(exclude_none=True))


async def _purify(request: Request, sv: Serving, fields: type[PurifyFields | DetectFields]
                  ) -> tuple[Any, PurifyResult, str, float, dict[str, float]]:  # fmt: skip
    settings, batcher = sv.settings, sv.batcher
    caller = await get_caller(request)
    if restricted(caller, settings):
        raise RequestError("purified images and detector scores are not offered under the public profile "
                           "(MG_PUBLIC); an API key of the inspect scope may call this", 403)  # fmt: skip
    t0 = time.perf_counter()
    images, raw, decode_ms = await read_input(request, settings)
    p = fields.parse(raw)
    req = resolve(p, settings, sv.registry)
    x, fit_ms = await model_input(images, req.dataset, sv.registry, settings)
    decode_ms += fit_ms
    observe_stages(batcher.metrics, req.model, {"decode": decode_ms})
    assert req.cfg is not None  # purify and detect name projecting defenses only
    out = await batcher.submit(PurifyJob(req.dataset, req.cfg, req.seed), x)
    timings = {"decode_ms": decode_ms, "queue_ms": out.queue_ms, **out.value.timings_ms, "engine_ms": out.compute_ms}
    return p, out.value, req.dataset, t0, timings


@router.post(
    "/purify",
    summary="Purify images: project them onto the generator's range",
    responses={
        200: {
            "content": {
                "image/png": {},
                "application/json": {"schema": inline_schema(PurifyResponse)},
                "application/x-npy": {},
            },
            "description": "PNG (one image; MSE in X-MG-MSE), JSON, or .npy float32 N×C×H×W",
        }
    },
    openapi_extra=_openapi(PurifyFields, {"image": EXAMPLE_PNG, "dataset": "mnist", "format": "json"}),
)
async def purify(request: Request, sv: Serving = Depends(get_serving)) -> Response:
    """The purified image(s): PNG by default (exactly one image), JSON (base64 PNGs with MSEs) or .npy."""
    p, r, ds, t0, timings = await _purify(request, sv, PurifyFields)
    headers = {
        "X-MG-Steps": str(r.steps),
        "X-MG-Restarts": str(r.restarts),
        "X-MG-MSE": ",".join(f"{v:.6g}" for v in r.mse),
    }
    if p.format == "png":
        if len(r.mse) != 1:
            raise RequestError("format=png returns one image; use format=json or format=npy for several")
        if r.flagged is not None:
            headers["X-MG-Flagged"] = str(bool(r.flagged[0])).lower()
        elif r.detector_note:
            headers["X-MG-Detector-Note"] = r.detector_note
        png = await run_in_threadpool(imaging.encode_png, r.images[0])
        return Response(png, media_type="image/png", headers=headers)
    if p.format == "npy":
        return Response(
            await run_in_threadpool(imaging.encode_npy, r.images), media_type="application/x-npy", headers=headers
        )
    pngs = await _pngs(r.images)
    images = [
        {"png_base64": pngs[i], "mse": float(r.mse[i]), "flagged": None if r.flagged is None else bool(r.flagged[i])}
        for i in range(len(pngs))
    ]
    timings["total_ms"] = (time.perf_counter() - t0) * 1e3
    body = {
        "dataset": ds,
        "defense": p.defense,
        **_projected(r),
        "images": images,
        "timings_ms": timings,
    }
    return JSONResponse(PurifyResponse.model_validate(body).model_dump())


@router.post(
    "/detect",
    response_model=DetectResponse,
    summary="Score images as adversarial (reconstruction MSE)",
    openapi_extra=_openapi(DetectFields, {"image": EXAMPLE_PNG, "dataset": "mnist"}),
)
async def detect(request: Request, sv: Serving = Depends(get_serving)) -> Any:
    """Score = the reconstruction MSE after projection; flagged when above the threshold calibrated on clean images."""
    p, r, ds, t0, timings = await _purify(request, sv, DetectFields)
    timings["total_ms"] = (time.perf_counter() - t0) * 1e3
    dets = [
        {"score": float(r.mse[i]), "flagged": None if r.flagged is None else bool(r.flagged[i])}
        for i in range(len(r.mse))
    ]
    return {
        "dataset": ds,
        "defense": p.defense,
        **_projected(r),
        "fpr": r.fpr,
        "detections": dets,
        "timings_ms": timings,
    }


def _detector_info(registry: Registry, ds: str) -> dict[str, Any]:
    """Each start's main calibration, the grid of other (start, L, R) calibrations, and MagNet's thresholds."""
    keep = ("threshold", "fpr", "steps", "restarts", "n")
    det: dict[str, Any] = {init: (lambda c: None if c is None else {k: c[k] for k in keep if k in c})(
               registry.detector_calibration(ds, init)) for init in ("random", "encoder")}  # fmt: skip
    grid_keep = (*keep, "test_fpr", "test_n", "on_target")  # on_target False: measured off target, not used
    det["grid"] = {grid_key(c["init"], c["steps"], c["restarts"]): {k: c[k] for k in grid_keep if k in c}
                   for c in registry.detector_calibrations(ds) if not c["main"]}  # fmt: skip
    if registry.has(f"{ds}/magnet"):
        cal = registry.get(f"{ds}/magnet").raw.get("detector", {})
        det["magnet"] = {k: cal[k] for k in ("I", "II", "drop_rate", "n", "test_fpr") if k in cal}
    return det


def _dataset_info(registry: Registry, ds: str, settings: Settings) -> dict[str, Any]:
    clfs, spec = registry.classifiers(ds), registry.spec(ds)
    return {
        "classes": registry.class_names(ds),
        # the image format every network of the dataset takes, and how other sizes are fitted to it
        "spec": {
            "channels": spec.channels,
            "height": spec.height,
            "width": spec.width,
            "resize": spec.resize,
            "images_per_request": image_cap(settings, spec),
        },  # fmt: skip
        "classifiers": clfs,
        "generator": registry.has(f"{ds}/generator"),
        "encoder": registry.has(f"{ds}/encoder"),
        "defenses": offered_defenses(registry, ds),
        "detector": _detector_info(registry, ds),
        # the pipeline served when a call names none, and why (training.robustness)
        "default": {
            "classifier": default_classifier(registry, ds, settings.default_classifier),
            "defense": default_defense(registry, ds, None, settings.default_defense),
            **({"threat": registry.raw_defaults[ds].get("threat")} if ds in registry.raw_defaults else {}),
        },  # fmt: skip
        # per classifier: clean test accuracy, and per defense the clean and per-image worst-case accuracy
        # under AutoAttack-grade attacks per threat ({"accuracy", "ci", "n", "attacks"})
        "measured": {
            c: {"clean_test_accuracy": m.get("clean_test_accuracy"), "robustness": m.get("robustness", {})}
            for c in clfs
            for m in [registry.get(f"{ds}/{c}").metrics]
        },  # fmt: skip
    }


@router.get("/models", summary="What is loaded: datasets, classes, artifacts with hashes and metrics")
async def models(registry: Registry = Depends(get_registry), settings: Settings = Depends(get_settings)) -> Any:
    names = sorted({a.dataset for a in registry.artifacts.values()})
    datasets = {ds: _dataset_info(registry, ds, settings) for ds in names}
    artifacts = [
        {
            "key": a.key,
            "kind": a.kind,
            "dataset": a.dataset,
            "arch": a.arch,
            "files": a.files,
            "metrics": a.metrics,
            "command": a.raw.get("command"),
        }
        for a in registry.artifacts.values()
    ]
    s = settings
    return {
        "datasets": datasets,
        "artifacts": artifacts,
        "defaults": {
            "model": f"{s.default_dataset}/{default_classifier(registry, s.default_dataset, s.default_classifier)}",
            "defense": default_defense(registry, s.default_dataset, None, s.default_defense),
            "ranking": s.default_ranking,  # which measured default `pipelines` serves (MG_DEFAULT_RANKING)
            "pipelines": {
                ds: {"classifier": f"{ds}/{d.classifier}", "defense": d.defense} for ds, d in registry.defaults.items()
            },  # fmt: skip
            # per dataset the pipeline measured best under the union of its L∞ and L2 threats (training.robustness)
            "union": {
                ds: {"classifier": d["classifier"], "defense": d["defense"]}
                for ds, d in registry.raw_union_defaults.items()
            },  # fmt: skip
            "steps": s.default_steps,
            "restarts": s.default_restarts,
            "encoder_steps": s.encoder_steps,
            "encoder_restarts": s.encoder_restarts,
        },
        "attack": runner.catalog(s.attack),
        "caps": {
            "max_steps": s.max_steps,
            "max_restarts": s.max_restarts,
            "max_upload_bytes": s.max_upload_bytes,
            "max_image_pixels": s.max_image_pixels,
            "max_batch_images": s.max_batch_images,
        },
    }


# -- operations -------------------------------------------------------------------------------------
@ops_router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@ops_router.get("/readyz", summary="Readiness: models verified, loaded and warmed", responses=errors(503))
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    batcher = state.batcher
    if state.ready and batcher is not None and batcher.running:
        body = {"status": "ready", "device": str(state.engine.device), "queue_depth": batcher.depth}
        if state.guard is not None:  # the per-client state: in-process, or Redis and whether it answers
            body["client_state"] = state.guard.health()
        return JSONResponse(body)
    why = "shutting down" if batcher is not None and batcher.draining else state.not_ready_reason
    return JSONResponse({"error": f"not ready: {why}"}, status_code=503, headers={"Retry-After": "1"})


@ops_router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain; version=0.0.4": {}}, "description": "exposition text"}},
)
async def metrics(m: Metrics = Depends(get_metrics)) -> Response:
    return Response(m.render(), media_type=m.content_type)
