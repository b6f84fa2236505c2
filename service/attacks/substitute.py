"""Black-box substitute attack (Papernot et al. 2017, "Practical Black-Box Attacks against Machine Learning").

The attacker sees only the target's labels (an *oracle*). It labels a small held-out seed set with the oracle,
trains a substitute on it, and grows the set by Jacobian-based augmentation,

    x_new = clip(x + λ_ρ · sign(∇ₓ Z_{O(x)}(x)), 0, 1)     (Z: the substitute's logits, O(x): the oracle's label)

doubling it each round and querying the oracle for the new points; then it crafts FGSM on the substitute and
transfers it. Defaults follow cleverhans' `mnist_blackbox` as Defense-GAN ran it (Table 1): 150 held-out seed
images, 6 substitute-training rounds (5 augmentations, so 150·2⁵ = 4,800 points and 4,650 oracle queries after the
seed labels), λ = 0.1 with sign −1 for rounds 0–2 and +1 after (cleverhans' periodic step), 10 epochs of Adam
(lr 1e-3, batch 128) per round continuing from the previous weights, substitute architecture E (or B), FGSM ε = 0.3.
L∞ threat model; images N×C×H×W in [0, 1], the output stays in [0, 1] and within ε.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from service.attacks.fgsm import fgsm
from service.nets import build_classifier

Oracle = Callable[[torch.Tensor], torch.Tensor]


def as_oracle(target: nn.Module | Oracle, batch: int = 500) -> Oracle:
    """A label-only view of `target`: an nn.Module's argmax (no gradients ever leave it), or the callable itself."""
    if not isinstance(target, nn.Module):
        return target

    @torch.no_grad()
    def labels_of(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([target(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])

    return labels_of


@dataclass
class Substitute:
    """A trained substitute and what training it cost."""

    model: nn.Module
    oracle_queries: int
    training_points: int
    agreement: float  # fraction of the final training set on which the substitute agrees with the oracle


def train_substitute(
    oracle: nn.Module | Oracle,
    seed_images: torch.Tensor,
    arch: str = "E",
    rounds: int = 6,
    lam: float = 0.1,
    epochs: int = 10,
    batch: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    classes: int = 10,
) -> Substitute:
    """Train a substitute of `arch` (E or B) for images of `seed_images`' shape and `classes` classes from
    `seed_images` with `rounds` rounds of Jacobian augmentation."""
    if rounds < 1 or epochs < 1:
        raise ValueError("train_substitute needs rounds >= 1 and epochs >= 1")
    ask = as_oracle(oracle)
    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the substitute's initial weights
    net = build_classifier(arch, tuple(seed_images.shape[1:]), classes).to(seed_images.device)  # type: ignore[arg-type]
    torch.random.set_rng_state(torch_state)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x = seed_images.detach().clone()
    y = ask(x).to(x.device)
    queries = len(x)
    for rho in range(rounds):
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen).to(x.device)
            for i in range(0, len(x), batch):
                idx = perm[i : i + batch]
                loss = F.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval()
        if rho < rounds - 1:
            step = lam * (1.0 if rho // 3 else -1.0)
            x_req = x.clone().requires_grad_(True)
            picked = net(x_req).gather(1, y[:, None]).sum()
            (grad,) = torch.autograd.grad(picked, x_req)
            new = (x + step * grad.sign()).clamp(0.0, 1.0)
            x = torch.cat([x, new])
            y = torch.cat([y, ask(new).to(x.device)])
            queries += len(new)
    with torch.no_grad():
        agreement = float((net(x).argmax(1) == y).float().mean())
    for p in net.parameters():
        p.requires_grad_(False)
    return Substitute(model=net.eval(), oracle_queries=queries, training_points=len(x), agreement=agreement)


def substitute(
    model: nn.Module | Oracle,
    images: torch.Tensor,
    labels: torch.Tensor,
    holdout: torch.Tensor | None = None,
    substitute_model: nn.Module | None = None,
    arch: str = "E",
    rounds: int = 6,
    lam: float = 0.1,
    epochs: int = 10,
    eps: float = 0.3,
    targeted: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """FGSM(ε) on a substitute of the black box `model` (used only through its labels), transferred.

    Pass a trained `substitute_model` to reuse one, or `holdout` (the 150 seed images) to train it here.
    """
    if substitute_model is None:
        if holdout is None:
            raise ValueError("substitute needs holdout=<seed images> or substitute_model=<trained substitute>")
        substitute_model = train_substitute(model, holdout, arch, rounds, lam, epochs, seed=seed).model
    return fgsm(substitute_model, images, labels, eps=eps, targeted=targeted)
