"""The public profile (MG_PUBLIC=true): what a public caller may ask and what it is told.

    caller = Caller(client, inspect)                       # from the route (service.api.deps.get_caller)
    fields = fix_pipeline(fields, name, caller, settings)  # refuse pipeline parameters, fill the operator's in
    out = reduce(probs, flagged, name, caller, settings)   # labels and what the output policy allows

A public caller (no API key of the inspect scope) cannot change the pipeline a served name runs (`defense`,
`steps`, `restarts`, `seed`, `return_purified` are refused with 422 naming the profile, never silently dropped),
never reads the detector's figures (MSE, flag, threshold, timings), and gets the scores the operator's output policy
allows: `label`, `top1` (the label and its probability, rounded) or `probabilities` (rounded). A flagged input is
answered, abstained (label −1) or refused, as the served name's `on_flagged` says. Random starts are drawn from a
fresh seed per request (`service.purify.initial_latents` with seed None). Outside the profile, or for an inspect
caller, everything passes through as before. Why each choice: docs/threat-model.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np
import torch

from service.config import ServedPipeline, Settings
from service.request import Fields, RequestError

PIPELINE_FIELDS = ("defense", "steps", "restarts", "seed", "return_purified")
ABSTAIN = -1  # the label of an abstained answer


@dataclass(frozen=True)
class Caller:
    """Who sends a request: the client identity the per-client defences count, and its scope."""

    client: str
    inspect: bool = False


LOOPBACK = Caller("local", inspect=True)  # in-process callers (tests, the evaluation's own clients)


def restricted(caller: Caller | None, s: Settings) -> bool:
    """The public profile applies to this caller."""
    return s.public and not (caller is not None and caller.inspect)


F = TypeVar("F", bound=Fields)


def fix_pipeline(fields: F, name: str, caller: Caller | None, s: Settings) -> F:
    """`fields` with the operator's pipeline for `name` filled in; RequestError 422 when a public caller set any
    pipeline parameter. Outside the profile: `fields` unchanged."""
    if not restricted(caller, s):
        return fields
    given = [k for k in PIPELINE_FIELDS if getattr(fields, k, None) is not None and getattr(fields, k) is not False]
    if given:
        raise RequestError(f"parameters {given} are fixed by the operator under the public profile (MG_PUBLIC); "
                           "only an API key of the inspect scope may set them")  # fmt: skip
    p = s.profile.pipeline(name)
    update = {"steps": p.steps, "restarts": p.restarts}
    if "defense" in type(fields).model_fields:
        update["defense"] = p.defense
    return fields.model_copy(update=update)


def served_model(model: str | None, s: Settings) -> str:
    """The /v1 `model` a public caller may name: a dataset, or a name the operator lists in the profile's pipelines
    (anything else would let a caller pick a weaker classifier than the one served)."""
    if model is None or "/" not in model or model in s.profile.pipelines:
        return model or s.default_dataset
    raise RequestError(f"model {model!r} is not served under the public profile (MG_PUBLIC); name a dataset or one "
                       f"of {sorted(s.profile.pipelines) or 'the datasets'}")  # fmt: skip


@dataclass(frozen=True)
class Reduced:
    """An answer under an output policy: labels always (−1: abstained); top-1 or all probabilities if allowed."""

    labels: np.ndarray
    top1: np.ndarray | None = None
    probabilities: np.ndarray | None = None


def reduce(probs: np.ndarray, flagged: np.ndarray | None, pipeline: ServedPipeline) -> Reduced:
    """Apply `pipeline`'s output and flagged-input policies to N×K probabilities and the detector's flags."""
    labels = probs.argmax(1).astype(np.int64)
    hit = np.zeros(len(labels), dtype=bool) if flagged is None else np.asarray(flagged, dtype=bool)
    if hit.any() and pipeline.on_flagged == "refuse":
        raise RequestError("the input was refused: it looks adversarial to this server", 422)
    rounded = np.round(probs.astype(np.float32), pipeline.decimals)
    if pipeline.on_flagged == "abstain":
        labels = np.where(hit, ABSTAIN, labels)
        rounded = np.where(hit[:, None], np.float32(0), rounded)
    if pipeline.output == "probabilities":
        return Reduced(labels, probabilities=rounded)
    if pipeline.output == "top1":
        return Reduced(labels, top1=rounded.max(1))
    return Reduced(labels)


class Gate(Protocol):
    """The per-client defences (service.guard.Guard): raise Throttled when a client must wait or is stopped."""

    async def check(self, client: str, x: np.ndarray) -> None: ...


async def admit(gate: Gate | None, caller: Caller | None, x: torch.Tensor) -> None:
    """Count these images against the caller's rate, budget and query-attack detector (inspect callers pass)."""
    if gate is not None and caller is not None and not caller.inspect:
        await gate.check(caller.client, x.detach().cpu().numpy())
