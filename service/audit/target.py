"""The audited model: an allow-listed name, checked against its metadata, called in-process bare or guarded.

    host = Host(settings, models, proxy, loop)              # the app's model repository and proxy, on its loop
    spec = target_spec("user-model", host)                  # its dataset's C×H×W and classes (no request sent)
    info = resolve_target("user-model", host, contract)     # AuditError 404 for a name not on the allow-list
    client = TargetClient(host, info, variant, meter)       # `service.attacks.query.Client`'s interface
    answer = client.infer(x)                                # N×C×H×W in [0, 1] of `info.spec` → labels (and scores)

The bare target is called through the proxy's upstream client (the request in the upstream's own input format, no
purification; our own models with defense "none"); a guarded variant through the model the proxy serves under the
same name, with the pipeline's parameters: the guard in front, in the same process. No URL comes from a request:
names resolve through `settings.audit.targets` (default every proxied Open Inference Protocol upstream).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service import oip
from service.attacks.query import MAX_ROWS, Answer, Stopped
from service.audit.spec import AuditError, Contract, Variant
from service.batcher import NotRunning
from service.config import Settings, Upstream
from service.datasets import DatasetSpec
from service.errors import ServiceError
from service.proxy import ProxyClient, from_unit, image_shapes
from service.request import image_cap
from service.served import ModelRepository, OwnModel, ProxiedModel, upstream_probabilities

WARM_STARTS = ("invert-classify", "enhanced-invert-classify")
RETRIES = 5  # a 503 (the engine's queue full) is retried this often, with a growing pause


class Cancelled(Exception):
    """The audit was cancelled: every query after it raises this."""


class BudgetSpent(Stopped):
    """The audit's total query budget is spent (a `Stopped`: the attack keeps what it has)."""


@dataclass
class Host:
    """The running service's models and proxy, and the event loop they live on (the audit runs in a thread)."""

    settings: Settings
    models: ModelRepository
    proxy: ProxyClient
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)


@dataclass
class Meter:
    """Rows sent per variant and phase, their seconds, the attacks' shared budget, and the cancel flag."""

    budget: int
    cancel: threading.Event = field(default_factory=threading.Event)
    reason: str = "cancelled by the caller"  # why `cancel` was set (the server's shutdown, or the caller)
    phase: str = "clean"  # clean | timing | attack | judge
    spent: int = 0  # rows the attacks and substitutes sent (the budget's)
    rows: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)

    def check(self, variant: str, n: int) -> None:
        if self.cancel.is_set():
            raise Cancelled
        if self.phase == "attack" and self.spent + n > self.budget:
            raise BudgetSpent(f"the audit's budget of {self.budget:,} queries is spent")

    def add(self, variant: str, n: int, secs: float) -> None:
        if self.phase == "attack":
            self.spent += n
        r, s = self.rows.setdefault(variant, {}), self.seconds.setdefault(variant, {})
        r[self.phase] = r.get(self.phase, 0) + n
        s[self.phase] = s.get(self.phase, 0.0) + secs


@dataclass
class TargetInfo:
    """What the audit learned about its target before attacking it."""

    name: str
    kind: str  # proxied | own
    upstream: Upstream | None
    dataset: str
    metadata: dict
    repository: list[str] | None  # the server's model list (POST /v2/repository/index), where it offers one
    notes: list[str]
    spec: DatasetSpec  # the dataset's images (C×H×W) and classes: what the audit sends, attacks and judges
    channels: int = 0  # the upstream's channel count where its metadata gives one (3: RGB before a gray dataset)

    def public(self) -> dict:
        up = self.upstream
        contract = None if up is None else up.model_dump(include={"input_name", "layout", "datatype", "value_range"})
        return {"name": self.name, "kind": self.kind, "dataset": self.dataset, "contract": contract,
                "metadata": self.metadata, "repository": self.repository, "notes": self.notes}  # fmt: skip


def allowed_targets(s: Settings) -> list[str]:
    """The names an audit may target: the operator's list, else every proxied Open Inference Protocol upstream."""
    if s.audit.targets is not None:
        return list(s.audit.targets)
    return [n for n, u in s.proxy.upstreams.items() if u.protocol == "v2"]


def _model(name: str, host: Host) -> OwnModel | ProxiedModel:
    """The allow-listed model `name` (AuditError 404 off the list, or not an Open Inference Protocol model)."""
    allowed = allowed_targets(host.settings)
    if name not in allowed:
        raise AuditError(f"unknown target {name!r}; this server audits {allowed} (MG_AUDIT__TARGETS)", 404)
    model = host.models.get(name)
    if not isinstance(model, OwnModel | ProxiedModel):
        raise AuditError(f"target {name!r} is not served here as an Open Inference Protocol model", 404)
    return model


def _spec(model: OwnModel | ProxiedModel) -> DatasetSpec:
    """The model's dataset spec: our model's dataset, or the one its upstream's allow-list entry names."""
    dataset = model.dataset if isinstance(model, OwnModel) else model.upstream.dataset
    return model.batcher.engine.registry.spec(dataset)


def target_spec(name: str, host: Host) -> DatasetSpec:
    """The allow-listed target's dataset spec, read without a request (AuditError 404 as `resolve_target`)."""
    return _spec(_model(name, host))


def resolve_target(name: str, host: Host, stated: Contract | None) -> TargetInfo:
    """The allow-listed target `name`, its metadata read and checked against its contract and what the caller
    states (AuditError 404 unknown, 422 mismatched, 502 unreadable)."""
    model = _model(name, host)
    try:
        meta = host.call(model.metadata(), 30.0)
    except ServiceError as exc:
        raise AuditError(f"could not read the metadata of {name!r}: {exc}", 502) from None
    spec = _spec(model)
    if isinstance(model, OwnModel):
        info = TargetInfo(name, "own", None, model.dataset, meta, sorted(host.models.own), [], spec)
    else:
        info = TargetInfo(name, "proxied", model.upstream, model.upstream.dataset, meta, None, [], spec)
        info.repository = _repository(model.upstream, info.notes)
    _check_contract(info, stated)
    return info


def _repository(up: Upstream, notes: list[str]) -> list[str] | None:
    """The upstream server's model names from the repository extension, where it offers it (URL: the allow-list's)."""
    import httpx

    try:
        r = httpx.post(up.url.rstrip("/") + "/v2/repository/index", json={}, timeout=5.0, trust_env=False)
        if r.status_code == 200 and isinstance(r.json(), list):
            return sorted(str(m.get("name")) for m in r.json() if isinstance(m, dict))
        notes.append(f"the server does not offer POST /v2/repository/index (HTTP {r.status_code})")
    except (httpx.HTTPError, ValueError) as exc:
        notes.append(f"the server's model list could not be read ({type(exc).__name__})")
    return None


def _shape_problems(shape: list[int], layout: str, info: TargetInfo) -> list[str]:
    """The metadata's image shape (batch dropped; -1 matches any size) against what the proxy can send an upstream
    of the target's dataset (`service.proxy.image_shapes`): a model of another size or channel count cannot take
    the dataset's images."""
    allowed = image_shapes(info.spec, layout)
    if len(shape) == 3 and any(all(d in (-1, e) for d, e in zip(shape, sh, strict=True)) for sh in allowed):
        return []
    want = " or ".join(str(list(sh)) for sh in allowed)
    return [f"shape: the metadata says {shape} per image, the dataset {info.dataset!r} needs {want} ({layout})"]


def _check_contract(info: TargetInfo, stated: Contract | None) -> None:
    """The input named in the model's metadata against the configured contract and the caller's statement."""
    up = info.upstream
    want = {"name": up.input_name if up else "input", "datatype": up.datatype if up else "FP32",
            "layout": up.layout if up else "NCHW"}  # fmt: skip
    inputs = info.metadata.get("inputs") or []
    found = next((i for i in inputs if isinstance(i, dict) and i.get("name") == want["name"]), None)
    problems = []
    if inputs and found is None:
        problems.append(f"the metadata names inputs {[i.get('name') for i in inputs]}, not {want['name']!r}")
    if found is not None:
        shape = [int(d) for d in found.get("shape", [])][1:]
        layout = "NHWC" if len(shape) == 3 and shape[-1] in (1, 3) and shape[0] != 1 else "NCHW"
        learned = {"name": found["name"], "datatype": found.get("datatype"), "layout": layout, "shape": shape}
        problems += [f"{k}: the metadata says {learned[k]}, the allow-list {want[k]}" for k in ("datatype", "layout")
                     if learned[k] != want[k]]  # fmt: skip
        problems += _shape_problems(shape, want["layout"], info)
        info.channels = max(shape[0 if want["layout"] == "NCHW" else -1], 0) if len(shape) == 3 else 0
        want = learned
    else:
        info.notes.append("the metadata lists no inputs: the allow-list's contract is used "
                          f"({want['name']}, {want['datatype']}, {want['layout']})")  # fmt: skip
    for k, v in (stated.model_dump(exclude_none=True) if stated else {}).items():
        have = want.get(k)
        if k == "shape" and have is not None:
            ok = len(have) == len(v) and all(h in (-1, d) for h, d in zip(have, v, strict=True))
        else:
            ok = have is None or have == v
        if not ok:
            problems.append(f"{k}: you stated {v}, the target has {have}")
    if problems:
        raise AuditError(f"target {info.name!r}: its input does not match: " + "; ".join(problems))


class TargetClient:
    """`service.attacks.query.Client`'s interface over the in-process target: rows in (N×C×H×W of the target's
    dataset), an `Answer` out, every row metered (phase, seconds, budget) and the cancel flag checked before each
    request. Requests hold at most `max_rows` images: the service's images-per-request cap for the dataset
    (`image_cap`) and, through a pipeline, its cost cap (generator passes, × `DatasetSpec.cost` per image)."""

    def __init__(self, host: Host, info: TargetInfo, variant: Variant, meter: Meter) -> None:
        self.host, self.info, self.variant, self.meter = host, info, variant, meter
        s = host.settings
        p = variant.pipeline
        warm = p is not None and p.defense in WARM_STARTS  # the encoder's start: its own default L and R
        steps = None if p is None else p.steps or (s.encoder_steps if warm else s.default_steps)
        cost = 1 if p is None else steps * (p.restarts or (s.encoder_restarts if warm else s.default_restarts))
        by_cost = int(s.max_request_cost // (cost * info.spec.cost))  # as the batcher costs a request
        self.max_rows = max(1, min(MAX_ROWS, image_cap(s, info.spec), by_cost))
        up = info.upstream
        self.timeout_s = s.request_timeout_s + (up.timeout_s or s.proxy.timeout_s if up else 0) + 30
        self.scores: bool | None = None  # whether the target returns scores (learned from its first answer)

    def infer(self, x: np.ndarray, address: str | None = None) -> Answer:
        """Answers to N rows (split to fit the server's per-request caps)."""
        parts = [self._one(x[i : i + self.max_rows]) for i in range(0, len(x), self.max_rows)]
        probs = [p.probabilities for p in parts]
        return Answer(np.concatenate([p.labels for p in parts]),
                      np.concatenate(probs) if all(q is not None for q in probs) else None)  # fmt: skip

    def _one(self, x: np.ndarray) -> Answer:
        self.meter.check(self.variant.key, len(x))
        t0 = time.perf_counter()
        for attempt in range(RETRIES + 1):
            try:
                resp = self.host.call(self._request(x), self.timeout_s)
                break
            except NotRunning:  # the service is shutting down: the audit stops and keeps what it measured
                self.meter.reason = "the server shut down"
                raise Cancelled from None
            except ServiceError as exc:
                if exc.status != 503 or attempt == RETRIES or self.meter.cancel.is_set():
                    what = f"{self.info.name} ({self.variant.key})"
                    raise AuditError(f"{what} answered {exc.status}: {exc}", 502) from None
                time.sleep(0.2 * 2**attempt)
        self.meter.add(self.variant.key, len(x), time.perf_counter() - t0)
        a = answer_of(resp, self.info.upstream)
        self.scores = a.probabilities is not None if self.scores is None else self.scores
        return a

    def _request(self, x: np.ndarray) -> Coroutine[Any, Any, oip.InferResponse]:
        model = self.host.models.get(self.info.name)
        assert model is not None
        up = self.info.upstream
        if up is None:  # our own model: FP32 N×C×H×W, the variant's defense
            req = oip.InferRequest([oip.Tensor.from_numpy("input", np.ascontiguousarray(x, np.float32))],
                                   parameters=dict(self.variant.params))  # fmt: skip
            return model.infer(req, {})
        channels = self.info.channels or self.info.spec.channels
        x_up = from_unit(torch.from_numpy(x), up, channels)  # the upstream's layout, channels, type and range
        req = oip.InferRequest([oip.Tensor.from_numpy(up.input_name, x_up)])
        if self.variant.pipeline is None:  # bare: straight to the upstream
            return self.host.proxy.infer(self.info.name, req, None, up)
        req.parameters = dict(self.variant.params)
        return model.infer(req, {})

    def close(self) -> None:
        """Nothing to close (the app owns the connections); `query.Client`'s interface."""


def answer_of(resp: oip.InferResponse, up: Upstream | None) -> Answer:
    """Labels (an integer N output, else the scores' argmax) and probabilities (None for a labels-only answer)."""
    probs = None
    if up is None:
        probs = next((t.data.astype(np.float32) for t in resp.outputs if t.name == "probabilities"), None)
    elif any(t.datatype in ("FP16", "FP32", "FP64") and t.data.ndim == 2 for t in resp.outputs):
        probs = upstream_probabilities(resp, up)
    ints = [t.data for t in resp.outputs if t.datatype.startswith(("INT", "UINT")) and t.data.ndim == 1]
    named = [t.data for t in resp.outputs if t.name in ("labels", "label") and t.data.ndim == 1]
    labels = (named or ints or [None])[0]
    if labels is None:
        if probs is None:
            names = [t.name for t in resp.outputs]
            raise AuditError(f"the target answered neither labels nor scores (outputs {names})", 502)
        labels = probs.argmax(1)
    return Answer(np.asarray(labels).astype(np.int64).reshape(-1), probs)
