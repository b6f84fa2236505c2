"""POST /v1/attack: attack an image — against the bare classifier or the defended pipeline — and show what the
defense makes of it. Dual-use, so off by default (docs/attacks.md):

- `settings.attack.enabled` false → 404 (the route answers as if it did not exist);
- enabled, no `X-API-Key` header → 401 (with `WWW-Authenticate: ApiKey`);
- enabled, a key not in `settings.attack.api_keys` → 403 (keys compared in constant time; an empty list refuses all).

The image comes as for /v1/classify (multipart file, raw image body, or JSON `image`/`array`); the fields are
`method`, `params` (the attack's own, a JSON object; a JSON string in multipart or the query), `label` (default:
the classifier's prediction), `target_label` (makes the attack targeted), `target` (classifier | defended),
`model`, `defense`, and the defense's projection `steps`, `restarts`, `seed`. Parameters past a server cap are
refused with 422, never trimmed. The attack runs in a worker thread, at most `max_concurrent` at a time.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any, Literal

import torch
from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import Field, field_validator
from starlette.concurrency import run_in_threadpool

from service import imaging
from service.api.deps import get_batcher, get_engine, get_registry, get_settings
from service.api.v1 import read_input
from service.attacks import runner
from service.batcher import Batcher
from service.config import Settings
from service.engine import DefendResult, Engine
from service.registry import Registry
from service.request import ClassifierFields, RequestError, Start, classifier, resolve

router = APIRouter(prefix="/v1", tags=["attack"])


class AttackFields(ClassifierFields):
    method: str = Field(description="fgsm | rand-fgsm | pgd | pgd-l2 | cw | cw-defensegan | advgan | substitute | "
                        "bpda | eot | latent")  # fmt: skip
    params: dict[str, Any] = Field(default_factory=dict, description="the attack's own parameters (capped)")
    label: int | None = Field(None, ge=0, le=9, description="true label (default: the classifier's prediction)")
    target_label: int | None = Field(None, ge=0, le=9, description="attack towards this label (targeted)")
    target: Literal["classifier", "defended"] = Field("classifier", description="what the attack sees")
    defense: Start = Field("defense-gan", description="the defense shown/attacked")

    @field_validator("params", mode="before")
    @classmethod
    def _json_params(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                v = json.loads(v) if v.strip() else {}
            except ValueError as exc:
                raise ValueError(f"params must be a JSON object: {exc}") from exc
        return v


def require_attack_key(request: Request, settings: Settings = Depends(get_settings)) -> None:
    """404 while disabled, 401 without an X-API-Key header, 403 for a key not on the list."""
    if not settings.attack.enabled:
        raise HTTPException(404, "Not Found")
    key = request.headers.get("x-api-key")
    if not key:
        raise HTTPException(401, "the attack endpoint needs an X-API-Key header", {"WWW-Authenticate": "ApiKey"})
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in settings.attack.api_keys):
        raise HTTPException(403, "this API key may not use the attack endpoint")


def _slots(request: Request, settings: Settings) -> asyncio.Semaphore:
    state = request.app.state
    if getattr(state, "attack_slots", None) is None:
        state.attack_slots = asyncio.Semaphore(max(1, settings.attack.max_concurrent))
        state.attack_substitutes = runner.SubstituteCache()
    return state.attack_slots  # type: ignore[no-any-return]


def _prediction(r: DefendResult | None, i: int) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "label": int(r.labels[i]),
        "probabilities": [round(float(v), 6) for v in r.probs[i]],
        "mse": None if r.mse is None else float(r.mse[i]),
        "flagged": None if r.flagged is None else bool(r.flagged[i]),
    }


def _fooled(label: int, target_label: int | None, r: DefendResult | None, i: int) -> bool | None:
    if r is None:
        return None
    got = int(r.labels[i])
    return got == target_label if target_label is not None else got != label


async def _execute(request: Request, settings: Settings, plan: runner.AttackPlan, *args: Any) -> torch.Tensor:
    """`runner.execute(plan, *args, substitutes)` in a worker thread, once one of the `max_concurrent` attack slots
    is free (503 after `timeout_s`); 504 when it runs past `timeout_s` (it finishes in the background, then frees its
    slot)."""
    slots = _slots(request, settings)
    timeout = settings.attack.timeout_s
    try:
        await asyncio.wait_for(slots.acquire(), timeout)
    except TimeoutError as exc:
        raise HTTPException(503, "the attack workers are busy; retry later", {"Retry-After": "30"}) from exc
    substitutes = request.app.state.attack_substitutes
    fut = asyncio.get_running_loop().run_in_executor(None, runner.execute, plan, *args, substitutes)
    fut.add_done_callback(lambda _: slots.release())
    try:
        return await asyncio.wait_for(asyncio.shield(fut), timeout)
    except TimeoutError as exc:
        raise HTTPException(504, f"the attack took longer than {timeout:g} s (it finishes in the background)") from exc


@router.post("/attack", summary="Attack an image (dual-use: disabled unless enabled, then API key)",
             dependencies=[Depends(require_attack_key)])  # fmt: skip
async def attack(
    request: Request,
    settings: Settings = Depends(get_settings),
    registry: Registry = Depends(get_registry),
    engine: Engine = Depends(get_engine),
    batcher: Batcher = Depends(get_batcher),
) -> Any:
    """The adversarial image (PNG base64 and the exact float array), its L∞ and L2 distance to the input, and the
    predictions before and after the attack, with and without the defense."""
    t0 = time.perf_counter()
    x, raw, _ = await read_input(request, settings)
    p = AttackFields.parse(raw)
    if len(x) != 1:
        raise RequestError(f"the attack endpoint takes one image, got {len(x)}")
    ds, _ = classifier(p.model, registry, settings)
    project = registry.has(f"{ds}/generator") or p.target == "defended"  # else the bare classifier only
    req = resolve(p, settings, registry, project=project)
    ds, clf, cfg = req.dataset, req.classifier, req.cfg
    assert clf is not None
    plan = runner.plan(p.method, p.params, p.target, p.target_label is not None, cfg, settings.attack, len(x))

    before = await batcher.defend(x, ds, clf, "none")
    label = p.label if p.label is not None else int(before.labels[0])
    labels = torch.tensor([p.target_label if p.target_label is not None else label])

    t_attack = time.perf_counter()
    adv = await _execute(request, settings, plan, x, labels, registry, ds, clf, cfg, p.seed, engine.device)
    attack_ms = (time.perf_counter() - t_attack) * 1e3

    after = await batcher.defend(adv, ds, clf, "none")
    defended = await batcher.defend(torch.cat([x, adv]), ds, clf, p.defense, cfg, p.seed) if cfg else None
    delta = (adv - x).flatten()
    png = await run_in_threadpool(imaging.png_base64, adv[0])
    return {
        "method": p.method,
        "target": p.target,
        "model": f"{ds}/{clf}",
        "defense": p.defense if cfg else None,
        "steps": cfg.steps if cfg else None,
        "restarts": cfg.restarts if cfg else None,
        "seed": p.seed,
        "params": {k: v for k, v in plan.params.items() if k in plan.spec.params},
        "threat_model": plan.params.get("norm", plan.spec.norm),
        "label": label,
        "label_source": "given" if p.label is not None else "predicted",
        "target_label": p.target_label,
        "adversarial": {
            "png_base64": png,
            "array": [[round(float(v), 6) for v in row] for row in adv[0, 0]],
            "linf": float(delta.abs().max()),
            "l2": float(delta.norm()),
        },
        "before": {"classifier": _prediction(before, 0), "defended": _prediction(defended, 0)},
        "after": {"classifier": _prediction(after, 0), "defended": _prediction(defended, 1)},
        "fooled": {
            "classifier": _fooled(label, p.target_label, after, 0),
            "defended": _fooled(label, p.target_label, defended, 1),
        },
        "notes": plan.notes + ["the PNG is rounded to 8 bits; norms and predictions are of the exact float image"],
        "cost": {"generator_evals": plan.generator_evals, "cap": settings.attack.max_generator_evals},
        "timings_ms": {"attack_ms": attack_ms, "total_ms": (time.perf_counter() - t0) * 1e3},
    }
