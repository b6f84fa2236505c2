"""Adaptive attacks on the defended pipeline `classifier ∘ project` (attacks that know the defense).

The projection x ↦ G(z*(x)) is an inner optimisation: its exact gradient is unavailable or useless, so:

- **BPDA** (Athalye, Carlini & Wagner 2018, "Obfuscated Gradients Give a False Sense of Security"): forward
  through the real projection, backward as if it were the identity (straight-through), PGD on top.
- **EOT** (Athalye et al. 2018, "Synthesizing Robust Adversarial Examples"): the projection is randomised by its
  random restarts; average the BPDA gradient over `samples` projections with fresh restarts per step.
- **Latent** ("overpowered attack", Jalal, Ilyas, Daskalakis & Dimakis 2019, "The Robust Manifold Defense"):
  start at the input's manifold point z₀ = z*(x) and search jointly for z and δ (‖δ‖∞ ≤ ε) with
      min ‖x + δ − G(z)‖₂² + c·max(Z_y(G(z)) − max_{i≠y} Z_i(G(z)), −κ),
  i.e. a point of G's range that the classifier misreads, close to an allowed input x + δ; projecting x + δ then
  lands near G(z). c doubles for the images whose G(z) is still read correctly.

Every attack here takes a `Defended` module as `model` (build one with `Defended(classifier, generator, cfg)`),
keeps images in [0, 1] and within the L∞ (or L2) budget, and returns, per image, the last iterate the defended
pipeline misclassified (the final iterate where none did). Cost per attack step ≈ `samples` projections.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from service.attacks.pgd import ball_step
from service.purify import ProjectionConfig, initial_latents, project

_DEFAULT = object()


class Defended(nn.Module):
    """logits = classifier(G(z*(x))): the Defense-GAN pipeline as a torch module, straight-through backward (BPDA).

    `cfg` sets the projection (steps L, restarts R, init); `seed` its random restarts (None: fresh each call).
    """

    def __init__(
        self,
        classifier: nn.Module,
        generator: nn.Module,
        cfg: ProjectionConfig | None = None,
        encoder: nn.Module | None = None,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.generator = generator
        self.encoder = encoder
        self.cfg = cfg or ProjectionConfig()
        self.seed = seed

    def purify(self, x: torch.Tensor, seed: int | None | object = _DEFAULT) -> torch.Tensor:
        """G(z*(x)) in the forward pass, identity in the backward pass."""
        s = self.seed if seed is _DEFAULT else seed
        with torch.enable_grad():
            p = project(x.detach().clamp(0.0, 1.0), self.generator, self.cfg, encoder=self.encoder, seed=s)  # type: ignore[arg-type]
        return x + (p.images - x).detach()

    def forward(self, x: torch.Tensor, seed: int | None | object = _DEFAULT) -> torch.Tensor:
        return self.classifier(self.purify(x, seed))

    def with_config(self, **changes: object) -> Defended:
        """A copy with projection settings changed (e.g. fewer steps for the attacker's own forward passes)."""
        other = copy.copy(self)
        other.cfg = self.cfg.with_(**changes)
        return other


class Unrolled(Defended):
    """The same pipeline with the exact gradient: the projection's L SGD-momentum steps are unrolled and
    differentiated (double backward through G), z₀ = E(x) included. Affordable for the warm start (L = 25).

    Its forward equals `Defended`'s (same steps, same starts; checked by the tests to 1e-5); only the backward
    differs. SGD projections without latent-norm constraints only.
    """

    def purify(self, x: torch.Tensor, seed: int | None | object = _DEFAULT) -> torch.Tensor:
        cfg = self.cfg
        if cfg.optimizer != "sgd" or cfg.z_max_norm is not None or cfg.z_min_norm is not None:
            raise ValueError("Unrolled differentiates plain SGD-momentum projections only")
        s = self.seed if seed is _DEFAULT else seed
        n, r = len(x), cfg.restarts
        with torch.enable_grad():
            x = x.clamp(0.0, 1.0)
            if cfg.init == "encoder":
                noise = initial_latents(x.detach(), self.generator.latent_dim, cfg, self.encoder, s)  # type: ignore[arg-type]
                z0 = self.encoder(x).repeat_interleave(r, dim=0)  # type: ignore[misc]
                z = z0 + (noise - z0.detach())  # E(x) with its gradient, plus the restarts' fixed noise
            else:
                z = initial_latents(x, self.generator.latent_dim, cfg, None, s)  # type: ignore[arg-type]
            z = z if z.requires_grad else z.detach().requires_grad_(True)  # a forward pass without an input gradient
            target = x.repeat_interleave(r, dim=0)
            decay_step, buf = math.ceil(cfg.decay_at * cfg.steps), None
            for step in range(cfg.steps):
                lr = cfg.lr * (cfg.decay if step >= decay_step else 1.0)
                loss = (self.generator(z) - target).pow(2).mean(dim=(1, 2, 3)).sum()
                (g,) = torch.autograd.grad(loss, z, create_graph=True)
                buf = g if buf is None else cfg.momentum * buf + g
                z = z - lr * buf
            recon = self.generator(z)
            mse = (recon - target).pow(2).mean(dim=(1, 2, 3)).view(n, r)
            rows = torch.arange(n, device=x.device) * r + mse.argmin(dim=1)
            return recon[rows]


class Reformed(nn.Module):
    """logits = classifier(AE(x)): MagNet's reformer pipeline (Meng & Chen 2017) with its exact gradient — the
    autoencoder is a plain differentiable network, so every white-box attack applies to it directly (Carlini &
    Wagner 2017, "MagNet and 'Efficient Defenses…' are not robust"). `excess(x)`: per image, the worse of its two
    detectors' score / threshold, minus 1 (> 0: flagged)."""

    def __init__(self, classifier: nn.Module, magnet: nn.Module, thresholds: tuple[float, float]) -> None:
        super().__init__()
        self.classifier, self.magnet, self.thresholds = classifier, magnet, thresholds

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        return self.magnet(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.magnet(x))

    def excess(self, x: torch.Tensor, reformed: torch.Tensor | None = None) -> torch.Tensor:
        s1, s2 = self.magnet.scores(x, reformed)  # type: ignore[operator]
        return torch.maximum(s1 / self.thresholds[0], s2 / self.thresholds[1]) - 1


def _require_defended(model: nn.Module) -> Defended:
    if not isinstance(model, Defended):
        raise TypeError("adaptive attacks need model=Defended(classifier, generator, cfg), the defended pipeline")
    return model


def _project_ball(adv: torch.Tensor, x0: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    delta = adv - x0
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = len(delta)
        factor = torch.clamp(eps / delta.view(n, -1).norm(dim=1).clamp_min(1e-12), max=1.0)
        delta = delta * factor.view(n, 1, 1, 1)
    return (x0 + delta).clamp(0.0, 1.0)


def _misread(logits: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    pred = logits.argmax(1)
    return pred == labels if targeted else pred != labels


# (model, images, labels, then the paper's defaults as keywords): the signature every attack here shares, as in
# torchattacks and cleverhans, so the runner and the evaluations call any of them the same way.
def eot(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float = 0.3, alpha: float = 0.01,
        steps: int = 40, samples: int = 8, norm: str = "linf", random_start: bool = True, targeted: bool = False,
        seed: int = 0) -> torch.Tensor:  # fmt: skip
    """BPDA-PGD with each step's gradient averaged over `samples` projections with different random restarts
    (the step is PGD's, `pgd.ball_step`). Defaults: L∞ ε = 0.3, α = 0.01, 40 steps, 8 samples.
    """
    m = _require_defended(model)
    if norm not in ("linf", "l2"):
        raise ValueError("norm must be 'linf' or 'l2'")
    if eps < 0 or alpha < 0 or steps < 0 or samples < 1:
        raise ValueError("needs eps, alpha, steps >= 0 and samples >= 1")
    x0 = images.detach()
    n = len(x0)
    gen = torch.Generator().manual_seed(seed)
    adv = _start(x0, eps, norm, gen) if random_start else x0.clone()
    best = adv.clone()
    found = torch.zeros(n, dtype=torch.bool, device=x0.device)
    for _ in range(steps):
        grad = torch.zeros_like(adv)
        x = adv.detach().requires_grad_(True)
        for k in range(samples):
            # sample 0 is the pipeline as configured (its own seed); the others draw fresh restarts (EOT)
            s = _DEFAULT if k == 0 else int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            logits = m(x, seed=s)
            loss = F.cross_entropy(logits, labels)
            (g,) = torch.autograd.grad(-loss if targeted else loss, x)
            grad += g / samples
            if k == 0:
                with torch.no_grad():
                    hit = _misread(logits, labels, targeted)
                    best[hit] = adv[hit]
                    found |= hit
        with torch.no_grad():
            adv = ball_step(adv, grad, x0, eps, alpha, norm)
    with torch.no_grad():
        hit = _misread(m(adv), labels, targeted)
        best[hit] = adv[hit]
        found |= hit
        best[~found] = adv[~found]
    return best.detach()


def _start(x0: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    """EOT's random start: U(−ε, ε) (L∞) or a random point of the L2 ball, clipped to [0, 1]."""
    noise = torch.empty(x0.shape).uniform_(-eps, eps, generator=gen).to(x0)
    if norm == "l2":
        n = len(x0)
        noise = torch.randn(x0.shape, generator=gen).to(x0)
        noise = noise / noise.view(n, -1).norm(dim=1).view(n, 1, 1, 1) * eps * torch.rand(n, 1, 1, 1, generator=gen)
    return (x0 + noise).clamp(0.0, 1.0)


# BPDA-PGD is EOT with one sample (the pipeline as configured); a partial, so that its signature, which the runner
# reads for the defaults (L∞ ε = 0.3, α = 0.01, 40 steps), is eot's with samples=1.
bpda = functools.partial(eot, samples=1)
bpda.__doc__ = "BPDA-PGD through the projection (straight-through backward): `eot` with samples=1."


# the attacks' signature shape, compactly (see eot)
def latent(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float = 0.3, steps: int = 200,
           lr_z: float = 0.05, lr_delta: float = 0.01, c: float = 1.0, kappa: float = 5.0, check_every: int = 50,
           targeted: bool = False) -> torch.Tensor:  # fmt: skip
    """The overpowered latent-space attack; see the module docstring. L∞ budget ε.

    Defaults: ε = 0.3, 200 Adam steps (lr 0.05 on z, 0.01 on δ), c₀ = 1 (doubled at each check for images whose
    G(z) is still read correctly), κ = 5; every `check_every` steps the real defended pipeline is run on x + δ and
    the images it misreads keep that iterate.
    """
    m = _require_defended(model)
    if eps < 0 or steps < 0 or check_every < 1:
        raise ValueError("latent needs eps, steps >= 0 and check_every >= 1")
    x0 = images.detach()
    n = len(x0)
    with torch.enable_grad():
        z0 = project(x0, m.generator, m.cfg, encoder=m.encoder, seed=m.seed).z  # type: ignore[arg-type]
    z = z0.clone().requires_grad_(True)
    delta = torch.zeros_like(x0, requires_grad=True)
    opt = torch.optim.Adam([{"params": [z], "lr": lr_z}, {"params": [delta], "lr": lr_delta}])
    const = torch.full((n,), float(c), device=x0.device)
    best = x0.clone()
    found = torch.zeros(n, dtype=torch.bool, device=x0.device)
    for step in range(1, steps + 1):
        with torch.enable_grad():
            gz = m.generator(z)
            logits = m.classifier(gz)
            real = logits.gather(1, labels[:, None]).squeeze(1)
            other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), -torch.inf).amax(1)
            margin = torch.clamp(other - real if targeted else real - other, min=-kappa)
            dist = ((x0 + delta).clamp(0, 1) - gz).pow(2).flatten(1).sum(1)
            loss = (dist + const * margin).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            delta.copy_(_project_ball(x0 + delta, x0, eps, "linf") - x0)
            if step % check_every == 0 or step == steps:
                const = torch.where(margin > 0, const * 2, const)
                adv = x0 + delta
                hit = _misread(m(adv), labels, targeted)
                best[hit] = adv[hit]
                found |= hit
    with torch.no_grad():
        adv = x0 + delta
        best[~found] = adv[~found]
    return best.clamp(0.0, 1.0).detach()


def detector_aware(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    threshold: float | None = None,
    eps: float = 0.3,
    alpha: float = 0.03,
    steps: int = 100,
    weight: float = 10.0,
    norm: str = "linf",
    seed: int = 0,
) -> torch.Tensor:
    """PGD against "correct or flagged": it must fool the classifier *and* stay under the detector. Ascends
    CE(f(purify(x)), y) − weight·max(0, over(x)), where over(x) is how far the detector is above its threshold:
    - `Defended` (BPDA): mse(x)/threshold − 1, the MSE's gradient exact by the envelope theorem
      (∇ₓ min_z ‖G(z) − x‖² = 2(x − G(z*)));
    - `Reformed` (MagNet; `threshold` unused): its two detectors' worse ratio, differentiated exactly.
    Returns per image the last iterate that was misread and unflagged (the final iterate where none was).
    """
    over = _detector_excess(model, threshold)
    x0 = images.detach()
    n, gen = len(x0), torch.Generator().manual_seed(seed)
    adv = _project_ball(x0 + torch.empty(x0.shape).uniform_(-eps, eps, generator=gen).to(x0) * 0.5, x0, eps, norm)
    best, found = adv.clone(), torch.zeros(n, dtype=torch.bool, device=x0.device)
    for i in range(steps + 1):
        x = adv.detach().requires_grad_(True)
        recon = model.purify(x)  # type: ignore[operator]
        logits = model.classifier(recon)  # type: ignore[operator]
        excess = over(x, recon)
        with torch.no_grad():
            hit = _misread(logits, labels, False) & (excess <= 0)
            best[hit], found = adv[hit], found | hit
        if i == steps:
            break
        loss = F.cross_entropy(logits, labels, reduction="sum") - weight * torch.relu(excess).sum()
        (g,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            flat = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(n, 1, 1, 1)
            adv = _project_ball(adv + alpha * (g.sign() if norm == "linf" else g / flat), x0, eps, norm)
    best[~found] = adv[~found]
    return best.detach()


def _detector_excess(model: nn.Module, threshold: float | None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """x, purified ↦ per image how far the model's detector is above its threshold (≤ 0: not flagged)."""
    if isinstance(model, Reformed):
        return lambda x, recon: model.excess(x, recon)
    _require_defended(model)
    if threshold is None:
        raise ValueError("detector_aware through a projection needs the detector's threshold")
    return lambda x, recon: (x - recon.detach()).pow(2).flatten(1).mean(1) / threshold - 1
