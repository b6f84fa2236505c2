"""Injected dependencies: everything a route needs lives on `app.state`, built once by the app's lifespan.

Every router (v1, v2, attack) uses the same functions: `batcher: Batcher = Depends(get_batcher)`.
They are `async` so FastAPI calls them in the event loop (a plain `def` dependency costs a thread hop each).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from service.attacks.runner import SubstituteCache
from service.batcher import Batcher
from service.config import Settings
from service.engine import Engine
from service.errors import ServiceError
from service.guard import client_id
from service.metrics import Metrics
from service.profile import Caller
from service.registry import Registry
from service.served import ModelRepository


def _state(request: Request, name: str) -> object:
    value = getattr(request.app.state, name, None)
    if value is None:
        raise ServiceError(f"the service is starting: {name} is not ready", 503)
    return value


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_registry(request: Request) -> Registry:
    return _state(request, "registry")  # type: ignore[return-value]


async def get_engine(request: Request) -> Engine:
    return _state(request, "engine")  # type: ignore[return-value]


async def get_batcher(request: Request) -> Batcher:
    return _state(request, "batcher")  # type: ignore[return-value]


async def get_models(request: Request) -> ModelRepository:
    """/v2's models: ours and the proxied ones."""
    return _state(request, "models")  # type: ignore[return-value]


async def get_substitutes(request: Request) -> SubstituteCache:
    return _state(request, "substitutes")  # type: ignore[return-value]


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Serving:
    """What a defended route needs: the settings, the verified registry and the batcher."""

    settings: Settings
    registry: Registry
    batcher: Batcher


async def get_serving(request: Request) -> Serving:
    return Serving(await get_settings(request), await get_registry(request), await get_batcher(request))


async def get_caller(request: Request) -> Caller:
    """The client the per-client defences count (its API key, else its address; X-Forwarded-For only from a
    trusted proxy) and whether its key has the inspect scope (service.profile)."""
    s: Settings = request.app.state.settings
    key = request.headers.get("x-api-key")
    inspect = key in s.profile.inspect_keys
    if not s.guarded:  # no per-client defence counts it: no identity to work out
        return Caller("local", inspect)
    peer = request.client.host if request.client else None
    return Caller(client_id(request.headers, peer, s.clients.trusted_proxies), inspect)
