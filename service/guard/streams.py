"""Query streams to evaluate a stateful detector on: benign clients with realistic re-sends, and Square attacks.

    benign_stream(images, clients, rng)      → [(client, image C×H×W, kind)], clients' queries interleaved
    square_queries(image, n, rng, loss)      → the n queries a Square L∞ attack sends for one image

Used by tests/test_guard.py and bench/guard.py (and any offline comparison of detectors on the same streams).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

RESEND_KINDS = ("exact", "jpeg", "crop", "bright")


def to_pil(a: np.ndarray) -> Image.Image:
    """C×H×W in [0, 1] → an 8-bit PIL image (L or RGB)."""
    u8 = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(u8[0] if len(u8) == 1 else np.moveaxis(u8, 0, -1))


def from_pil(im: Image.Image) -> np.ndarray:
    a = np.asarray(im, dtype=np.float32) / 255
    return a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)


def resend(a: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A benign re-send of C×H×W image `a`: exact, JPEG quality 75, cropped by 1–2 px and resized back, or +10 %."""
    if kind == "exact":
        return a.copy()
    if kind == "bright":
        return np.clip(a * 1.1, 0, 1)
    im = to_pil(a)
    if kind == "jpeg":
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=75)
        return from_pil(Image.open(io.BytesIO(buf.getvalue())))
    if kind == "crop":
        c, (w, h) = int(rng.integers(1, 3)), im.size
        return from_pil(im.crop((c, c, w - c, h - c)).resize((w, h), Image.Resampling.BILINEAR))
    raise ValueError(f"unknown re-send kind {kind!r}")


def benign_stream(images: np.ndarray, clients: int, rng: np.random.Generator,
                  resend_fraction: float = 0.25) -> list[tuple[str, np.ndarray, str]]:  # fmt: skip
    """Each client sends its own share of `images` (N×C×H×W, all different) and re-sends `resend_fraction` of them
    later, each as one of RESEND_KINDS; the clients' sequences are interleaved at random."""
    per, seqs = len(images) // clients, []
    for c in range(clients):
        own = list(images[c * per : (c + 1) * per])  # the same objects in `seq`, found by identity below
        seq: list[tuple[np.ndarray, str]] = [(a, "original") for a in own]
        for i in rng.choice(per, int(round(resend_fraction * per)), replace=False):
            kind = RESEND_KINDS[int(rng.integers(len(RESEND_KINDS)))]
            at = next(j for j, (a, _) in enumerate(seq) if a is own[i])  # after the original
            seq.insert(int(rng.integers(at + 1, len(seq) + 1)), (resend(own[i], kind, rng), kind))
        seqs.append(seq)
    order = np.concatenate([[c] * len(s) for c, s in enumerate(seqs)])
    rng.shuffle(order)
    pos = [0] * clients
    out = []
    for c in order:
        a, kind = seqs[c][pos[c]]
        pos[c] += 1
        out.append((f"benign-{c}", a, kind))
    return out


def square_p(it: int, n_iters: int, p_init: float) -> float:
    """Square's schedule of the patch's share of the image (Andriushchenko et al. 2020, rescaled to 10,000 its)."""
    i = int(it / n_iters * 10_000)
    for limit, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):  # fmt: skip
        if i <= limit:
            return p_init / div
    return p_init / 512


def square_queries(x: np.ndarray, n: int, rng: np.random.Generator, loss: Callable[[np.ndarray], float] | None = None,
                   eps: float = 0.3, p_init: float = 0.05, n_iters: int = 10_000) -> list[np.ndarray]:  # fmt: skip
    """The first n queries of Square L∞ (Andriushchenko et al. 2020) on C×H×W image x: vertical-stripe start, then
    each query is the best point so far with one square of side √(p·H·W) set to x ± eps (one sign per channel),
    kept when `loss` (e.g. the margin of the true class; None: a fair coin) goes down."""
    c, h, w = x.shape
    best = np.clip(x + eps * rng.choice([-1.0, 1.0], size=(c, 1, w)), 0, 1).astype(np.float32)
    best_loss = loss(best) if loss else 0.0
    queries = [best]
    for it in range(1, n):
        s = max(int(round(np.sqrt(square_p(it, n_iters, p_init) * h * w))), 1)
        s = min(s, h - 1, w - 1)
        r, q = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        new = best.copy()
        for _ in range(100):  # the new square must change the current point (as in the authors' code)
            patch = np.clip(x[:, r : r + s, q : q + s] + eps * rng.choice([-1.0, 1.0], size=(c, 1, 1)), 0, 1)
            if np.abs(patch - best[:, r : r + s, q : q + s]).sum() > 1e-7:
                break
        new[:, r : r + s, q : q + s] = patch
        queries.append(new)
        value = loss(new) if loss else float(rng.random()) - 0.5
        if value < best_loss:
            best, best_loss = new, value if loss else best_loss
    return queries
