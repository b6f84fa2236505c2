"""Shapes: a procedural 10-class, 32×32 RGB data set that a classifier must learn, not read off one pixel.

    python -m training.data --dataset shapes      # 50,000 training images (seed 0), 10,000 test images (seed 1)

Each image is one shape of its class — circle, triangle, square, star, cross, ring, crescent, heart, arrow or
hourglass — at a random size (radius 9–14 px), position (±4 px), rotation and aspect (0.8–1.25), filled with a
random colour or a two-colour gradient, over a random background: a flat colour, a linear gradient or smooth
colour noise, with one to three small distractor blobs and pixel noise. Colours, textures and backgrounds are
drawn independently of the class, so no colour or pixel tells the class; the shape's outline does. The mask is
drawn at 4× and box-filtered, so edges are anti-aliased. Deterministic: the same (n, seed) gives the same bytes.

The textures are smooth and the shape stands out from its background by at least 0.45 in one channel, so that the
outline, not the texture, dominates the pixel distance between two images: the Defense-GAN projection minimises
that distance. A first version with stripes, checkerboards and radii from 8 px lost the class in its
reconstructions (0.16 against 0.86 on the images; docs/experiments/generator_shapes_v1.jsonl).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SIDE = 32
CLASSES = ("circle", "triangle", "square", "star", "cross", "ring", "crescent", "heart", "arrow", "hourglass")
_SS = 4  # supersampling of the mask
Points = list[tuple[float, float]]


def _polygon(kind: str) -> list[Points]:
    """The unit outline(s) of a polygonal class, centred at 0, radius about 1."""
    if kind == "triangle":
        return [[(math.cos(a), math.sin(a)) for a in np.linspace(-math.pi / 2, 1.5 * math.pi, 3, endpoint=False)]]
    if kind == "square":
        return [[(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]]
    if kind == "star":
        radii = [1.0 if i % 2 == 0 else 0.42 for i in range(10)]
        angles = [-math.pi / 2 + i * math.pi / 5 for i in range(10)]
        return [[(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles, strict=True)]]
    if kind == "cross":
        a, b = 0.3, 0.95
        return [[(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                 (-a, -a)]]  # fmt: skip
    if kind == "heart":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x, y = 16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [list(zip((x / 17).tolist(), (y / 17 + 0.1).tolist(), strict=True))]
    if kind == "arrow":
        return [[(-0.95, -0.22), (0.15, -0.22), (0.15, -0.6), (0.95, 0.0), (0.15, 0.6), (0.15, 0.22), (-0.95, 0.22)]]
    if kind == "hourglass":
        return [[(-0.75, -0.9), (0.75, -0.9), (0.08, 0.0), (-0.08, 0.0)], [(-0.08, 0.0), (0.08, 0.0), (0.75, 0.9),
                                                                             (-0.75, 0.9)]]  # fmt: skip
    raise ValueError(kind)


def _mask(kind: str, rng: np.random.Generator) -> np.ndarray:
    """The shape's coverage in [0, 1], 32×32, at a random size, place, rotation and aspect."""
    big = SIDE * _SS
    r = rng.uniform(9, 14) * _SS
    cx, cy = (SIDE / 2 + rng.uniform(-4, 4, 2)) * _SS
    rot, aspect = rng.uniform(0, 2 * math.pi), math.exp(rng.uniform(-0.22, 0.22))
    c, s = math.cos(rot), math.sin(rot)

    def place(pts: Points) -> Points:
        return [(cx + r * (c * x * aspect - s * y / aspect), cy + r * (s * x * aspect + c * y / aspect))
                for x, y in pts]  # fmt: skip

    im = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(im)
    if kind in ("circle", "ring", "crescent"):
        rx, ry = r * aspect, r / aspect
        d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        if kind == "ring":
            k = rng.uniform(0.5, 0.65)
            d.ellipse([cx - k * rx, cy - k * ry, cx + k * rx, cy + k * ry], fill=0)
        elif kind == "crescent":
            ox, oy = 0.55 * rx * c, 0.55 * ry * s
            d.ellipse([cx + ox - 0.9 * rx, cy + oy - 0.9 * ry, cx + ox + 0.9 * rx, cy + oy + 0.9 * ry], fill=0)
    else:
        for poly in _polygon(kind):
            d.polygon(place(poly), fill=255)
    small = np.asarray(im, np.float32).reshape(SIDE, _SS, SIDE, _SS).mean(axis=(1, 3))
    return small / 255.0


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 1, 3).astype(np.float32)


def _texture(rng: np.random.Generator, p: tuple[float, float, float]) -> np.ndarray:
    """A 32×32×3 texture: a flat colour, a linear two-colour gradient or smooth colour noise, with probabilities p."""
    kind = rng.choice(3, p=p)
    if kind == 0:
        return np.broadcast_to(_colour(rng), (SIDE, SIDE, 3)).copy()
    if kind == 2:
        grid = rng.uniform(0, 1, (3, 3, 3)).astype(np.float32)
        return np.asarray(Image.fromarray((grid * 255).astype(np.uint8)).resize((SIDE, SIDE), Image.BICUBIC),
                          np.float32) / 255.0  # fmt: skip
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / (SIDE - 1)
    ang = rng.uniform(0, 2 * math.pi)
    u = (xx - 0.5) * math.cos(ang) + (yy - 0.5) * math.sin(ang)
    t = ((u - u.min()) / (np.ptp(u) + 1e-6))[..., None]
    return _colour(rng) * (1 - t) + _colour(rng) * t


def _distractors(img: np.ndarray, rng: np.random.Generator) -> None:
    """One to three small blobs (radius 1–2 px) of random colours, anywhere."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx, r = rng.uniform(0, SIDE, 2).tolist() + [rng.uniform(1, 2.2)]
        m = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)[..., None]
        img[:] = np.where(m, _colour(rng), img)


def render(label: int, rng: np.random.Generator) -> np.ndarray:
    """One uint8 32×32×3 image of class `label`."""
    bg = _texture(rng, (0.4, 0.3, 0.3))
    fill = _texture(rng, (0.6, 0.4, 0.0))
    # the shape must stand out: push the fill away from the background's mean colour where they are close
    gap = fill.mean((0, 1)) - bg.mean((0, 1))
    if np.abs(gap).max() < 0.45:
        fill = np.clip(fill + np.sign(gap + 1e-3) * 0.5, 0, 1)
    alpha = _mask(CLASSES[label], rng)[..., None]
    img = bg * (1 - alpha) + fill * alpha
    _distractors(img, rng)
    img = img + rng.normal(0, rng.uniform(0, 0.04), img.shape)
    return np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)


def generate(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n images (uint8 N×32×32×3) and labels (uint8 N), classes balanced and shuffled; deterministic in seed."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.uint8)
    images = np.empty((n, SIDE, SIDE, 3), np.uint8)
    for i, y in enumerate(labels):
        images[i] = render(int(y), rng)
    return images, labels
