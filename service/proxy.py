"""Upstream client of the purification proxy: forward purified tensors to allow-listed model servers.

Only upstreams named in `settings.proxy.upstreams` are ever contacted; a request names an upstream, never a URL.
One pooled `httpx.AsyncClient` per process. Failures map to the protocol's errors: upstream unreachable → 502,
upstream too slow → 504, upstream reply malformed (or too large, or a 5xx) → 502, upstream 4xx → the same 4xx.

The tensor side is here too: `to_unit` turns an upstream-format image tensor (NCHW/NHWC, FP32/UINT8, range 1 or
255, 1 or 3 channels) into the dataset's N×C×H×W in [0, 1] for purification, `from_unit` turns the purified images
back. A colour dataset purifies an RGB upstream in colour; a gray one (MNIST's) purifies an RGB upstream's channel
mean and replicates it back.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import numpy as np
import torch

from service import oip
from service.config import ProxySettings, Upstream
from service.datasets import MNIST, DatasetSpec
from service.errors import ServiceError

FORWARDED_HEADERS = ("x-request-id", "traceparent", "tracestate")
Purify = Callable[[torch.Tensor, str], Awaitable[torch.Tensor]]  # (N×C×H×W in [0, 1], dataset) → purified


class UpstreamError(ServiceError):
    """An upstream call that failed; `status` is what the proxy answers (502, 504, or the upstream's 4xx)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, status)

    def status_for(self, oip: bool) -> int:
        return self.status  # the upstream's own 4xx (a 422 included) passes through as it came


# -- tensors -------------------------------------------------------------------------------------------------------
def image_shapes(spec: DatasetSpec, layout: str) -> list[tuple[int, int, int]]:
    """The per-image shapes an upstream of `spec`'s dataset may take in `layout`: the dataset's channels, or RGB in
    front of a gray dataset (its channels' mean is purified and replicated back)."""
    h, w = spec.height, spec.width
    return [(c, h, w) if layout == "NCHW" else (h, w, c) for c in ((1, 3) if spec.channels == 1 else (3,))]


def to_unit(data: np.ndarray, up: Upstream, spec: DatasetSpec = MNIST) -> tuple[torch.Tensor, int]:
    """(N×C×H×W float32 in [0, 1] of `spec`, the upstream's channel count) of an image tensor in the upstream's
    format; OIPError if not."""
    shapes = image_shapes(spec, up.layout)
    want = " or ".join("N×" + "×".join(map(str, sh)) for sh in shapes)
    if data.ndim != 4 or tuple(data.shape[1:]) not in shapes or data.shape[0] == 0:
        raise oip.OIPError(f"input {up.input_name!r} must have shape {want} ({up.layout}), got {list(data.shape)}")
    x = data if up.layout == "NCHW" else data.transpose(0, 3, 1, 2)
    c = x.shape[1]
    x = x.astype(np.float32) / np.float32(up.value_range)
    if not np.isfinite(x).all():
        raise oip.OIPError(f"input {up.input_name!r} contains NaN or infinity")
    if x.min() < 0 or x.max() > 1:
        raise oip.OIPError(f"input {up.input_name!r} values must lie in [0, {up.value_range:g}]")
    if c != spec.channels:  # an RGB upstream in front of a gray dataset: its channels' mean is purified
        x = x.mean(axis=1, keepdims=True)
    return torch.from_numpy(np.ascontiguousarray(x)), c


def from_unit(x: torch.Tensor, up: Upstream, channels: int = 1) -> np.ndarray:
    """Purified N×C×H×W images in [0, 1] as the upstream expects them (layout, `channels`, datatype, range)."""
    a = x.detach().cpu().numpy().astype(np.float32).clip(0, 1) * np.float32(up.value_range)
    if channels != a.shape[1]:
        a = np.repeat(a, channels, axis=1)
    if up.layout == "NHWC":
        a = a.transpose(0, 2, 3, 1)
    if up.datatype == "UINT8":
        return np.ascontiguousarray(np.rint(a).astype(np.uint8))
    return np.ascontiguousarray(a, dtype=np.float32)


@dataclass
class Forwarded:
    """The upstream's answer to a purified request."""

    response: oip.InferResponse
    images: int


# -- client --------------------------------------------------------------------------------------------------------
class ProxyClient:
    """Pooled HTTP client for the allow-listed upstreams."""

    def __init__(self, settings: ProxySettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        timeout = httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s)
        limits = httpx.Limits(max_connections=settings.max_connections,
                              max_keepalive_connections=settings.max_keepalive_connections,
                              keepalive_expiry=settings.keepalive_expiry_s)  # fmt: skip
        # identity: replies are read raw and capped in bytes (`_send`), so none may arrive compressed
        self._client = httpx.AsyncClient(timeout=timeout, limits=limits, transport=transport, follow_redirects=False,
                                         trust_env=False, headers={"Accept-Encoding": "identity"})  # fmt: skip

    async def aclose(self) -> None:
        await self._client.aclose()

    def upstream(self, name: str) -> Upstream | None:
        return self.settings.upstreams.get(name)

    @staticmethod
    def _url(up: Upstream, name: str, *parts: str) -> str:
        model = quote(up.model or name, safe="")
        return up.url.rstrip("/") + "/".join(("", *(p.format(model=model) for p in parts)))

    async def _send(self, up: Upstream, method: str, url: str, content: bytes | None = None,
                    headers: dict[str, str] | None = None) -> tuple[httpx.Response, bytes]:  # fmt: skip
        """(response, body) of one upstream call; transport failures become UpstreamError 502/504."""
        s = self.settings
        timeout = httpx.Timeout(up.timeout_s or s.timeout_s, connect=s.connect_timeout_s)
        try:
            async with self._client.stream(method, url, content=content, headers=headers, timeout=timeout) as r:
                chunks, size = [], 0
                async for chunk in r.aiter_raw():
                    size += len(chunk)
                    if size > self.settings.max_response_bytes:
                        raise UpstreamError(502, f"upstream reply exceeds {self.settings.max_response_bytes} bytes")
                    chunks.append(chunk)
                return r, b"".join(chunks)
        except httpx.TimeoutException as e:
            raise UpstreamError(504, f"upstream timed out ({type(e).__name__})") from None
        except (httpx.TransportError, httpx.DecodingError) as e:
            raise UpstreamError(502, f"upstream unreachable or broken ({type(e).__name__}: {e})") from None

    @staticmethod
    def _failure(r: httpx.Response, body: bytes) -> UpstreamError:
        """The proxy's error for a non-2xx upstream reply: its 4xx passes through, anything else is a 502."""
        try:
            msg = str(json.loads(body)["error"])
        except Exception:
            msg = body[:200].decode("utf-8", errors="replace")
        status = r.status_code if 400 <= r.status_code < 500 else 502
        return UpstreamError(status, f"upstream answered {r.status_code}: {msg}")

    async def infer(self, name: str, req: oip.InferRequest, headers: dict[str, str] | None = None,
                    up: Upstream | None = None) -> oip.InferResponse:  # fmt: skip
        """Forward an (already purified) V2 request and decode the upstream's response (`up`: `name`'s entry, when
        the caller holds it already)."""
        up = up or self._require(name, "v2")
        req = _for_upstream(req, up)
        body, h = oip.encode_request(req, binary_inputs=up.binary_data)
        r, content = await self._send(up, "POST", self._url(up, name, "v2", "models", "{model}", "infer"), body,
                                      {**h, **_forwarded(headers)})  # fmt: skip
        if r.status_code != 200:
            raise self._failure(r, content)
        try:
            resp = oip.decode_response(content, r.headers.get(oip.HEADER_LENGTH))
        except oip.OIPError as e:
            raise UpstreamError(502, str(e)) from None
        resp.model_name = name
        return resp

    async def predictions(self, name: str, image: bytes, content_type: str,
                          headers: dict[str, str] | None = None) -> tuple[bytes, str]:  # fmt: skip
        """POST image bytes to a raw (TorchServe-style) upstream; (reply body, reply content type)."""
        up = self._require(name, "raw")
        r, content = await self._send(up, "POST", self._url(up, name, "predictions", "{model}"), image,
                                      {"Content-Type": content_type, **_forwarded(headers)})  # fmt: skip
        if not 200 <= r.status_code < 300:
            raise self._failure(r, content)
        return content, r.headers.get("content-type", "application/octet-stream")

    async def ready(self, name: str) -> bool:
        """Whether the upstream says the model is ready (False when it cannot be reached)."""
        up = self._require(name, "v2")
        try:
            r, _ = await self._send(up, "GET", self._url(up, name, "v2", "models", "{model}", "ready"))
        except UpstreamError:
            return False
        return r.status_code == 200

    async def metadata(self, name: str) -> dict:
        """The upstream's model metadata, renamed to the proxied name."""
        up = self._require(name, "v2")
        r, content = await self._send(up, "GET", self._url(up, name, "v2", "models", "{model}"))
        if r.status_code != 200:
            raise self._failure(r, content)
        try:
            meta = json.loads(content)
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise UpstreamError(502, f"malformed upstream metadata: {e}") from None
        return {**meta, "name": name}

    def _require(self, name: str, protocol: str) -> Upstream:
        up = self.upstream(name)
        if up is None:
            raise UpstreamError(404, f"no upstream named {name!r}")
        if up.protocol != protocol:
            raise UpstreamError(400, f"upstream {name!r} speaks {up.protocol!r}, not {protocol!r}")
        return up


def _forwarded(headers: dict[str, str] | None) -> dict[str, str]:
    return {k: v for k, v in (headers or {}).items() if k.lower() in FORWARDED_HEADERS}


def _for_upstream(req: oip.InferRequest, up: Upstream) -> oip.InferRequest:
    """The request as sent upstream: without binary-output flags when the upstream speaks JSON only."""
    if up.binary_data:
        return req
    params = {k: v for k, v in req.parameters.items() if k != "binary_data_output"}
    outputs = None if req.outputs is None else [
        oip.RequestedOutput(o.name, {k: v for k, v in o.parameters.items() if k != "binary_data"}) for o in req.outputs
    ]  # fmt: skip
    return oip.InferRequest(req.inputs, outputs, req.id, params)


async def purify_and_forward(client: ProxyClient, name: str, up: Upstream, req: oip.InferRequest, purify: Purify,
                             spec: DatasetSpec, headers: dict[str, str] | None = None) -> Forwarded:  # fmt: skip
    """Purify the image input of `req` for the upstream `up` (allow-listed as `name`, its images of `spec`'s
    dataset) in place, forward it, return the upstream's response."""
    t = req.input(up.input_name)
    if t.datatype != up.datatype:
        raise oip.OIPError(f"input {up.input_name!r} must be {up.datatype} for upstream {name!r}, got {t.datatype}")
    x, channels = to_unit(t.data, up, spec)
    purified = await purify(x, up.dataset)
    t.data = from_unit(purified, up, channels)
    return Forwarded(await client.infer(name, req, headers, up), images=x.shape[0])
