"""Network architectures shared by serving and training.

Every image network takes and returns tensors of shape N×C×H×W with pixel values in [0, 1], built for one
dataset's shape (`service.datasets.DatasetSpec.shape`): 1×28×28 gets exactly the layouts of Defense-GAN
(Samangouei et al., 2018, appendix and official code) and AdvGAN (Xiao et al., 2018); 32×32 and 64×64 (gray or
colour) get the same layouts with DCGAN's sizing (Radford et al., 2016: 4×4 base, one stride-2 layer per doubling)
and the channels of the data. The registry builds them by name from `models/manifest.json`.
"""

from __future__ import annotations

import torch
from torch import nn

LATENT_DIM = 128
IMAGE_SHAPE = (1, 28, 28)  # MNIST's, the default of every builder
Shape = tuple[int, int, int]


def doublings(side: int) -> int:
    """Stride-2 layers between a 4×4 base and a side×side image: 3 for 28 (4→7→14→28, cropped) and 32, 4 for 64."""
    if side not in (28, 32, 64):
        raise ValueError(f"networks are built for sides 28, 32 and 64, not {side}")
    return 4 if side == 64 else 3


def flat_features(layers: nn.Sequential, shape: Shape) -> int:
    """The feature count `layers` flatten an image of `shape` to (a dry run on one zero image)."""
    with torch.no_grad():
        return int(layers(torch.zeros(1, *shape)).numel())


def _up(i: int, o: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(i, o, 5, stride=2, padding=2, output_padding=1)


def _norm(ch: int, on: bool) -> nn.Module:
    """DCGAN's batch norm (Radford et al. 2016: after every layer but G's output and D's input) where `on`."""
    return nn.BatchNorm2d(ch) if on else nn.Identity()


class Generator(nn.Module):
    """Defense-GAN's generator: z (N×128) → image (N×C×H×W) in [0, 1].

    MNIST (1×28×28): Linear 128→4·4·256, ReLU, ConvT 5×5 s2 →128 (8×8 cropped to 7×7), ReLU, ConvT 5×5 s2 →64
    (14×14), ReLU, ConvT 5×5 s2 →1 (28×28), sigmoid. No batch norm (the official config sets USE_BN: False).
    32×32: the same without the crop, with C output channels and, as the DCGAN authors configure it, batch norm
    after the linear layer and every ConvT but the last; 64×64: a 4×4·512 base and one more ConvT (`up0`).
    """

    def __init__(self, latent_dim: int = LATENT_DIM, width: int = 64, shape: Shape = IMAGE_SHAPE) -> None:
        super().__init__()
        self.latent_dim, self.width, self.shape = latent_dim, width, tuple(shape)
        k, bn = doublings(shape[1]), shape[1] != 28
        base = 2 ** (k - 1) * width  # channels of the 4×4 base
        self.fc = nn.Linear(latent_dim, 4 * 4 * base)
        self.bn_fc = _norm(base, bn)
        if k == 4:
            self.up0, self.bn0 = _up(8 * width, 4 * width), _norm(4 * width, bn)
        self.up1, self.bn1 = _up(4 * width, 2 * width), _norm(2 * width, bn)
        self.up2, self.bn2 = _up(2 * width, width), _norm(width, bn)
        self.up3 = _up(width, shape[0])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn_fc(self.fc(z).view(-1, self.fc.out_features // 16, 4, 4)))
        if hasattr(self, "up0"):
            h = torch.relu(self.bn0(self.up0(h)))
        h = torch.relu(self.bn1(self.up1(h)))
        if self.shape[1] == 28:
            h = h[:, :, :7, :7]
        h = torch.relu(self.bn2(self.up2(h)))
        return torch.sigmoid(self.up3(h))


def _conv_trunk(width: int, shape: Shape = IMAGE_SHAPE, norm: bool = False) -> list[nn.Module]:
    """Conv 5×5 s2 C→w→2w→4w (→8w for 64×64) with LeakyReLU 0.2, flattened (28×28 → 4·4·4w): the critic's and
    encoder's body (`norm`: DCGAN's batch norm after every convolution but the first)."""
    layers: list[nn.Module] = []
    ch = shape[0]
    for k in range(doublings(shape[1])):
        layers += [nn.Conv2d(ch, 2**k * width, 5, stride=2, padding=2)]
        layers += [nn.BatchNorm2d(2**k * width)] if norm and k > 0 else []
        layers += [nn.LeakyReLU(0.2)]
        ch = 2**k * width
    return [*layers, nn.Flatten()]


def _trunk_features(width: int, shape: Shape) -> int:
    return 4 * 4 * 2 ** (doublings(shape[1]) - 1) * width


class Critic(nn.Module):
    """Defense-GAN critic: Conv 5×5 s2 64→128→256 with LeakyReLU 0.2, Linear → 1 (a score, no sigmoid). `norm`:
    DCGAN's batch norm, for a DCGAN discriminator (default: for the sizes other than MNIST's); a WGAN-GP critic
    goes without (its gradient penalty is per image)."""

    def __init__(self, width: int = 64, shape: Shape = IMAGE_SHAPE, norm: bool | None = None) -> None:
        super().__init__()
        trunk = _conv_trunk(width, shape, norm=shape[1] != 28 if norm is None else norm)
        self.body = nn.Sequential(*trunk, nn.Linear(_trunk_features(width, shape), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(1)


class Encoder(nn.Module):
    """Image → latent code, same trunk as the critic (Defense-GAN's MnistEncoder) with a linear head.

    The head is left unbounded (Defense-GAN's used tanh, which cannot reach a N(0, I) prior's typical codes).
    """

    def __init__(self, latent_dim: int = LATENT_DIM, width: int = 64, shape: Shape = IMAGE_SHAPE) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_trunk(width, shape), nn.Linear(_trunk_features(width, shape), latent_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _head(features: nn.Sequential, shape: Shape, *head: nn.Module, classes: int = 10) -> nn.Sequential:
    """`features`, then the layers of `head` with the first Linear's input sized to what `features` flatten an
    image of `shape` to, and the last Linear's output to `classes`."""
    n = flat_features(features, shape)
    layers = list(head)
    first = next(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
    layers[first] = nn.Linear(n, layers[first].out_features)
    last = max(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
    layers[last] = nn.Linear(layers[last].in_features, classes)
    return nn.Sequential(*features, *layers)


def _conv_pair_fc(first_channels: int, first_kernel: int, shape: Shape, classes: int) -> nn.Sequential:
    """Conv{first} {k}×{k} same, ReLU, Conv64 5×5 s2 valid, ReLU, Dropout .25, FC128, ReLU, Dropout .5, FC10."""
    features = nn.Sequential(
        nn.Conv2d(shape[0], first_channels, first_kernel, padding=first_kernel // 2), nn.ReLU(),
        nn.Conv2d(first_channels, 64, 5, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Dropout(0.25),
    )  # fmt: skip
    return _head(features, shape, nn.Linear(1, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 1), classes=classes)


def classifier_a(shape: Shape = IMAGE_SHAPE, classes: int = 10) -> nn.Sequential:
    """Model A: Conv64 5×5 same, ReLU, Conv64 5×5 s2 valid, ReLU, Dropout .25, FC128, ReLU, Dropout .5, FC10."""
    return _conv_pair_fc(64, 5, shape, classes)


def classifier_b(shape: Shape = IMAGE_SHAPE, classes: int = 10) -> nn.Sequential:
    """Model B: Dropout .2, Conv64 8×8 s2 same, ReLU, Conv128 6×6 s2 valid, ReLU, Conv128 5×5 valid, ReLU,
    Dropout .5, FC10."""
    features = nn.Sequential(
        nn.Dropout(0.2),
        nn.Conv2d(shape[0], 64, 8, stride=2, padding=3), nn.ReLU(),
        nn.Conv2d(64, 128, 6, stride=2), nn.ReLU(),
        nn.Conv2d(128, 128, 5), nn.ReLU(),
        nn.Flatten(), nn.Dropout(0.5),
    )  # fmt: skip
    return _head(features, shape, nn.Linear(1, classes), classes=classes)


def classifier_c(shape: Shape = IMAGE_SHAPE, classes: int = 10) -> nn.Sequential:
    """Model C: Conv128 3×3 same, ReLU, Conv64 5×5 s2 valid, ReLU, Dropout .25, FC128, ReLU, Dropout .5, FC10."""
    return _conv_pair_fc(128, 3, shape, classes)


def classifier_d(shape: Shape = IMAGE_SHAPE, classes: int = 10) -> nn.Sequential:
    """Model D: FC200, ReLU, Dropout .5, FC200, ReLU, FC10."""
    return _head(nn.Sequential(nn.Flatten()), shape,
                 nn.Linear(1, 200), nn.ReLU(), nn.Dropout(0.5), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 1),
                 classes=classes)  # fmt: skip


def classifier_e(shape: Shape = IMAGE_SHAPE, classes: int = 10) -> nn.Sequential:
    """Model E (the black-box substitute): FC200, ReLU, FC200, ReLU, FC10."""
    return _head(nn.Sequential(nn.Flatten()), shape,
                 nn.Linear(1, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 1),
                 classes=classes)  # fmt: skip


def classifier_s(shape: Shape = IMAGE_SHAPE, classes: int = 10) -> nn.Sequential:
    """Model S: TRADES' MNIST SmallCNN (Zhang et al. 2019, official code), the adversarially trained classifiers'
    network: Conv32 3×3, ReLU, Conv32 3×3, ReLU, MaxPool 2, Conv64 3×3, ReLU, Conv64 3×3, ReLU, MaxPool 2,
    FC200, ReLU, Dropout .5, FC200, ReLU, FC10 (all convolutions valid). A third of A's cost per attack step."""
    features = nn.Sequential(
        nn.Conv2d(shape[0], 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
    )  # fmt: skip
    return _head(features, shape, nn.Linear(1, 200), nn.ReLU(), nn.Dropout(0.5), nn.Linear(200, 200), nn.ReLU(),
                 nn.Linear(200, 1), classes=classes)  # fmt: skip


CLASSIFIERS = {"A": classifier_a, "B": classifier_b, "C": classifier_c, "D": classifier_d, "E": classifier_e,
               "S": classifier_s}  # fmt: skip


def build_classifier(arch: str, shape: Shape = IMAGE_SHAPE, classes: int = 10) -> nn.Sequential:
    """Build classifier `arch` (one of A–E, S) for images of `shape` with fresh weights; outputs `classes` logits."""
    try:
        make = CLASSIFIERS[arch.upper()]
    except KeyError:
        raise ValueError(f"unknown classifier architecture {arch!r}; expected one of {sorted(CLASSIFIERS)}") from None
    return make(tuple(shape), classes)  # type: ignore[arg-type]


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

    def __init__(self, eps: float = 0.3, shape: Shape = IMAGE_SHAPE) -> None:
        super().__init__()
        self.eps = eps
        c = shape[0]

        def down(i: int, o: int, k: int, s: int, p: int) -> list[nn.Module]:
            return [
                nn.Conv2d(i, o, k, stride=s, padding=p, bias=False),
                nn.InstanceNorm2d(o, affine=True),
                nn.ReLU(),
            ]

        self.net = nn.Sequential(
            *down(c, 8, 3, 1, 1), *down(8, 16, 3, 2, 1), *down(16, 32, 3, 2, 1),
            *[_ResBlock(32) for _ in range(4)],
            nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.InstanceNorm2d(16, affine=True), nn.ReLU(),
            nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.InstanceNorm2d(8, affine=True), nn.ReLU(),
            nn.Conv2d(8, c, 3, padding=1),
        )  # fmt: skip

    def perturbation(self, x: torch.Tensor) -> torch.Tensor:
        return self.eps * torch.tanh(self.net(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.perturbation(x)).clamp(0.0, 1.0)


class AdvGANDiscriminator(nn.Module):
    """AdvGAN discriminator (C8-C16-C32 with LeakyReLU, then a logit)."""

    def __init__(self, shape: Shape = IMAGE_SHAPE) -> None:
        super().__init__()
        features = nn.Sequential(
            nn.Conv2d(shape[0], 8, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.InstanceNorm2d(16, affine=True), nn.LeakyReLU(0.2),
            nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.InstanceNorm2d(32, affine=True), nn.LeakyReLU(0.2),
            nn.Flatten(),
        )  # fmt: skip
        self.net = nn.Sequential(*features, nn.Linear(flat_features(features, shape), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


MAGNET_STRUCTURES = {"I": (3, "average", 3), "II": (3,)}  # Meng & Chen 2017, MNIST (official train_defense.py)


def magnet_autoencoder(structure: tuple[int | str, ...], channels: int = 1) -> nn.Sequential:
    """MagNet's denoising autoencoder: 3×3 "same" convolutions with sigmoid activations, `structure` down (ints are
    channels, "average" a 2×2 average pool), mirrored up (pools become 2× upsampling), then a sigmoid 3×3 conv to
    the image's channels."""
    layers: list[nn.Module] = []
    ch = channels
    for part, pool in [(p, nn.AvgPool2d(2)) for p in structure] + [(p, nn.Upsample(scale_factor=2))
                                                                   for p in reversed(structure)]:  # fmt: skip
        if isinstance(part, int):
            layers += [nn.Conv2d(ch, part, 3, padding=1), nn.Sigmoid()]
            ch = part
        else:
            layers.append(pool)
    return nn.Sequential(*layers, nn.Conv2d(ch, channels, 3, padding=1), nn.Sigmoid())


class MagNet(nn.Module):
    """MagNet (Meng & Chen 2017) for one dataset: the reformer is autoencoder I; the detectors are the
    reconstruction errors of autoencoder I (mean squared, p=2) and autoencoder II (mean absolute, p=1)."""

    def __init__(self, shape: Shape = IMAGE_SHAPE) -> None:
        super().__init__()
        self.ae1 = magnet_autoencoder(MAGNET_STRUCTURES["I"], shape[0])
        self.ae2 = magnet_autoencoder(MAGNET_STRUCTURES["II"], shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reformed image AE_I(x)."""
        return self.ae1(x)

    def scores(self, x: torch.Tensor, reformed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image detector scores: mean |x − AE_I(x)|² and mean |x − AE_II(x)| (`reformed`: AE_I(x) when the
        caller already has it)."""
        dims = tuple(range(1, x.dim()))
        reformed = self.ae1(x) if reformed is None else reformed
        return (x - reformed).pow(2).mean(dims), (x - self.ae2(x)).abs().mean(dims)


def build(kind: str, arch: str | None = None, shape: Shape = IMAGE_SHAPE, classes: int = 10,
          **kwargs: object) -> nn.Module:  # fmt: skip
    """Build any registry network by kind for images of `shape`: generator, critic, encoder, classifier (with arch
    and `classes`), advgan, magnet."""
    if kind == "classifier":
        if arch is None:
            raise ValueError("a classifier needs an arch (A–E, S)")
        return build_classifier(arch, shape, classes)
    builders = {"generator": Generator, "critic": Critic, "encoder": Encoder, "advgan": AdvGANGenerator,
                "magnet": MagNet}  # fmt: skip
    if kind not in builders:
        raise ValueError(f"unknown network kind {kind!r}")
    return builders[kind](shape=tuple(shape), **kwargs)  # type: ignore[arg-type]
