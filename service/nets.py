"""Network architectures shared by serving and training.

Every image network takes and returns tensors of shape N×1×28×28 with pixel values in [0, 1].
The layouts follow Defense-GAN (Samangouei et al., 2018, appendix and official code) and AdvGAN
(Xiao et al., 2018); the registry builds them by name from `models/manifest.json`.
"""

from __future__ import annotations

import torch
from torch import nn

LATENT_DIM = 128
IMAGE_SHAPE = (1, 28, 28)


class Generator(nn.Module):
    """Defense-GAN MNIST generator: z (N×128) → image (N×1×28×28) in [0, 1].

    Linear 128→4·4·256, ReLU, ConvT 5×5 s2 →128 (8×8 cropped to 7×7), ReLU, ConvT 5×5 s2 →64 (14×14),
    ReLU, ConvT 5×5 s2 →1 (28×28), sigmoid. No batch norm (the official config sets USE_BN: False).
    """

    def __init__(self, latent_dim: int = LATENT_DIM, width: int = 64) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.width = width
        self.fc = nn.Linear(latent_dim, 4 * 4 * 4 * width)
        self.up1 = nn.ConvTranspose2d(4 * width, 2 * width, 5, stride=2, padding=2, output_padding=1)
        self.up2 = nn.ConvTranspose2d(2 * width, width, 5, stride=2, padding=2, output_padding=1)
        self.up3 = nn.ConvTranspose2d(width, 1, 5, stride=2, padding=2, output_padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(z)).view(-1, 4 * self.width, 4, 4)
        h = torch.relu(self.up1(h))[:, :, :7, :7]
        h = torch.relu(self.up2(h))
        return torch.sigmoid(self.up3(h))


def _conv_trunk(width: int) -> list[nn.Module]:
    """Conv 5×5 s2 1→w→2w→4w with LeakyReLU 0.2, flattened (28×28 → 4·4·4w): the critic's and encoder's body."""
    return [
        nn.Conv2d(1, width, 5, stride=2, padding=2), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 5, stride=2, padding=2), nn.LeakyReLU(0.2),
        nn.Conv2d(2 * width, 4 * width, 5, stride=2, padding=2), nn.LeakyReLU(0.2),
        nn.Flatten(),
    ]  # fmt: skip


class Critic(nn.Module):
    """Defense-GAN critic: Conv 5×5 s2 64→128→256 with LeakyReLU 0.2, Linear → 1 (a score, no sigmoid)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_trunk(width), nn.Linear(4 * 4 * 4 * width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(1)


class Encoder(nn.Module):
    """Image → latent code, same trunk as the critic (Defense-GAN's MnistEncoder) with a linear head.

    The head is left unbounded (Defense-GAN's used tanh, which cannot reach a N(0, I) prior's typical codes).
    """

    def __init__(self, latent_dim: int = LATENT_DIM, width: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_trunk(width), nn.Linear(4 * 4 * 4 * width, latent_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _conv_pair_fc(first_channels: int, first_kernel: int) -> nn.Sequential:
    """Conv{first} {k}×{k} same, ReLU, Conv64 5×5 s2 valid, ReLU, Dropout .25, FC128, ReLU, Dropout .5, FC10."""
    return nn.Sequential(
        nn.Conv2d(1, first_channels, first_kernel, padding=first_kernel // 2), nn.ReLU(),
        nn.Conv2d(first_channels, 64, 5, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Dropout(0.25),
        nn.Linear(64 * 12 * 12, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, 10),
    )  # fmt: skip


def classifier_a() -> nn.Sequential:
    """Model A: Conv64 5×5 same, ReLU, Conv64 5×5 s2 valid, ReLU, Dropout .25, FC128, ReLU, Dropout .5, FC10."""
    return _conv_pair_fc(64, 5)


def classifier_b() -> nn.Sequential:
    """Model B: Dropout .2, Conv64 8×8 s2 same, ReLU, Conv128 6×6 s2 valid, ReLU, Conv128 5×5 valid, ReLU,
    Dropout .5, FC10."""
    return nn.Sequential(
        nn.Dropout(0.2),
        nn.Conv2d(1, 64, 8, stride=2, padding=3), nn.ReLU(),
        nn.Conv2d(64, 128, 6, stride=2), nn.ReLU(),
        nn.Conv2d(128, 128, 5), nn.ReLU(),
        nn.Flatten(), nn.Dropout(0.5),
        nn.Linear(128, 10),
    )  # fmt: skip


def classifier_c() -> nn.Sequential:
    """Model C: Conv128 3×3 same, ReLU, Conv64 5×5 s2 valid, ReLU, Dropout .25, FC128, ReLU, Dropout .5, FC10."""
    return _conv_pair_fc(128, 3)


def classifier_d() -> nn.Sequential:
    """Model D: FC200, ReLU, Dropout .5, FC200, ReLU, FC10."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 200), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(200, 200), nn.ReLU(),
        nn.Linear(200, 10),
    )  # fmt: skip


def classifier_e() -> nn.Sequential:
    """Model E (the black-box substitute): FC200, ReLU, FC200, ReLU, FC10."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 200), nn.ReLU(),
        nn.Linear(200, 200), nn.ReLU(),
        nn.Linear(200, 10),
    )  # fmt: skip


def classifier_s() -> nn.Sequential:
    """Model S: TRADES' MNIST SmallCNN (Zhang et al. 2019, official code), the adversarially trained classifiers'
    network: Conv32 3×3, ReLU, Conv32 3×3, ReLU, MaxPool 2, Conv64 3×3, ReLU, Conv64 3×3, ReLU, MaxPool 2,
    FC200, ReLU, Dropout .5, FC200, ReLU, FC10 (all convolutions valid). A third of A's cost per attack step."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 200), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(200, 200), nn.ReLU(),
        nn.Linear(200, 10),
    )  # fmt: skip


CLASSIFIERS = {"A": classifier_a, "B": classifier_b, "C": classifier_c, "D": classifier_d, "E": classifier_e,
               "S": classifier_s}  # fmt: skip


def build_classifier(arch: str) -> nn.Sequential:
    """Build classifier `arch` (one of A–E) with fresh weights; outputs logits."""
    try:
        return CLASSIFIERS[arch.upper()]()
    except KeyError:
        raise ValueError(f"unknown classifier architecture {arch!r}; expected one of {sorted(CLASSIFIERS)}") from None


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.InstanceNorm2d(ch, affine=True), nn.ReLU(),
            nn.Conv2d(ch, ch, 3, padding=1, bias=False), nn.InstanceNorm2d(ch, affine=True),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class AdvGANGenerator(nn.Module):
    """AdvGAN perturbation generator (Xiao et al. 2018, MNIST layout: c8-c16-c32, 4 residual blocks, u16-u8-c1).

    Returns the adversarial image clamp(x + ε·tanh(·), 0, 1), so the L∞ bound ε holds by construction.
    """

    def __init__(self, eps: float = 0.3) -> None:
        super().__init__()
        self.eps = eps

        def down(i: int, o: int, k: int, s: int, p: int) -> list[nn.Module]:
            return [
                nn.Conv2d(i, o, k, stride=s, padding=p, bias=False),
                nn.InstanceNorm2d(o, affine=True),
                nn.ReLU(),
            ]

        self.net = nn.Sequential(
            *down(1, 8, 3, 1, 1), *down(8, 16, 3, 2, 1), *down(16, 32, 3, 2, 1),
            *[_ResBlock(32) for _ in range(4)],
            nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.InstanceNorm2d(16, affine=True), nn.ReLU(),
            nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
            nn.Conv2d(8, 1, 3, padding=1),
        )  # fmt: skip

    def perturbation(self, x: torch.Tensor) -> torch.Tensor:
        return self.eps * torch.tanh(self.net(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.perturbation(x)).clamp(0.0, 1.0)


class AdvGANDiscriminator(nn.Module):
    """AdvGAN discriminator (C8-C16-C32 with LeakyReLU, then a logit)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.InstanceNorm2d(16, affine=True), nn.LeakyReLU(0.2),
            nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.InstanceNorm2d(32, affine=True), nn.LeakyReLU(0.2),
            nn.Flatten(), nn.Linear(32 * 3 * 3, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


MAGNET_STRUCTURES = {"I": (3, "average", 3), "II": (3,)}  # Meng & Chen 2017, MNIST (official train_defense.py)


def magnet_autoencoder(structure: tuple[int | str, ...]) -> nn.Sequential:
    """MagNet's denoising autoencoder: 3×3 "same" convolutions with sigmoid activations, `structure` down (ints are
    channels, "average" a 2×2 average pool), mirrored up (pools become 2× upsampling), then a sigmoid 3×3 conv to
    one channel."""
    layers: list[nn.Module] = []
    ch = 1
    for part, pool in [(p, nn.AvgPool2d(2)) for p in structure] + [(p, nn.Upsample(scale_factor=2))
                                                                   for p in reversed(structure)]:  # fmt: skip
        if isinstance(part, int):
            layers += [nn.Conv2d(ch, part, 3, padding=1), nn.Sigmoid()]
            ch = part
        else:
            layers.append(pool)
    return nn.Sequential(*layers, nn.Conv2d(ch, 1, 3, padding=1), nn.Sigmoid())


class MagNet(nn.Module):
    """MagNet (Meng & Chen 2017) for one dataset: the reformer is autoencoder I; the detectors are the
    reconstruction errors of autoencoder I (mean squared, p=2) and autoencoder II (mean absolute, p=1)."""

    def __init__(self) -> None:
        super().__init__()
        self.ae1 = magnet_autoencoder(MAGNET_STRUCTURES["I"])
        self.ae2 = magnet_autoencoder(MAGNET_STRUCTURES["II"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reformed image AE_I(x)."""
        return self.ae1(x)

    def scores(self, x: torch.Tensor, reformed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image detector scores: mean |x − AE_I(x)|² and mean |x − AE_II(x)| (`reformed`: AE_I(x) when the
        caller already has it)."""
        dims = tuple(range(1, x.dim()))
        reformed = self.ae1(x) if reformed is None else reformed
        return (x - reformed).pow(2).mean(dims), (x - self.ae2(x)).abs().mean(dims)


def build(kind: str, arch: str | None = None, **kwargs: object) -> nn.Module:
    """Build any registry network by kind: generator, critic, encoder, classifier (with arch), advgan, magnet."""
    if kind == "classifier":
        if arch is None:
            raise ValueError("a classifier needs an arch (A–E, S)")
        return build_classifier(arch)
    builders = {"generator": Generator, "critic": Critic, "encoder": Encoder, "advgan": AdvGANGenerator,
                "magnet": MagNet}  # fmt: skip
    if kind not in builders:
        raise ValueError(f"unknown network kind {kind!r}")
    return builders[kind](**kwargs)  # type: ignore[arg-type]
