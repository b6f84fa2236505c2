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
    if eps < 0 or alpha < 0 or steps < 0:
        raise ValueError("pgd needs eps, alpha, steps >= 0")
    images = images.detach()
    adv = images.clone()
    if random_start:
        adv = (adv + _uniform(adv, -eps, eps, generator)).clamp(0.0, 1.0)
    for _ in range(steps):
        grad = _loss_grad(model, adv, labels, targeted)
        adv = adv + alpha * grad.sign()
        delta = (adv - images).clamp(-eps, eps)
        adv = (images + delta).clamp(0.0, 1.0)
    return adv.detach()


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
    if eps < 0 or alpha < 0 or steps < 0:
        raise ValueError("pgd_l2 needs eps, alpha, steps >= 0")
    images = images.detach()
    n = len(images)
    adv = images.clone()
    if random_start:
        delta = _normal(adv, generator)
        norms = delta.view(n, -1).norm(p=2, dim=1).view(n, 1, 1, 1)
        radius = _uniform(norms, 0.0, 1.0, generator)
        adv = (adv + delta * (radius / norms * eps)).clamp(0.0, 1.0)
    for _ in range(steps):
        grad = _loss_grad(model, adv, labels, targeted)
        grad_norms = grad.view(n, -1).norm(p=2, dim=1) + eps_for_division
        adv = adv + alpha * grad / grad_norms.view(n, 1, 1, 1)
        delta = adv - images
        factor = torch.clamp(eps / delta.view(n, -1).norm(p=2, dim=1), max=1.0)
        adv = (images + delta * factor.view(n, 1, 1, 1)).clamp(0.0, 1.0)
    return adv.detach()
