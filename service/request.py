"""One typed request for every call that purifies or classifies: /v1/classify, /v1/purify, /v1/detect, /v1/attack,
the /v2 own and proxied models and /predictions.

    fields = ClassifyFields.parse(raw)                     # the caller's fields: typed, unknown ones refused
    req = resolve(fields, settings, registry)              # defaults, the manifest's per-dataset defaults, caps
    req.dataset, req.classifier, req.defense, req.cfg, req.seed

The fields come from any body form: v1's query string and JSON or multipart fields (`Fields.parse`), an Open
Inference Protocol request's `parameters` (`oip_fields`: our keys taken out, the rest left to the upstream).
`resolve` applies, once per request: the server's defaults (`Settings`), the manifest's per-dataset defaults
(`engine.default_classifier`, `engine.default_defense`), which models are shipped (404), the classifier a defense
classifies with (`engine.classifier_for`) and the caps of steps and restarts (`engine.projection_config`: they
depend on the defense, which may come from the manifest, and on the operator's pipeline under the public
profile). Types are pydantic's, checked once by `Fields.parse`: an integer field takes an integer or a string of
digits (query and form values are strings), never a boolean or a float. `check_count` is the images-per-request cap.

Every refusal is a `RequestError` (a `service.errors.ServiceError`: 422 a bad or over-cap field, 404 a model not
shipped, 413 too many images); the Open Inference Protocol answers 400 where v1 answers 422.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from service.config import DEFENSES, Defense, Settings
from service.datasets import DatasetSpec
from service.engine import (
    FROM_ENCODER,
    PROJECTING,
    classifier_for,
    default_classifier,
    default_defense,
    projection_config,
)
from service.errors import ServiceError
from service.purify import ProjectionConfig
from service.registry import Registry

# a proxied model classifies upstream: purified by a projection (never MagNet or our enhanced classifiers), or
# forwarded as it came ("none": the guard's per-client defences and output policy alone)
PROXY_DEFENSES = tuple(d for d in DEFENSES if d == "none" or (d in PROJECTING and d != "enhanced-invert-classify"))
OIP_KEYS = ("defense", "steps", "restarts", "seed")  # our keys among an OIP request's parameters
SEED_MAX = 2**32 - 1


class RequestError(ServiceError, ValueError):
    """A request the server refuses: 422 (the default), 404 or 413; `detail` pydantic's errors (in /v1's body)."""

    def __init__(self, message: str, status: int = 422, detail: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message, status, detail=detail)
        self.detail = detail


# -- the caller's fields ---------------------------------------------------------------------------------------------
def _integer(v: Any) -> Any:
    """An integer, or a string of digits (query and form values); a boolean or a float is refused."""
    if isinstance(v, bool):  # JSON true is not the integer 1
        raise ValueError("must be an integer, not a boolean")
    if isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d{1,20}\s*", v):
        return int(v)
    if not isinstance(v, int):
        raise ValueError(f"must be an integer, got {v!r}"[:200])
    return v


def _name(v: Any) -> Any:
    if isinstance(v, str) and not v.strip():
        raise ValueError("must not be empty (leave it out for the default)")
    return v


Int = Annotated[int, BeforeValidator(_integer), Field(strict=True)]
NOT_BLANK = r"\S"  # a name must not be empty or blank (leave it out for the default)
ModelName = Annotated[str, BeforeValidator(_name), Field(min_length=1, pattern=NOT_BLANK)]
MODEL_NAME = '"<dataset>/<classifier>" or "<dataset>", e.g. "mnist/classifier_A"'
Start = Literal["defense-gan", "invert-classify"]  # the projections /v1/purify, /v1/detect and /v1/attack offer


def _message(errors: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """`"<field> <what is wrong>"` for the first error, and every error as {loc, msg}."""
    detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")).removeprefix("Value error, ")}
              for e in errors]  # fmt: skip
    first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
    where, msg = ".".join(str(p) for p in first["loc"]), first["msg"]
    if not where:
        return msg, detail
    return (f"{where} {msg}" if msg.startswith("must") else f"{where}: {msg}"), detail  # "steps must be ..."


class Fields(BaseModel):
    """What every call that projects takes; subclasses add their own. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    steps: Int | None = Field(None, description="projection gradient steps (default: the server's; capped; 0 only "
                              "with a warm start)")  # fmt: skip
    restarts: Int | None = Field(None, description="random restarts of the projection (capped)")
    seed: Int | None = Field(None, ge=0, le=SEED_MAX, description="fix the restarts' noise (default: fresh draws)")

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Self:
        """The fields of `raw` (query, JSON or multipart fields, or OIP parameters), or RequestError 422."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            message, detail = _message(exc.errors())  # type: ignore[arg-type]
            raise RequestError(f"invalid request: {message}", 422, detail) from None


class ImageFields(Fields):
    """v1's image-taking calls: arrays may come in [0, 255]."""

    value_range: float = Field(1.0, description="arrays only: 1 for values in [0, 1], 255 for [0, 255]",
                               json_schema_extra={"enum": [1, 255]})  # fmt: skip

    @field_validator("value_range")
    @classmethod
    def _range(cls, v: float) -> float:
        if v not in (1.0, 255.0):
            raise ValueError("value_range must be 1 or 255")
        return v


class ClassifierFields(ImageFields):
    """Calls that name a classifier (`model`): classify, attack."""

    model: ModelName | None = Field(None, description=MODEL_NAME)


class ClassifyFields(ClassifierFields):
    defense: Defense | None = Field(
        None,
        description="none | defense-gan (random restarts) | invert-classify (encoder warm start) | "
        "enhanced-invert-classify (warm start, then the classifier's adversarially fine-tuned `_enhanced` twin) | "
        "magnet (MagNet's autoencoder reformer and its two reconstruction-error detectors; steps and restarts do "
        "not apply)",
    )
    return_purified: bool = Field(False, description="include each purified image as base64 PNG")
    return_input: bool = Field(False, description="include each input as the model sees it (after decoding, and "
                               "fitting to the dataset's channels and size) as base64 PNG")  # fmt: skip


class PurifyFields(ImageFields):
    dataset: ModelName | None = Field(None, description="whose generator purifies, e.g. mnist")
    defense: Start = Field("defense-gan", description="projection start")
    format: Literal["png", "json", "npy"] = Field("png", description="png (one image), json, or npy (float32)")


class DetectFields(ImageFields):
    dataset: ModelName | None = Field(None, description="whose generator and calibrated threshold, e.g. mnist")
    defense: Start = Field("defense-gan", description="projection start")


class OIPFields(Fields):
    """Our parameters of an Open Inference Protocol request (the model it names fixes dataset and classifier)."""

    defense: str | None = None  # checked against what the model offers by `resolve`


def oip_fields(params: dict[str, Any]) -> OIPFields:
    """Our parameters taken out of `params` (they are never forwarded), parsed."""
    return OIPFields.parse({k: params.pop(k) for k in OIP_KEYS if k in params})


# -- the resolved request --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """The model an OIP call names: our classifier, or (classifier None) an upstream's dataset."""

    dataset: str
    classifier: str | None = None


@dataclass(frozen=True)
class Request:
    """A request with every default applied and every cap checked, before any work."""

    dataset: str
    classifier: str | None  # what classifies (the enhanced twin for enhanced-invert-classify); None: purify only
    defense: str
    cfg: ProjectionConfig | None  # None for a defense that does not project (none, magnet)
    seed: int | None

    @property
    def model(self) -> str:
        """The metrics' model label, as the batcher's jobs name it: dataset/classifier, or the dataset alone."""
        return f"{self.dataset}/{self.classifier}" if self.classifier else self.dataset

    @property
    def job_seed(self) -> int | None:
        """The seed as the engine takes it: only a projection draws noise."""
        return self.seed if self.cfg is not None else None


def resolve(f: Fields, s: Settings, registry: Registry, target: Target | None = None,
            project: bool | None = True) -> Request:  # fmt: skip
    """The request `f` asks of this server (RequestError or NotShipped on a model not shipped, a field over a cap).
    `target`: the OIP model called (else the fields name it). `project` False: no projection; None: a projection
    where the dataset's generator is shipped, else none (an attack on the bare classifier)."""
    ds, clf = _target(f, s, registry, target)
    proxied = target is not None and target.classifier is None
    defense = getattr(f, "defense", None) or default_defense(registry, ds, clf, s.default_defense, proxied)
    allowed = PROXY_DEFENSES if proxied else DEFENSES
    if defense not in allowed:
        raise RequestError(f"parameter 'defense' must be one of {list(allowed)}, got {defense!r}")
    if clf is not None:
        clf = classifier_for(registry, ds, clf, defense)
    if project is None:
        project = registry.has(f"{ds}/generator")
    cfg = projection(defense, ds, f, s, registry) if project else None
    return Request(ds, clf, defense, cfg, f.seed)


def _target(f: Fields, s: Settings, registry: Registry, target: Target | None) -> tuple[str, str | None]:
    """(dataset, classifier) the call names: the OIP model, `model` (a classifier) or `dataset` (purify only)."""
    if target is not None:
        return target.dataset, target.classifier
    if isinstance(f, ClassifierFields):
        return classifier(f.model, registry, s)
    ds = getattr(f, "dataset", None) or s.default_dataset
    if not any(a.dataset == ds for a in registry.artifacts.values()):
        raise RequestError(f"no dataset {ds!r} in the registry", 404)
    return ds, None


def classifier(model: str | None, registry: Registry, s: Settings) -> tuple[str, str]:
    """(dataset, classifier) of `"<dataset>/<classifier>"` or `"<dataset>"` (its default classifier); 404 unless
    shipped with an ONNX graph."""
    ds, _, clf = (model or s.default_dataset).partition("/")
    clf = clf or default_classifier(registry, ds, s.default_classifier)
    key = f"{ds}/{clf}"
    if not registry.has(key) or registry.get(key).kind != "classifier" or "onnx" not in registry.get(key).files:
        known = sorted(k for k, a in registry.artifacts.items() if a.kind == "classifier" and "onnx" in a.files)
        raise RequestError(f"no classifier {key!r}; available: {', '.join(known) or 'none'}", 404)
    return ds, clf


def projection(defense: str, dataset: str, f: Fields, s: Settings, registry: Registry) -> ProjectionConfig | None:
    """The projection a defense implies with the caller's steps and restarts, capped; None where it does not project
    (404 when the generator or encoder it needs is not shipped)."""
    if defense not in PROJECTING:
        return None
    if not registry.has(f"{dataset}/generator"):
        raise RequestError(f"no generator is shipped for {dataset!r}: defended calls are unavailable (defense=none "
                           "still classifies)", 404)  # fmt: skip
    if defense in FROM_ENCODER and not registry.has(f"{dataset}/encoder"):
        raise RequestError(f"no encoder is shipped for {dataset!r}: use defense=defense-gan", 404)
    return projection_config(defense, f.steps, f.restarts, s)


def image_cap(s: Settings, spec: DatasetSpec | None = None) -> int:
    """The images-per-request cap for a dataset: `max_batch_images` 28×28 gray images' worth of values (a 3×32×32
    image counts 3.9, `DatasetSpec.cost`), and at least one."""
    return s.max_batch_images if spec is None else max(1, int(s.max_batch_images / max(1.0, spec.cost)))


def check_count(n: int, s: Settings, spec: DatasetSpec | None = None) -> None:
    """The images-per-request cap (413)."""
    if n > (cap := image_cap(s, spec)):
        raise RequestError(f"{n} images in one request; the limit is {cap}", 413)
