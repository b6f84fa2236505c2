"""FGSM (Goodfellow et al. 2015) and RAND+FGSM (Tramèr et al. 2018). L∞ threat model, images in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _grad_sign(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), labels)
    (grad,) = torch.autograd.grad(loss, x)
    return -grad.sign() if targeted else grad.sign()


def fgsm(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float = 0.3, targeted: bool = False
) -> torch.Tensor:
    """x' = clip(x + ε·sign(∇ₓ CE(f(x), y)), 0, 1); targeted steps down the loss of the target label.

    Defaults: ε = 0.3 (Defense-GAN's MNIST setting).
    """
    return (images + eps * _grad_sign(model, images, labels, targeted)).clamp(0.0, 1.0).detach()


def rand_fgsm(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float = 0.3,
    alpha: float = 0.05,
    targeted: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RAND+FGSM: a random step α·sign(N(0, I)), then FGSM with ε − α from there (total L∞ ≤ ε).

    Defaults: ε = 0.3, α = 0.05 (Defense-GAN Table 4).
    """
    if not 0 <= alpha <= eps:
        raise ValueError("rand_fgsm needs 0 <= alpha <= eps")
    noise = torch.randn(images.shape, generator=generator, device="cpu").to(images.device)
    x = (images + alpha * noise.sign()).clamp(0.0, 1.0)
    return (x + (eps - alpha) * _grad_sign(model, x, labels, targeted)).clamp(0.0, 1.0).detach()
