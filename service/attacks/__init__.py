"""Adversarial attacks, one per module, all with one signature.

    adv = attack(model, images, labels, **params)

`model` maps N×C×H×W images in [0, 1] to logits; `images` is a float tensor in [0, 1]; `labels` the true labels
(untargeted) or the target labels (with targeted=True). The result has the same shape, stays in [0, 1] and
within the attack's budget. Adaptive attacks take the defended pipeline (`adaptive.Defended`) as `model`; the
black-box substitute attack uses `model` only through its labels; AdvGAN needs its trained `generator`.

`ATTACKS` maps the public names (as the /v1/attack endpoint takes them) to their spec.

Every attack's signature is the same shape: model, images, labels, then its keyword parameters with the paper's
defaults as their default values (as torchattacks states them). Those defaults are read from the signature by the
service (`runner.defaults`, shown by GET /v1/models), so each attack keeps its own. The logic attacks share is
written once: pgd and pgd_l2 run one loop and one step (`pgd.ball_step`, which `eot` steps with too), `bpda` is
`eot` with one sample and `cw_defense_gan` is `cw` with Defense-GAN's settings (partials, so that their signatures
carry their own defaults).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from service.attacks.adaptive import Defended, Reformed, Unrolled, bpda, detector_aware, eot, latent
from service.attacks.advgan import advgan, generator_key
from service.attacks.cw import CW_DEFENSE_GAN, cw, cw_defense_gan
from service.attacks.fgsm import fgsm, rand_fgsm
from service.attacks.pgd import pgd, pgd_l2
from service.attacks.substitute import Substitute, as_oracle, substitute, train_substitute


@dataclass(frozen=True)
class AttackSpec:
    """One public attack: its function, threat model, the parameters a caller may set, and what it needs."""

    fn: Callable
    norm: str  # "linf" or "l2"
    params: tuple[str, ...]  # caller-settable keyword parameters
    adaptive: bool = False  # attacks the defended pipeline (needs a generator)
    needs: str | None = None  # "advgan" (a trained generator) or "substitute" (seed images and an oracle)


ATTACKS: dict[str, AttackSpec] = {
    "fgsm": AttackSpec(fgsm, "linf", ("eps",)),
    "rand-fgsm": AttackSpec(rand_fgsm, "linf", ("eps", "alpha")),
    "pgd": AttackSpec(pgd, "linf", ("eps", "alpha", "steps", "random_start")),
    "pgd-l2": AttackSpec(pgd_l2, "l2", ("eps", "alpha", "steps", "random_start")),
    "cw": AttackSpec(cw, "l2", ("c", "kappa", "steps", "search_steps", "lr", "abort_early")),
    "cw-defensegan": AttackSpec(cw_defense_gan, "l2", ("c", "kappa", "steps", "search_steps", "lr")),
    "advgan": AttackSpec(advgan, "linf", (), needs="advgan"),
    "substitute": AttackSpec(substitute, "linf", ("eps", "arch"), needs="substitute"),
    "bpda": AttackSpec(bpda, "linf", ("eps", "alpha", "steps", "norm", "random_start", "seed"), True),
    "eot": AttackSpec(eot, "linf", ("eps", "alpha", "steps", "samples", "norm", "random_start", "seed"), True),
    "latent": AttackSpec(latent, "linf", ("eps", "steps", "lr_z", "lr_delta", "c", "kappa", "check_every"), True),
}

__all__ = [
    "ATTACKS",
    "AttackSpec",
    "CW_DEFENSE_GAN",
    "Defended",
    "Reformed",
    "Substitute",
    "Unrolled",
    "advgan",
    "as_oracle",
    "bpda",
    "cw",
    "cw_defense_gan",
    "detector_aware",
    "eot",
    "fgsm",
    "generator_key",
    "latent",
    "pgd",
    "pgd_l2",
    "rand_fgsm",
    "substitute",
    "train_substitute",
]
