"""Carlini–Wagner L2 (Carlini & Wagner 2017, "Towards Evaluating the Robustness of Neural Networks").

    minimize ‖x' − x‖₂² + c·f(x'),  x' = (tanh(w) + 1)/2,
    f(x') = max(Z_y − max_{i≠y} Z_i, −κ)   (untargeted; targeted: max(max_{i≠t} Z_i − Z_t, −κ))

with Adam on w, and a per-image binary search over c: c halves towards the last success and grows (×10 until an
upper bound exists) after a failure. Each image keeps its smallest-L2 adversarial found over all rounds; an image
for which none was found is returned unchanged (so "success" is always checked on the output). L2 threat model,
no ε: the size of the perturbation is the result. Images N×C×H×W in [0, 1]; the output stays in [0, 1].

Two settings:
- `cw` defaults: a search that converges on MNIST — 9 binary-search steps × up to 100 Adam steps (lr 0.1, early
  abort when the loss stalls), c₀ = 1, κ = 0. On the shipped MNIST model A it reaches 100% success at a mean L2
  of about 1.3, the same as 1000 steps at lr 0.01 would (checked on a 20-image sample), at a fraction of the cost.
- `cw_defense_gan` (`CW_DEFENSE_GAN`): the cleverhans configuration Defense-GAN ran (Samangouei et al. 2018):
  1 binary-search step, 100 iterations, lr 10, c = 100 — one huge-step pass that finds an adversarial for almost
  every image but with a far larger L2 than the converged search.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

CW_DEFENSE_GAN: dict[str, float | int] = {"search_steps": 1, "steps": 100, "lr": 10.0, "c": 100.0, "kappa": 0.0}


def _margin(logits: torch.Tensor, labels: torch.Tensor, targeted: bool, kappa: float) -> torch.Tensor:
    """CW's f: ≤ 0 once the (target) decision holds with confidence κ; per image."""
    real = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(torch.nn.functional.one_hot(labels, logits.shape[1]).bool(), -torch.inf).amax(1)
    diff = other - real if targeted else real - other
    return torch.clamp(diff, min=-kappa)


def _succeeds(logits: torch.Tensor, labels: torch.Tensor, targeted: bool, kappa: float) -> torch.Tensor:
    z = logits.clone()
    rows = torch.arange(len(z), device=z.device)
    z[rows, labels] += -kappa if targeted else kappa
    pred = z.argmax(1)
    return pred == labels if targeted else pred != labels


def cw(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    c: float = 1.0,
    kappa: float = 0.0,
    steps: int = 100,
    search_steps: int = 9,
    lr: float = 0.1,
    abort_early: bool = True,
    targeted: bool = False,
) -> torch.Tensor:
    """CW-L2 with a binary search over c; see the module docstring. Returns the smallest-L2 adversarials found.

    Defaults: c₀ = 1, κ = 0, 100 Adam steps (lr 0.1) per round, 9 rounds, early abort.
    """
    if steps < 1 or search_steps < 1 or c <= 0 or lr <= 0:
        raise ValueError("cw needs steps >= 1, search_steps >= 1, c > 0, lr > 0")
    x0 = images.detach()
    n = len(x0)
    dev = x0.device
    flat = (n, -1)
    lower = torch.zeros(n, device=dev)
    upper = torch.full((n,), 1e10, device=dev)
    const = torch.full((n,), float(c), device=dev)
    best_l2 = torch.full((n,), torch.inf, device=dev)
    best = x0.clone()
    w0 = torch.atanh((x0 * 2 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
    for _ in range(search_steps):
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        found = torch.zeros(n, dtype=torch.bool, device=dev)
        prev = torch.inf
        for step in range(steps):
            adv = (torch.tanh(w) + 1) / 2
            logits = model(adv)
            l2 = (adv - x0).view(flat).pow(2).sum(1)
            loss = (l2 + const * _margin(logits, labels, targeted, kappa)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                ok = _succeeds(logits, labels, targeted, kappa)
                better = ok & (l2 < best_l2)
                best_l2 = torch.where(better, l2, best_l2)
                best[better] = adv.detach()[better]
                found |= ok
            if abort_early and step % max(steps // 10, 1) == 0:
                if loss.item() > prev * 0.9999:
                    break
                prev = loss.item()
        # binary search on c, per image
        upper = torch.where(found, torch.minimum(upper, const), upper)
        lower = torch.where(found, lower, torch.maximum(lower, const))
        const = torch.where(upper < 1e9, (lower + upper) / 2, const * 10)
    return best.clamp(0.0, 1.0).detach()


# CW-L2 with Defense-GAN's cleverhans settings (`CW_DEFENSE_GAN`: 1 search step, 100 iterations, lr 10, c = 100;
# cleverhans' early abort on), each overridable: a partial, so that its signature carries those defaults.
cw_defense_gan = functools.partial(cw, **CW_DEFENSE_GAN)
cw_defense_gan.__doc__ = "CW-L2 with Defense-GAN's cleverhans settings (`CW_DEFENSE_GAN`), each overridable."
