"""PGD (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks"), L∞ and L2.

Iterated gradient steps on the cross-entropy, each followed by a projection onto the ε-ball around the input and
onto [0, 1]; optionally from a random point of the ball. Images N×C×H×W in [0, 1]; the result stays in [0, 1] and
within ε. The step rules are torchattacks' `PGD` / `PGDL2` exactly (the tests check them to 1e-6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _loss_grad(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    """∇ₓ of the batch-mean cross-entropy, negated for a targeted attack (it descends the target's loss)."""
    x = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), labels)
    (grad,) = torch.autograd.grad(-loss if targeted else loss, x)
    return grad


def _uniform(like: torch.Tensor, lo: float, hi: float, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.empty_like(like).uniform_(lo, hi)
    return torch.empty(like.shape, device="cpu").uniform_(lo, hi, generator=generator).to(like)


def _normal(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.empty_like(like).normal_()
    return torch.empty(like.shape, device="cpu").normal_(generator=generator).to(like)


def ball_step(adv: torch.Tensor, grad: torch.Tensor, x0: torch.Tensor, eps: float, alpha: float, norm: str,
              eps_for_division: float = 1e-10) -> torch.Tensor:  # fmt: skip
    """One PGD ascent step, torchattacks' rules: x + α·sign g (L∞) or x + α·g/(‖g‖₂ + 1e-10) (L2), projected onto
    the ε-ball around x0 (L∞: δ clamped; L2: δ scaled to ‖δ‖₂ ≤ ε), then onto [0, 1]."""
    n = len(adv)
    if norm == "linf":
        delta = (adv + alpha * grad.sign() - x0).clamp(-eps, eps)
    else:
        grad_norms = grad.view(n, -1).norm(p=2, dim=1) + eps_for_division
        delta = adv + alpha * grad / grad_norms.view(n, 1, 1, 1) - x0
        norms = delta.view(n, -1).norm(p=2, dim=1).clamp_min(1e-12)  # torchattacks' factor where it is finite
        delta = delta * torch.clamp(eps / norms, max=1.0).view(n, 1, 1, 1)
    return (x0 + delta).clamp(0.0, 1.0)


def _random_start(x0: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """A random point of the ε-ball (L∞: U(−ε, ε); L2: direction N(0, I), radius ε·U(0, 1)), clipped to [0, 1]."""
    if norm == "linf":
        return (x0 + _uniform(x0, -eps, eps, generator)).clamp(0.0, 1.0)
    n = len(x0)
    delta = _normal(x0, generator)
    norms = delta.view(n, -1).norm(p=2, dim=1).view(n, 1, 1, 1)
    radius = _uniform(norms, 0.0, 1.0, generator)
    return (x0 + delta * (radius / norms * eps)).clamp(0.0, 1.0)


def _pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, alpha: float, steps: int,
         random_start: bool, targeted: bool, generator: torch.Generator | None, norm: str,
         eps_for_division: float = 1e-10) -> torch.Tensor:  # fmt: skip
    if eps < 0 or alpha < 0 or steps < 0:
        raise ValueError(f"{'pgd' if norm == 'linf' else 'pgd_l2'} needs eps, alpha, steps >= 0")
    x0 = images.detach()
    adv = _random_start(x0, eps, norm, generator) if random_start else x0.clone()
    for _ in range(steps):
        adv = ball_step(adv, _loss_grad(model, adv, labels, targeted), x0, eps, alpha, norm, eps_for_division)
    return adv.detach()


# The public attacks: each states its threat model's defaults in its own signature (the service's runner reads them
# from there, `runner.defaults`); the loop and the step they run are `_pgd` and `ball_step`.
def pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float = 0.3,
    alpha: float = 0.01,
    steps: int = 40,
    random_start: bool = True,
    targeted: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """L∞ PGD: x ← Π_{‖x−x₀‖∞≤ε, [0,1]}(x + α·sign ∇ₓ CE(f(x), y)), from x₀ + U(−ε, ε) when `random_start`.

    Defaults: ε = 0.3, α = 0.01, 40 steps, random start (Madry et al.'s MNIST setting). `generator` seeds the
    random start (the global RNG when None).
    """
    return _pgd(model, images, labels, eps, alpha, steps, random_start, targeted, generator, "linf")


def pgd_l2(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float = 3.0,
    alpha: float = 0.25,
    steps: int = 40,
    random_start: bool = True,
    targeted: bool = False,
    generator: torch.Generator | None = None,
    eps_for_division: float = 1e-10,
) -> torch.Tensor:
    """L2 PGD: x ← Π_{‖x−x₀‖₂≤ε, [0,1]}(x + α·g/‖g‖₂), from a random point of the L2 ball when `random_start`.

    Defaults: ε = 3.0 (a common MNIST L2 budget; ≈ 0.11 RMS per pixel), α = 0.25, 40 steps, random start
    (direction N(0, I), radius ε·U(0, 1), as torchattacks' PGDL2).
    """
    return _pgd(model, images, labels, eps, alpha, steps, random_start, targeted, generator, "l2", eps_for_division)
