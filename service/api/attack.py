"""POST /v1/attack: attack an image — against the bare classifier or the defended pipeline — and show what the
defense makes of it. Dual-use, so off by default (docs/attacks.md):

- `settings.attack.enabled` false → 404 (the route answers as if it did not exist);
- enabled, no `X-API-Key` header → 401 (with `WWW-Authenticate: ApiKey`);
- enabled, a key not in `settings.attack.api_keys` → 403 (keys compared in constant time; an empty list refuses all).

The image comes as for /v1/classify (multipart file, raw image body, or JSON `image`/`array`); the fields are
`method`, `params` (the attack's own, a JSON object; a JSON string in multipart or the query), `label` (default:
the classifier's prediction), `target_label` (makes the attack targeted), `target` (classifier | defended),
`model`, `defense`, and the defense's projection `steps`, `restarts`, `seed`. Parameters past a server cap are
refused with 422, never trimmed. The attack is engine work (`runner.AttackJob`): admitted by the batcher like a
projection (503 with Retry-After when it cannot finish within `attack.timeout_s`), run on the slow lane's worker in
turn with the projections, and stopped when it runs past its timeout (504).
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any, Literal

import torch
from fastapi import APIRouter, Depends, Request
from pydantic import Field, field_validator
from starlette.concurrency import run_in_threadpool

from service import imaging
from service.api.deps import get_batcher, get_registry, get_settings, get_substitutes
from service.api.v1 import model_input, read_input
from service.attacks import runner
from service.batcher import Batcher
from service.config import Settings
from service.engine import DefendResult
from service.errors import ServiceError
from service.registry import Registry
from service.request import ClassifierFields, RequestError, Start, resolve

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
        raise ServiceError("Not Found", 404)
    key = request.headers.get("x-api-key")
    if not key:
        raise ServiceError("the attack endpoint needs an X-API-Key header", 401, {"WWW-Authenticate": "ApiKey"})
    if not any(hmac.compare_digest(key.encode(), k.encode()) for k in settings.attack.api_keys):
        raise ServiceError("this API key may not use the attack endpoint", 403)


def _prediction(r: DefendResult | None, i: int) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "label": int(r.labels[i]),
        "probabilities": [round(float(v), 6) for v in r.probs[i]],
        "mse": None if r.mse is None else float(r.mse[i]),
        "flagged": None if r.flagged is None else bool(r.flagged[i]),
    }


def _rounded(a: torch.Tensor) -> list:
    """Nested lists of the values, each rounded to 6 decimals."""
    return [_rounded(r) for r in a] if a.dim() > 1 else [round(float(v), 6) for v in a]


def _adversarial(x: torch.Tensor, adv: torch.Tensor, png: str) -> dict[str, Any]:
    """The adversarial image: as PNG, as the exact float array (H×W for a gray dataset, C×H×W for a colour one), and
    its L∞ and L2 distance to the input."""
    delta = (adv - x).flatten()
    image = adv[0, 0] if adv.shape[1] == 1 else adv[0]
    return {
        "png_base64": png,
        "array": _rounded(image),
        "linf": float(delta.abs().max()),
        "l2": float(delta.norm()),
    }


def _fooled(label: int, target_label: int | None, r: DefendResult | None, i: int) -> bool | None:
    if r is None:
        return None
    got = int(r.labels[i])
    return got == target_label if target_label is not None else got != label


@router.post("/attack", summary="Attack an image (dual-use: disabled unless enabled, then API key)",
             dependencies=[Depends(require_attack_key)])  # fmt: skip
async def attack(
    request: Request,
    settings: Settings = Depends(get_settings),
    registry: Registry = Depends(get_registry),
    batcher: Batcher = Depends(get_batcher),
    substitutes: runner.SubstituteCache = Depends(get_substitutes),
) -> Any:
    """The adversarial image (PNG base64 and the exact float array), its L∞ and L2 distance to the input, and the
    predictions before and after the attack, with and without the defense."""
    t0 = time.perf_counter()
    images, raw, _ = await read_input(request, settings)
    p = AttackFields.parse(raw)
    if len(images) != 1:
        raise RequestError(f"the attack endpoint takes one image, got {len(images)}")
    # the defense is projected where a generator is shipped (target=defended needs one: 404 without)
    req = resolve(p, settings, registry, project=True if p.target == "defended" else None)
    x, _ = await model_input(images, req.dataset, registry, settings)
    ds, clf, cfg = req.dataset, req.classifier, req.cfg
    assert clf is not None
    plan = runner.plan(p.method, p.params, p.target, p.target_label is not None, cfg, settings.attack, len(x),
                       x[0].numel())  # fmt: skip

    before = await batcher.defend(x, ds, clf, "none")
    label = p.label if p.label is not None else int(before.labels[0])
    labels = torch.tensor([p.target_label if p.target_label is not None else label])

    t_attack = time.perf_counter()
    job = runner.AttackJob(plan, labels, ds, clf, cfg, p.seed, substitutes)
    # the plan capped its cost by the attack's own budget (attack.max_generator_evals), not MG_MAX_REQUEST_COST
    adv = (await batcher.submit(job, x, timeout=settings.attack.timeout_s, budget=False)).value
    attack_ms = (time.perf_counter() - t_attack) * 1e3

    after = await batcher.defend(adv, ds, clf, "none")
    defended = await batcher.defend(torch.cat([x, adv]), ds, clf, p.defense, cfg, p.seed) if cfg else None
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
        "adversarial": _adversarial(x, adv, png),
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
