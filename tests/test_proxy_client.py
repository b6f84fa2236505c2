"""The proxy's upstream client reads replies raw under a byte cap, so it must ask for them uncompressed: an upstream
that compresses whatever the client accepts (as this service's own /v2 does) still decodes."""

from __future__ import annotations

import asyncio
import gzip
import json

import httpx

from service.config import ProxySettings, Upstream
from service.proxy import ProxyClient


def compressing_upstream(request: httpx.Request) -> httpx.Response:
    """Model metadata, gzip-compressed when the request accepts gzip."""
    body = json.dumps({"name": "m", "inputs": [], "outputs": []}).encode()
    if "gzip" in request.headers.get("accept-encoding", ""):
        return httpx.Response(200, stream=httpx.ByteStream(gzip.compress(body)), headers={"content-encoding": "gzip"})
    return httpx.Response(200, stream=httpx.ByteStream(body))


def test_upstream_replies_are_asked_for_uncompressed() -> None:
    settings = ProxySettings(upstreams={"up": Upstream(url="http://upstream.test")})
    client = ProxyClient(settings, transport=httpx.MockTransport(compressing_upstream))

    async def go() -> dict:
        try:
            return await client.metadata("up")
        finally:
            await client.aclose()

    assert asyncio.run(go())["name"] == "up"
