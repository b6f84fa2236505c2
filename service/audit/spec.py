"""What an audit runs: the request (`AuditSpec`, the body of POST /v1/audits and the CLI's flags) and its caps.

    spec = AuditSpec.model_validate(body)      # pydantic: types and ranges
    check_caps(spec, settings)                 # the operator's caps (AuditError 422 past one, never trimmed)
    check_threats(spec, dataset_spec)          # every ε within √(C·H·W) of the target's images
    variants(spec)                             # [bare, each guarded pipeline]

The defaults are `training.blackbox`'s budgets for a fast pipeline (its reference evaluation of the same suite).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.config import Defense, Settings
from service.datasets import SIDES, DatasetSpec
from service.errors import ServiceError

Norm = Literal["linf", "l2"]
AttackName = Literal["square", "hsj", "transfer"]
RANDOMIZED = ("defense-gan", "magnet")  # random restarts: the judge resubmits `repeats` times
SHIPPED = ("mnist", "fmnist", "shapes")  # the shipped test slices a sample may name (models/<name>/test_slice.npz)


def eps_cap(shape: tuple[int, ...]) -> float:
    """The largest ε an audit takes for images of `shape` (C×H×W): √(C·H·W), the L2 diameter of [0, 1]^(C·H·W)
    (28 for 1×28×28)."""
    return math.sqrt(math.prod(shape))


EPS_MAX = eps_cap((3, max(SIDES), max(SIDES)))  # the largest images served; the target's own cap: `check_threats`


class AuditError(ServiceError):
    """A refused audit request (422 unless said otherwise)."""

    status = 422


class Threat(BaseModel):
    """One threat model and the budgets ε it is measured at (each its own points on the plot)."""

    model_config = ConfigDict(extra="forbid")
    norm: Norm
    eps: list[float] = Field(min_length=1, max_length=8)

    @field_validator("eps")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(not 0 < e <= EPS_MAX for e in v):
            raise ValueError(f"each ε must lie in (0, √(C·H·W)] of the target's images, at most {EPS_MAX:.4g}")
        return sorted(set(v))


class PipelineSpec(BaseModel):
    """One guarded pipeline: the guard's defense in front of the target, at these projection settings."""

    model_config = ConfigDict(extra="forbid")
    defense: Defense = "defense-gan"
    steps: int | None = Field(None, ge=1)
    restarts: int | None = Field(None, ge=1)
    # a slow pipeline may be attacked on fewer images and queries than the bare target (None: the audit's own);
    # the guard's gain is then measured on the images both attacked
    n: int | None = Field(None, ge=1, description="images attacked (the first of the audit's n)")
    queries: int | None = Field(None, ge=2, description="Square's queries per image")
    hsj_queries: int | None = Field(None, ge=2, description="HopSkipJump's queries per image")
    rounds: int | None = Field(None, ge=1, le=8, description="substitute rounds")

    @property
    def label(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in (("L", self.steps), ("R", self.restarts)) if v is not None)
        return f"guarded: {self.defense}{extra}"


class Contract(BaseModel):
    """What the caller states about the target's input; checked against the model's metadata."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    datatype: str | None = None
    shape: list[int] | None = None  # without the batch dimension, e.g. [1, 28, 28] or [3, 32, 32]
    layout: Literal["NCHW", "NHWC"] | None = None


def default_threats() -> list[Threat]:
    """L∞ 0.3 and L2 2.0: the budgets `training.blackbox` measures at."""
    return [Threat(norm="linf", eps=[0.3]), Threat(norm="l2", eps=[2.0])]


class AuditSpec(BaseModel):
    """An audit. Budgets are per image and attack (`queries`, `hsj_queries`) and in total (`max_queries`)."""

    model_config = ConfigDict(extra="forbid")
    target: str = Field(description="an allow-listed model name (GET /v1/audits/targets)")
    sample: str = Field(
        "mnist",
        description="mnist | fmnist | shapes (the shipped test slices, of the target's dataset) | upload (sample_file)",
    )
    n: int = Field(100, ge=1, description="images attacked (the first n of the sample)")
    threats: list[Threat] = Field(default_factory=lambda: default_threats(), min_length=1, max_length=2)
    attacks: list[AttackName] | None = Field(None, description="None: Square with scores, HopSkipJump with labels "
                                             "only, and transfer")  # fmt: skip
    queries: int = Field(1000, ge=2, description="Square's queries per image")
    hsj_n: int = Field(10, ge=1, description="images HopSkipJump attacks (the first of the n)")
    hsj_queries: int = Field(1000, ge=2, description="HopSkipJump's queries per image")
    seeds: int = Field(150, ge=0, description="the substitute's seed images (held out of the n); 0: no transfer")
    rounds: int = Field(4, ge=1, le=8, description="substitute rounds: seeds·2^(rounds−1) labels per pipeline")
    pipelines: list[PipelineSpec] = Field(default_factory=lambda: [PipelineSpec(steps=50, restarts=2)],
                                          max_length=8)  # fmt: skip
    repeats: int = Field(3, ge=1, le=10, description="resubmissions of each candidate to a randomized pipeline")
    max_queries: int | None = Field(
        None,
        ge=1,
        description="rows the attacks and substitutes send, in total (None: this server's cap, MG_AUDIT__MAX_QUERIES)",
    )
    timing_images: int = Field(16, ge=1, le=256, description="single-image requests timed per pipeline")
    seed: int = 0
    input: Contract | None = None


@dataclass(frozen=True)
class Variant:
    """The target bare (`pipeline` None) or behind one guarded pipeline."""

    key: str
    pipeline: PipelineSpec | None

    @property
    def randomized(self) -> bool:
        return self.pipeline is not None and self.pipeline.defense in RANDOMIZED

    @property
    def params(self) -> dict:
        """The request parameters that select it (the bare target: none, defense none for our own models)."""
        if self.pipeline is None:
            return {"defense": "none"}
        p = self.pipeline
        return {"defense": p.defense} | {k: v for k, v in (("steps", p.steps), ("restarts", p.restarts)) if v}


def variants(spec: AuditSpec) -> list[Variant]:
    return [Variant("bare", None)] + [Variant(p.label, p) for p in spec.pipelines]


def budget_of(spec: AuditSpec, v: Variant) -> dict[str, int]:
    """A variant's images, queries per image and substitute rounds: its pipeline's own where set, else the audit's."""
    p = v.pipeline
    n = min(p.n or spec.n, spec.n) if p else spec.n
    own = p.model_dump() if p else {}
    return {
        "n": n,
        "square": own.get("queries") or spec.queries,
        "hsj_n": min(spec.hsj_n, n),
        "hsj": own.get("hsj_queries") or spec.hsj_queries,
        "rounds": own.get("rounds") or spec.rounds,
    }


def check_caps(spec: AuditSpec, s: Settings) -> None:
    """Refuse (422) what the operator's caps do not allow, naming the cap and its setting."""
    a = s.audit
    if spec.max_queries is None:
        spec.max_queries = a.max_queries
    spec.hsj_n = min(spec.hsj_n, spec.n)  # HopSkipJump attacks the first of the n images
    over = [(spec.n, a.max_images, "n", "MG_AUDIT__MAX_IMAGES"),
            (spec.n + spec.seeds, a.max_images + 1000, "n + seeds", "MG_AUDIT__MAX_IMAGES (+1000 seeds)"),
            (spec.queries, a.max_queries_per_image, "queries", "MG_AUDIT__MAX_QUERIES_PER_IMAGE"),
            (spec.hsj_queries, a.max_queries_per_image, "hsj_queries", "MG_AUDIT__MAX_QUERIES_PER_IMAGE"),
            (spec.max_queries, a.max_queries, "max_queries", "MG_AUDIT__MAX_QUERIES"),
            (len(spec.pipelines), a.max_pipelines, "pipelines", "MG_AUDIT__MAX_PIPELINES")]  # fmt: skip
    for value, cap, what, setting in over:
        if value > cap:
            raise AuditError(f"{what} = {value} is over this server's cap of {cap} ({setting})")
    for p in spec.pipelines:
        if max(p.queries or 0, p.hsj_queries or 0) > a.max_queries_per_image:
            raise AuditError(f"{p.label}: queries over this server's cap of {a.max_queries_per_image} "
                             "(MG_AUDIT__MAX_QUERIES_PER_IMAGE)")  # fmt: skip
        if p.defense == "none":
            raise AuditError("a guarded pipeline needs a defense other than 'none' (the bare target is always run)")
        if (p.steps or 0) > s.max_steps or (p.restarts or 0) > s.max_restarts:
            raise AuditError(f"{p.label}: steps ≤ {s.max_steps} and restarts ≤ {s.max_restarts} (MG_MAX_STEPS, "
                             "MG_MAX_RESTARTS)")  # fmt: skip


def check_threats(spec: AuditSpec, ds: DatasetSpec) -> None:
    """Refuse (422) an ε over `eps_cap` of the target's images (the validator knows only the largest served)."""
    cap = eps_cap(ds.shape)
    over = [e for t in spec.threats for e in t.eps if e > cap]
    if over:
        c, h, w = ds.shape
        raise AuditError(f"ε = {over[0]:g} is over √(C·H·W) = {cap:.4g} of the target's {c}×{h}×{w} {ds.name} images")
