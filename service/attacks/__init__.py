"""Adversarial attacks, one per module, all with one signature.

    adv = attack(model, images, labels, **params)

`model` maps N×C×H×W images in [0, 1] to logits; `images` is a float tensor in [0, 1]; `labels` the true labels
(untargeted) or the target labels (with targeted=True). The result has the same shape, stays in [0, 1] and
within the attack's budget. Adaptive attacks take the defended pipeline as `model`.
"""

from service.attacks.fgsm import fgsm, rand_fgsm

__all__ = ["fgsm", "rand_fgsm"]
