"""Run one named attack for the service: check the caller's parameters against the caps, estimate the cost, build
the model the attack needs (the bare classifier, the defended pipeline, an AdvGAN generator, a trained
substitute) and call it. No HTTP here.

    p = plan(method, params, target, targeted, cfg, caps, images)      # AttackRequestError (422) past a cap
    await batcher.submit(AttackJob(p, labels, dataset, classifier, cfg, seed, substitutes), x, timeout)

Cost is counted in generator evaluations per request — one projection of N images is N·L·R of them — so every
attack that runs through the defense is capped by one number (`AttackSettings.max_generator_evals`, checked by
`plan`). The attack is engine work like any other: `AttackJob` goes through the batcher's admission (queue,
estimated wait against its timeout) on the slow lane's worker, one at a time and never merged, and a caller that
times out or goes stops it at the model's next forward pass (`service.purify.Cancelled`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from service.attacks import ATTACKS, AttackSpec
from service.attacks.adaptive import Defended
from service.attacks.advgan import generator_key
from service.attacks.substitute import as_oracle, train_substitute
from service.config import AttackSettings
from service.engine import Engine, Stop
from service.errors import ServiceError
from service.purify import Cancelled, ProjectionConfig
from service.registry import DEFAULT_ROOT, Registry

SUBSTITUTE_SEED_IMAGES = 150  # the first 150 images of models/<ds>/test_slice.npz (cleverhans' holdout)

PARAM_TYPES: dict[str, type] = {
    "eps": float, "alpha": float, "steps": int, "random_start": bool, "c": float, "kappa": float,
    "search_steps": int, "lr": float, "abort_early": bool, "arch": str, "samples": int, "norm": str, "seed": int,
    "lr_z": float, "lr_delta": float, "check_every": int,
}  # fmt: skip


class AttackRequestError(ServiceError, ValueError):
    """The request names an unknown attack, a bad parameter, or exceeds a cap (422)."""

    status = 422


@dataclass
class AttackPlan:
    method: str
    spec: AttackSpec
    params: dict[str, Any]  # effective keyword arguments (defaults filled in)
    target: str  # "classifier" or "defended"
    targeted: bool
    generator_evals: int  # estimated cost of the whole request
    notes: list[str] = field(default_factory=list)


def _coerce(name: str, value: Any) -> Any:
    kind = PARAM_TYPES[name]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif kind is float:
        try:
            v = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            v = None
        if v is not None and math.isfinite(v):
            return v
    elif isinstance(value, str):
        return value
    raise AttackRequestError(f"parameter {name}={value!r} must be a {kind.__name__}")


def defaults(spec: AttackSpec) -> dict[str, Any]:
    sig = inspect.signature(spec.fn)
    return {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def catalog(caps: AttackSettings) -> dict[str, Any]:
    """What GET /v1/models says of POST /v1/attack: off → only `enabled`; on → every method's threat model, its
    caller-settable parameters with their defaults, whether it needs target=defended, and the caps."""
    if not caps.enabled:
        return {"enabled": False}
    methods = {
        name: {
            "norm": spec.norm,
            "params": list(spec.params),
            "defaults": {k: v for k, v in defaults(spec).items() if k in spec.params},
            "target": "defended" if spec.adaptive else "any",
        }
        for name, spec in ATTACKS.items()
    }
    keep = ("max_iterations", "max_restarts", "max_eot_samples", "max_search_steps", "max_projection_steps",
            "max_generator_evals", "timeout_s")  # fmt: skip
    return {"enabled": True, "methods": methods, "caps": {k: getattr(caps, k) for k in keep}}


def plan(
    method: str,
    raw: dict[str, Any],
    target: str,
    targeted: bool,
    cfg: ProjectionConfig | None,
    caps: AttackSettings,
    images: int,
    image_values: int = 784,
) -> AttackPlan:
    """Validate `raw` parameters of `method` for `images` images of `image_values` values each (C·H·W: the L2 ε is at
    most its square root, the distance from black to white), fill defaults, apply every cap."""
    if method not in ATTACKS:
        raise AttackRequestError(f"unknown method {method!r}; available: {', '.join(ATTACKS)}")
    spec = ATTACKS[method]
    if target not in ("classifier", "defended"):
        raise AttackRequestError("target must be 'classifier' or 'defended'")
    if spec.adaptive and target != "defended":
        raise AttackRequestError(f"{method} attacks the defended pipeline: use target=defended")
    if "targeted" in raw:
        raise AttackRequestError("set target_label for a targeted attack (params.targeted is not taken)")
    unknown = sorted(set(raw) - set(spec.params))
    if unknown:
        allowed = ", ".join(spec.params) or "none"
        raise AttackRequestError(f"unknown parameter(s) for {method}: {', '.join(unknown)}; allowed: {allowed}")
    if targeted and "targeted" not in defaults(spec):
        raise AttackRequestError(f"{method} cannot be targeted")
    p = {**{k: v for k, v in defaults(spec).items() if k in spec.params}, **{k: _coerce(k, v) for k, v in raw.items()}}
    notes: list[str] = []
    if spec.adaptive and "steps" in spec.params and "steps" not in raw and method != "latent":
        p["steps"] = max(1, caps.adaptive_steps // (2 if method == "eot" else 1))
        notes.append(f"steps defaults to {p['steps']} through the service (the server's adaptive_steps)")
        if "alpha" not in raw:
            p["alpha"] = round(2.5 * p["eps"] / p["steps"], 6)
            notes.append("alpha defaults to 2.5·eps/steps")
    if "targeted" in defaults(spec):
        p["targeted"] = targeted
    if method == "substitute":
        p["rounds"] = caps.substitute_rounds
    if "arch" in spec.params:
        p["arch"] = str(raw.get("arch", caps.substitute_arch)).upper()
        if p["arch"] not in ("E", "B"):
            raise AttackRequestError("arch must be E or B (the substitute architectures of the paper)")
    _check_ranges(method, spec, p, caps, math.sqrt(image_values))
    cost = _defended_cost(method, p, cfg, caps, images) if target == "defended" else 0
    return AttackPlan(method, spec, p, target, targeted, cost, notes)


def _defended_cost(method: str, p: dict[str, Any], cfg: ProjectionConfig | None, caps: AttackSettings,
                   images: int) -> int:  # fmt: skip
    """The generator evaluations of an attack through the defense, or AttackRequestError past a cap."""
    if cfg is None:
        raise AttackRequestError("target=defended needs a generator for this dataset")
    if cfg.steps > caps.max_projection_steps:
        raise AttackRequestError(f"steps={cfg.steps} exceeds the attack cap max_projection_steps="
                                 f"{caps.max_projection_steps}")  # fmt: skip
    if cfg.restarts > caps.max_restarts:
        raise AttackRequestError(f"restarts={cfg.restarts} exceeds the attack cap max_restarts={caps.max_restarts}")
    passes = _passes(method, p)  # forward passes through the attacked model per image
    cost = images * passes * cfg.steps * cfg.restarts + (images * p["steps"] if method == "latent" else 0)
    if cost > caps.max_generator_evals:
        raise AttackRequestError(
            f"{method} on target=defended costs about {cost:,} generator evaluations ({passes} projections of "
            f"{images} image(s) at L={cfg.steps}, R={cfg.restarts}); the cap is {caps.max_generator_evals:,}. "
            "Lower the attack's steps/samples or the projection's steps/restarts."
        )
    return cost


def _passes(method: str, p: dict[str, Any]) -> int:
    if method in ("fgsm", "rand-fgsm"):
        return 1
    if method in ("pgd", "pgd-l2"):
        return p["steps"]
    if method in ("cw", "cw-defensegan"):
        return p["steps"] * p["search_steps"]
    if method == "bpda":
        return p["steps"] + 1
    if method == "eot":
        return p["steps"] * p["samples"] + 1
    if method == "latent":
        return 1 + math.ceil(p["steps"] / p["check_every"])
    if method == "substitute":
        return SUBSTITUTE_SEED_IMAGES * 2 ** (p["rounds"] - 1)
    return 0  # advgan: one pass of its own generator, never through the defense


def _check_ranges(method: str, spec: AttackSpec, p: dict[str, Any], caps: AttackSettings, l2_max: float) -> None:
    norm = p.get("norm", spec.norm)
    if norm not in ("linf", "l2"):
        raise AttackRequestError("norm must be linf or l2")
    top = 1.0 if norm == "linf" else l2_max
    if "eps" in p and not 0 <= p["eps"] <= top:
        raise AttackRequestError(f"eps must lie in [0, {top:g}] for the {norm} threat model")
    if "alpha" in p and p["alpha"] < 0:
        raise AttackRequestError("alpha must be >= 0")
    if method == "rand-fgsm" and not 0 <= p["alpha"] <= p["eps"]:
        raise AttackRequestError("rand-fgsm needs 0 <= alpha <= eps")
    if "steps" in p and not 1 <= p["steps"] <= caps.max_iterations:
        raise AttackRequestError(f"steps must lie in [1, {caps.max_iterations}] (the server cap max_iterations)")
    if "search_steps" in p and not 1 <= p["search_steps"] <= caps.max_search_steps:
        raise AttackRequestError(f"search_steps must lie in [1, {caps.max_search_steps}] (max_search_steps)")
    if "samples" in p and not 1 <= p["samples"] <= caps.max_eot_samples:
        raise AttackRequestError(f"samples must lie in [1, {caps.max_eot_samples}] (max_eot_samples)")
    for name in ("c", "lr", "lr_z", "lr_delta"):
        if name in p and not p[name] > 0:
            raise AttackRequestError(f"{name} must be > 0")
    if "kappa" in p and p["kappa"] < 0:
        raise AttackRequestError("kappa must be >= 0")
    if "check_every" in p and p["check_every"] < 1:
        raise AttackRequestError("check_every must be >= 1")
    if "seed" in p and not 0 <= p["seed"] < 2**31:
        raise AttackRequestError("seed must lie in [0, 2^31)")


class SubstituteCache:
    """One trained substitute per (dataset, classifier, arch), trained on first use (thread-safe)."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str, str, int], nn.Module] = {}
        self._lock = threading.Lock()

    def get(self, registry: Registry, dataset: str, classifier: str, arch: str, device: torch.device,
            rounds: int = 6) -> nn.Module:  # fmt: skip
        key = (dataset, classifier, arch, rounds)
        with self._lock:
            if key not in self._models:
                seeds = seed_images(registry, dataset)[:SUBSTITUTE_SEED_IMAGES].to(device)
                oracle = as_oracle(registry.classifier(dataset, classifier, device))  # labels only
                classes = registry.spec(dataset).num_classes
                self._models[key] = train_substitute(oracle, seeds, arch=arch, rounds=rounds, classes=classes).model
            return self._models[key]


def seed_images(registry: Registry, dataset: str) -> torch.Tensor:
    """The evaluation slice of `dataset` (models/<ds>/test_slice.npz: the registry's, else the repository's) as
    float N×C×H×W — the first 150 are the substitute's held-out seed set."""
    for root in (registry.root, DEFAULT_ROOT):
        path = root / dataset / "test_slice.npz"
        if path.exists():
            with np.load(path, allow_pickle=False) as f:
                x = f["x"].astype(np.float32) / 255.0
            return torch.from_numpy(np.ascontiguousarray(x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)))
    raise AttackRequestError(f"the substitute attack needs {dataset}/test_slice.npz (its held-out seed images)")


@contextlib.contextmanager
def stoppable(modules: list[nn.Module], stop: Stop) -> Iterator[None]:
    """While inside, every forward pass of `modules` first asks `stop`: True raises Cancelled (the caller has gone).
    Hooks, not a wrapper: the adaptive attacks need the `Defended` pipeline itself."""

    def check(*_: Any) -> None:
        if stop():
            raise Cancelled("the attack's caller has gone")

    handles = [m.register_forward_pre_hook(check) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True, eq=False)
class AttackJob:
    """One planned attack as the batcher's job: run alone (every instance its own key) on the slow lane, its cost
    the plan's generator evaluations (admission estimates its wait from them), stopped between two passes of the
    attacked model when its caller has gone."""

    plan: AttackPlan
    labels: torch.Tensor  # true labels, or the target labels of a targeted attack
    dataset: str
    classifier: str
    cfg: ProjectionConfig | None
    seed: int | None
    substitutes: SubstituteCache

    op = "attack"
    alone = True

    @property
    def model(self) -> str:
        """The metrics' model label."""
        return f"{self.dataset}/{self.classifier}"

    def cost(self, n: int) -> tuple[int, str]:
        return self.plan.generator_evals, f"{self.plan.method} on {n} image(s)"

    def run(self, engine: Engine, x: torch.Tensor, stop: Stop) -> torch.Tensor:
        return execute(self.plan, x, self.labels, engine.registry, self.dataset, self.classifier, self.cfg, self.seed,
                       engine.device, self.substitutes, stop)  # fmt: skip

    def split(self, out: torch.Tensor, bounds: list[tuple[int, int]]) -> list[torch.Tensor]:
        return [out]


def _never() -> bool:
    return False


def execute(
    p: AttackPlan,
    x: torch.Tensor,
    labels: torch.Tensor,
    registry: Registry,
    dataset: str,
    classifier: str,
    cfg: ProjectionConfig | None,
    seed: int | None,
    device: torch.device,
    substitutes: SubstituteCache,
    stop: Stop = _never,
) -> torch.Tensor:
    """Run the planned attack on x (N×1×28×28 in [0, 1]) with `labels` (true, or target when targeted); `stop` is
    asked before every pass of the attacked model (True: Cancelled)."""
    x, labels = x.to(device), labels.to(device)
    clf = registry.classifier(dataset, classifier, device)
    model: nn.Module = clf
    watched = [clf]
    if p.target == "defended":
        assert cfg is not None
        enc = registry.encoder(dataset, device) if cfg.init == "encoder" else None
        model = Defended(clf, registry.generator(dataset, device), cfg, encoder=enc, seed=seed)
        watched.append(model.generator)  # every projection step
    with stoppable(watched, stop):  # a substitute's training queries the classifier too
        kwargs = _inputs(p, model, registry, dataset, classifier, device, substitutes)
        adv = p.spec.fn(model, x, labels, **kwargs)
    return adv.detach().cpu()


def _inputs(p: AttackPlan, model: nn.Module, registry: Registry, dataset: str, classifier: str,
            device: torch.device, substitutes: SubstituteCache) -> dict[str, Any]:  # fmt: skip
    """The attack's keyword arguments: the plan's parameters, and the AdvGAN generator or the trained substitute
    it needs."""
    kwargs = dict(p.params)
    if p.method == "advgan":
        key = generator_key(dataset, classifier)
        if not registry.has(key):
            raise AttackRequestError(f"no AdvGAN generator trained against {dataset}/{classifier} is shipped ({key})")
        kwargs["generator"] = registry.module(key, device)
    if p.method == "substitute":
        arch, rounds = kwargs.pop("arch"), kwargs["rounds"]
        if p.target == "defended":
            oracle = as_oracle(model)
            seeds = seed_images(registry, dataset)[:SUBSTITUTE_SEED_IMAGES].to(device)
            classes = registry.spec(dataset).num_classes
            kwargs["substitute_model"] = train_substitute(oracle, seeds, arch=arch, rounds=rounds,
                                                          classes=classes).model  # fmt: skip
        else:
            kwargs["substitute_model"] = substitutes.get(registry, dataset, classifier, arch, device, rounds)
    return kwargs
