"""The model repository: every served name an object with versions and readiness (service.served)."""

from __future__ import annotations

import asyncio

from service.batcher import Batcher
from service.config import Settings
from service.engine import Engine
from service.proxy import ProxyClient
from service.registry import Registry
from service.served import ModelRepository, OwnModel, ProxiedModel, RawUpstream


def test_repository_names_versions_and_per_model_readiness(tiny_registry: Registry) -> None:
    settings = Settings(proxy={"upstreams": {"up": {"url": "http://127.0.0.1:9"},  # type: ignore[arg-type]
                                             "raw": {"url": "http://127.0.0.1:9", "protocol": "raw"}}})  # fmt: skip
    engine_ready = [True]
    proxy = ProxyClient(settings.proxy)
    repo = ModelRepository(Batcher(Engine(tiny_registry, "cpu")), proxy, settings, lambda: engine_ready[0])
    own = repo.get("mnist-classifier_A")
    assert isinstance(own, OwnModel) and own.versions == ("1",) and not own.ready  # not loaded yet

    async def main() -> tuple[bool, bool, bool]:
        await repo.load()
        ready = await own.is_ready()
        engine_ready[0] = False
        not_ready = await own.is_ready()
        upstream_down = await repo.proxied["up"].is_ready()  # nothing listens on port 9
        await proxy.aclose()
        return ready, not_ready, upstream_down

    assert asyncio.run(main()) == (True, False, False)
    assert isinstance(repo.get("up"), ProxiedModel) and repo.get("up").versions == ()  # type: ignore[union-attr]
    assert isinstance(repo.get("raw"), RawUpstream) and repo.get("nobody") is None
    assert list(repo.own) == ["mnist-classifier_A"] and list(repo.proxied) == ["up", "raw"]
    meta = asyncio.run(own.metadata())
    assert meta["versions"] == ["1"] and [o["name"] for o in meta["outputs"]][:2] == ["probabilities", "labels"]
