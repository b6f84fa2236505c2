"""The OpenAPI document's shared pieces: the error body, the error answers a route documents, and the server's caps
written into the schema as bounds (the caps are settings, so they are filled in when the app is built)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.config import Settings


class ErrorBody(BaseModel):
    error: str = Field(description="what was wrong, in words")


WHY = {
    400: "malformed body or parameter",
    404: "unknown model, dataset, version or defense",
    408: "the body arrived too slowly",
    413: "body, image or batch too large",
    415: "unsupported content type or encoding",
    422: "bad parameter, over a cap or over the compute budget",
    502: "the upstream answered badly or could not be reached",
    503: "busy (Retry-After), shutting down or not ready",
    504: "ran past the request timeout",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` entries of these error statuses: `{"error": "..."}` bodies."""
    return {code: {"model": ErrorBody, "description": WHY[code]} for code in codes}


def json_body(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _bound(node: dict[str, Any], **bounds: int) -> None:
    """Set bounds on the integer (or array) branch of a property schema (itself, or within anyOf)."""
    for branch in node.get("anyOf", [node]):
        if branch.get("type") in ("integer", "array"):
            branch.update(bounds)


def with_caps(doc: dict[str, Any], s: Settings) -> dict[str, Any]:
    """The generated OpenAPI document with the server's caps as bounds of every `steps`, `restarts` and `images`
    parameter or body property: a value outside them is refused (422), so the schema says so."""
    bounds = {
        "steps": {"minimum": 0, "maximum": s.max_steps},
        "restarts": {"minimum": 1, "maximum": s.max_restarts},
        "images": {"minItems": 1, "maxItems": s.max_batch_images},
    }
    for ops in doc.get("paths", {}).values():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param.get("name") in bounds:
                    _bound(param["schema"], **bounds[param["name"]])
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema", {})
            for name, prop in body.get("properties", {}).items():
                if name in bounds:
                    _bound(prop, **bounds[name])
    return doc


# -- the Open Inference Protocol's bodies (KServe V2 REST), as /v2 documents them ----------------------------------
_PARAMETERS = {"type": "object", "description": "scalar parameters (bool, number or string)"}
_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "datatype": {"type": "string", "enum": ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                                                "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "parameters": _PARAMETERS,
        "data": {"type": "array", "description": "row-major, flat or nested; absent with binary_data_size"},
    },
}  # fmt: skip
_METADATA_TENSOR = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                   "shape": {"type": "array", "items": {"type": "integer"}}},
}  # fmt: skip
INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": _PARAMETERS,
        "inputs": {"type": "array", "minItems": 1, "items": _TENSOR},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                               "properties": {"name": {"type": "string"}, "parameters": _PARAMETERS}}},
    },
}  # fmt: skip
INFER_RESPONSE = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
                   "parameters": _PARAMETERS, "outputs": {"type": "array", "items": _TENSOR}},
}  # fmt: skip
MODEL_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
                   "platform": {"type": "string"}, "inputs": {"type": "array", "items": _METADATA_TENSOR},
                   "outputs": {"type": "array", "items": _METADATA_TENSOR}},
}  # fmt: skip
_BINARY = "application/octet-stream"
_BINARY_NOTE = ("the JSON header (its length in Inference-Header-Content-Length), then the binary tensors' bytes; "
                "Content-Encoding gzip or deflate accepted")  # fmt: skip
INFER = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": INFER_REQUEST},
                    _BINARY: {"schema": {"type": "string", "format": "binary", "description": _BINARY_NOTE}}},
    }
}  # fmt: skip
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the outputs (binary ones after the JSON header; compressed per Accept-Encoding)",
        "content": {"application/json": {"schema": INFER_RESPONSE}, _BINARY: {"schema": {"type": "string",
                                                                                         "format": "binary"}}},
    },
    **errors(400, 404, 408, 413, 415, 422, 502, 503, 504),
}  # fmt: skip
RAW_IMAGE = {
    "requestBody": {
        "required": True,
        "content": {t: {"schema": {"type": "string", "format": "binary"}}
                    for t in ("image/png", "image/jpeg", "image/webp", "application/x-npy")},
    }
}  # fmt: skip
RAW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the upstream's reply as it sent it; purification details in X-Purification-* headers",
          "content": {"*/*": {}}},
    **errors(400, 404, 408, 413, 415, 422, 502, 503, 504),
}  # fmt: skip
