"""Per-client defences of the public profile: who a client is, its rate limit and query budget, and a stateful
query-attack detector (Blacklight), with the state in this process or shared through Redis.

    from service.guard import Guard, Throttled, client_id
    guard = Guard.from_settings(settings, metrics)
    await guard.check(client_id(headers, peer, settings.clients.trusted_proxies), images)   # or raises Throttled

Modules: identity (client_id), limits (token bucket, budget, Throttled), detector (fingerprints, the in-process
index), state (in-process and Redis backends), guard (the facade).
"""

from service.guard.detector import BlacklightConfig, Fingerprinter, Verdict
from service.guard.guard import Guard, GuardCore
from service.guard.identity import client_id
from service.guard.limits import Limits, Throttled

__all__ = ["BlacklightConfig", "Fingerprinter", "Guard", "GuardCore", "Limits", "Throttled", "Verdict", "client_id"]
