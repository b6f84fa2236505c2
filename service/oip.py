"""Open Inference Protocol (KServe V2 REST) codec: JSON tensors and the binary tensor extension.

A request or response body is a JSON object, optionally followed by raw tensor bytes. With the binary extension the
HTTP header `Inference-Header-Content-Length` gives the JSON part's length; every binary tensor carries
`parameters.binary_data_size` and its bytes follow in the order of the tensors, little-endian, row-major. BYTES
elements are each a 4-byte little-endian length and the raw bytes. A caller asks for binary outputs with
`outputs[i].parameters.binary_data: true` or, for all outputs, request `parameters.binary_data_output: true`.

Everything here is pure (bytes in, arrays out); every malformed input raises `OIPError` with a message meant for
the caller. Nothing here knows HTTP frameworks or models.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import ServiceError

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"

# datatype → little-endian numpy dtype (BYTES is a sequence of length-prefixed byte strings)
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
DATATYPES: tuple[str, ...] = tuple(DTYPES)


class OIPError(ServiceError, ValueError):
    """A request or response that does not follow the protocol (400 unless another status is given)."""

    status = 400


@dataclass
class Tensor:
    """One named tensor: `data` has shape `shape` and the numpy dtype of `datatype` (object of bytes for BYTES)."""

    name: str
    datatype: str
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> list[int]:
        return list(self.data.shape)

    @classmethod
    def from_numpy(cls, name: str, array: np.ndarray, parameters: dict[str, Any] | None = None) -> Tensor:
        """A tensor named `name` holding `array`, its datatype inferred from the array's dtype."""
        return cls(name, datatype_of(array), _as_dtype(array, datatype_of(array)), dict(parameters or {}))


@dataclass
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def input(self, name: str) -> Tensor:
        for t in self.inputs:
            if t.name == name:
                return t
        raise OIPError(f"request has no input named {name!r}; inputs: {[t.name for t in self.inputs]}")

    def binary_outputs(self) -> set[str] | bool:
        """Which outputs the caller wants as binary: True for all, else the set of names."""
        if _flag(self.parameters, "binary_data_output"):
            return True
        return {o.name for o in self.outputs or [] if _flag(o.parameters, "binary_data")}


@dataclass
class InferResponse:
    model_name: str
    outputs: list[Tensor]
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


# -- datatypes -----------------------------------------------------------------------------------------------------
def datatype_of(array: np.ndarray) -> str:
    """The protocol datatype of a numpy array (object/str/bytes arrays are BYTES)."""
    kind = array.dtype.kind
    if kind in "OSU":
        return "BYTES"
    for name, dt in DTYPES.items():
        if name != "BYTES" and dt.kind == kind and dt.itemsize == array.dtype.itemsize:
            return name
    raise OIPError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype", status=500)


def _as_dtype(array: np.ndarray, datatype: str) -> np.ndarray:
    if datatype == "BYTES":
        out = np.empty(array.shape, dtype=object)
        for i, v in enumerate(array.reshape(-1)):
            out.reshape(-1)[i] = v.encode() if isinstance(v, str) else bytes(v)
        return out
    return np.ascontiguousarray(array, dtype=DTYPES[datatype])


def _flag(params: Mapping[str, Any] | None, key: str) -> bool:
    v = (params or {}).get(key, False)
    if not isinstance(v, bool):
        raise OIPError(f"parameter {key!r} must be true or false, got {v!r}")
    return v


# -- decoding ------------------------------------------------------------------------------------------------------
def split_body(body: bytes, header_length: str | int | None) -> tuple[dict[str, Any], memoryview]:
    """(JSON header as dict, the binary bytes after it) of a body; header_length None means JSON only."""
    if header_length is None or header_length == "":
        n = len(body)
    else:
        try:
            n = int(header_length)
        except (TypeError, ValueError):
            raise OIPError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if n < 0 or n > len(body):
            raise OIPError(f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
    try:
        head = json.loads(bytes(body[:n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OIPError(f"body is not valid JSON: {e}") from None
    if not isinstance(head, dict):
        raise OIPError("body must be a JSON object")
    return head, memoryview(body)[n:]


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise OIPError(f"{where}: 'shape' must be a list of integers, got {value!r}")
    if any(d < 0 for d in value):
        raise OIPError(f"{where}: 'shape' must not hold negative dimensions, got {value}")
    return tuple(value)


def _params(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OIPError(f"{where}: 'parameters' must be an object")
    return dict(value)


def _from_json(data: Any, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A typed array from JSON data (flat row-major list, or nested lists), strictly checked against datatype."""
    count = math.prod(shape)
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat = _flatten(data, where)
        if not all(isinstance(v, str) for v in flat):
            raise OIPError(f"{where}: BYTES data must be strings")
        arr = np.empty(len(flat), dtype=object)
        arr[:] = [v.encode() for v in flat]
    else:
        try:
            arr = np.asarray(data).reshape(-1)
        except ValueError:
            raise OIPError(f"{where}: 'data' is ragged") from None
        if arr.size and arr.dtype.kind not in "biuf":
            raise OIPError(f"{where}: {datatype} data must be numbers, got {arr.dtype.kind!r} values")
        want = DTYPES[datatype]
        if want.kind == "b":
            if arr.size and arr.dtype.kind != "b":
                raise OIPError(f"{where}: BOOL data must be true/false")
        elif want.kind in "iu":
            if arr.size and arr.dtype.kind not in "iu":
                raise OIPError(f"{where}: {datatype} data must be integers")
            info = np.iinfo(want)
            if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
                raise OIPError(f"{where}: values out of range for {datatype}")
        elif arr.size and arr.dtype.kind == "b":
            raise OIPError(f"{where}: {datatype} data must be numbers, not booleans")
        arr = arr.astype(want)
    if arr.size != count:
        raise OIPError(f"{where}: shape {list(shape)} needs {count} elements, 'data' has {arr.size}")
    return arr.reshape(shape)


def _flatten(data: list, where: str) -> list:
    out: list = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def _from_bytes(raw: memoryview, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        items, pos, buf = [], 0, bytes(raw)
        while pos < len(buf):
            if pos + 4 > len(buf):
                raise OIPError(f"{where}: truncated BYTES element length")
            n = int.from_bytes(buf[pos : pos + 4], "little")
            if pos + 4 + n > len(buf):
                raise OIPError(f"{where}: BYTES element of {n} bytes runs past the tensor")
            items.append(buf[pos + 4 : pos + 4 + n])
            pos += 4 + n
        if len(items) != count:
            raise OIPError(f"{where}: shape {list(shape)} needs {count} elements, binary data has {len(items)}")
        arr = np.empty(count, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    dt = DTYPES[datatype]
    if len(raw) != count * dt.itemsize:
        raise OIPError(f"{where}: shape {list(shape)} of {datatype} needs {count * dt.itemsize} bytes, "
                       f"binary_data_size is {len(raw)}")  # fmt: skip
    arr = np.frombuffer(raw, dtype=dt, count=count).reshape(shape)
    if dt.kind == "b" and arr.size and (np.frombuffer(raw, dtype="u1") > 1).any():
        raise OIPError(f"{where}: BOOL bytes must be 0 or 1")
    return arr.copy()


def _tensors(items: Any, binary: memoryview, offset: int, kind: str) -> tuple[list[Tensor], int]:
    if not isinstance(items, list):
        raise OIPError(f"'{kind}' must be a list")
    out: list[Tensor] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"{kind}[{i}]"
        if not isinstance(item, dict):
            raise OIPError(f"{where} must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise OIPError(f"{where}: 'name' must be a non-empty string")
        where = f"{kind} {name!r}"
        if name in seen:
            raise OIPError(f"{where} appears twice")
        seen.add(name)
        datatype = item.get("datatype")
        if not isinstance(datatype, str) or datatype not in DTYPES:
            raise OIPError(f"{where}: unknown datatype {datatype!r}; expected one of {list(DATATYPES)}")
        shape = _shape(item.get("shape"), where)
        params = _params(item.get("parameters"), where)
        size = params.pop("binary_data_size", None)
        if size is not None:
            if "data" in item:
                raise OIPError(f"{where}: has both 'data' and binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise OIPError(f"{where}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise OIPError(f"{where}: binary_data_size {size} runs past the end of the body")
            data = _from_bytes(binary[offset : offset + size], datatype, shape, where)
            offset += size
        elif "data" in item:
            data = _from_json(item["data"], datatype, shape, where)
        else:
            raise OIPError(f"{where}: needs 'data' or parameters.binary_data_size")
        out.append(Tensor(name, datatype, data, params))
    return out, offset


def decode_request(body: bytes, header_length: str | int | None = None) -> InferRequest:
    """Parse an inference request body (JSON, or JSON + binary tensors when header_length is given)."""
    head, binary = split_body(body, header_length)
    if "inputs" not in head:
        raise OIPError("request needs 'inputs'")
    inputs, used = _tensors(head["inputs"], binary, 0, "inputs")
    if not inputs:
        raise OIPError("'inputs' must not be empty")
    if used != len(binary):
        raise OIPError(f"body has {len(binary) - used} bytes after the last binary tensor")
    outputs = None
    if head.get("outputs") is not None:
        if not isinstance(head["outputs"], list):
            raise OIPError("'outputs' must be a list")
        outputs = []
        for i, o in enumerate(head["outputs"]):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise OIPError(f"outputs[{i}] must be an object with a 'name'")
            outputs.append(RequestedOutput(o["name"], _params(o.get("parameters"), f"outputs[{i}]")))
    rid = head.get("id")
    if rid is not None and not isinstance(rid, str):
        raise OIPError("'id' must be a string")
    req = InferRequest(inputs, outputs, rid, _params(head.get("parameters"), "request"))
    req.binary_outputs()  # validates the flags
    return req


def decode_response(body: bytes, header_length: str | int | None = None) -> InferResponse:
    """Parse an inference response body; raises OIPError (status 502) on anything malformed."""
    try:
        head, binary = split_body(body, header_length)
        if not isinstance(head.get("model_name"), str):
            raise OIPError("response needs a string 'model_name'")
        if "outputs" not in head:
            raise OIPError("response needs 'outputs'")
        outputs, used = _tensors(head["outputs"], binary, 0, "outputs")
        if used != len(binary):
            raise OIPError(f"body has {len(binary) - used} bytes after the last binary tensor")
        version = head.get("model_version")
        return InferResponse(head["model_name"], outputs, None if version is None else str(version), head.get("id"),
                             _params(head.get("parameters"), "response"))  # fmt: skip
    except OIPError as e:
        raise OIPError(f"malformed upstream response: {e}", status=502) from None


# -- encoding ------------------------------------------------------------------------------------------------------
def _tensor_bytes(t: Tensor) -> bytes:
    if t.datatype == "BYTES":
        parts = []
        for v in t.data.reshape(-1):
            b = v.encode() if isinstance(v, str) else bytes(v)
            parts += [len(b).to_bytes(4, "little"), b]
        return b"".join(parts)
    return np.ascontiguousarray(t.data, dtype=DTYPES[t.datatype]).tobytes()


def _tensor_json(t: Tensor) -> list:
    flat = t.data.reshape(-1)
    if t.datatype == "BYTES":
        return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in flat]
    if t.datatype in ("FP16", "FP32", "FP64"):
        if not np.isfinite(flat).all():
            raise OIPError(f"tensor {t.name!r} holds NaN or infinity, which JSON cannot carry; ask for binary",
                           status=500)  # fmt: skip
        return flat.astype(np.float64).tolist() if t.datatype == "FP16" else flat.tolist()
    return flat.tolist()


def _encode(head: dict[str, Any], key: str, tensors: Iterable[Tensor], binary: set[str] | bool) -> tuple[bytes, dict]:
    items, chunks = [], []
    for t in tensors:
        params = {k: v for k, v in t.parameters.items() if k not in ("binary_data_size", "binary_data")}
        item: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if binary is True or (binary and t.name in binary):
            raw = _tensor_bytes(t)
            chunks.append(raw)
            params["binary_data_size"] = len(raw)
        else:
            item["data"] = _tensor_json(t)
        if params:
            item["parameters"] = params
        items.append(item)
    head[key] = items
    header = json.dumps(head, separators=(",", ":")).encode()
    if not chunks:
        return header, {"Content-Type": JSON_TYPE}
    return header + b"".join(chunks), {"Content-Type": BINARY_TYPE, HEADER_LENGTH: str(len(header))}


def encode_request(req: InferRequest, binary_inputs: set[str] | bool = False) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a request; inputs named in binary_inputs (True: all) travel as raw bytes."""
    head: dict[str, Any] = {}
    if req.id is not None:
        head["id"] = req.id
    if req.parameters:
        head["parameters"] = req.parameters
    if req.outputs is not None:
        head["outputs"] = [{"name": o.name, **({"parameters": o.parameters} if o.parameters else {})}
                           for o in req.outputs]  # fmt: skip
    return _encode(head, "inputs", req.inputs, binary_inputs)


def encode_response(resp: InferResponse, binary_outputs: set[str] | bool = False) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a response; outputs named in binary_outputs (True: all) travel as raw bytes."""
    head: dict[str, Any] = {"model_name": resp.model_name}
    if resp.model_version is not None:
        head["model_version"] = resp.model_version
    if resp.id is not None:
        head["id"] = resp.id
    if resp.parameters:
        head["parameters"] = resp.parameters
    return _encode(head, "outputs", resp.outputs, binary_outputs)


# -- content encodings (Triton's HTTP compression extension) -------------------------------------------------------
ENCODINGS = ("gzip", "deflate")  # "deflate" is the zlib format (RFC 9110), as tritonclient sends and reads it


def decode_content(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A request body sent with `Content-Encoding` `encoding` (gzip, deflate, identity or none), decoded. The cap
    `limit` applies to the decoded bytes too: a small bomb is refused (413), never inflated past it."""
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ENCODINGS:
        raise OIPError(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none", status=415)
    d = zlib.decompressobj(zlib.MAX_WBITS | (16 if encoding == "gzip" else 0))
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise OIPError(f"the {encoding} body could not be decoded: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise OIPError(f"the decoded body exceeds {limit} bytes", status=413)
    return out


def response_encoding(accept: str | None) -> str | None:
    """The compression to answer with for an `Accept-Encoding` header: gzip or deflate, whichever the caller
    accepts with the higher q (gzip on a tie; `*` means gzip), None for an uncompressed answer."""
    best, best_q = None, 0.0
    for item in (accept or "").split(","):
        name, _, params = item.strip().lower().partition(";")
        name = "gzip" if name.strip() == "*" else name.strip()
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if name in ENCODINGS and (q > best_q or (q == best_q > 0 and name == "gzip")):
            best, best_q = name, q
    return best


def compress(body: bytes, encoding: str) -> bytes:
    """`body` in `encoding` (one of ENCODINGS)."""
    return gzip.compress(body, compresslevel=6) if encoding == "gzip" else zlib.compress(body, 6)


def error_body(message: str) -> dict[str, str]:
    """The protocol's error object."""
    return {"error": message}
