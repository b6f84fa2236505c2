"""AdvGAN (Xiao et al. 2018, "Generating Adversarial Examples with Adversarial Networks"), semi-white-box.

A perturbation generator G is trained offline against one classifier (`python -m training.train_advgan`, shipped
as e.g. "mnist/advgan_A"); attacking is then one forward pass, x' = clamp(x + ε·tanh(G(x)), 0, 1), with no access
to the model at attack time. L∞ threat model with ε = 0.3 fixed by the trained generator (`generator.eps`).
Images N×1×28×28 in [0, 1]; the output stays in [0, 1] and within ε by construction.
"""

from __future__ import annotations

import torch
from torch import nn


def generator_key(dataset: str, classifier: str) -> str:
    """The registry key of the AdvGAN generator trained against `classifier` (classifier_A_pgd0.3 → advgan_A_pgd0.3)."""
    return f"{dataset}/advgan_{classifier.removeprefix('classifier_')}"


def advgan(
    model: nn.Module | None,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    generator: nn.Module | None = None,
) -> torch.Tensor:
    """x' = generator(x): one forward pass of a trained `AdvGANGenerator` (e.g. `registry.module("mnist/advgan_A")`).

    `model` and `labels` are not used (the generator learned its target offline); they keep the uniform signature.
    """
    if generator is None:
        raise ValueError("advgan needs generator=<trained AdvGANGenerator>, e.g. registry.module('mnist/advgan_A')")
    with torch.no_grad():
        return generator(images.detach()).clamp(0.0, 1.0)
