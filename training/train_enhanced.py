"""Enhanced Invert-and-Classify (Jalal, Ilyas, Daskalakis & Dimakis, "The Robust Manifold Defense"): train a
classifier adversarially on the generator's manifold, shipped as models/<ds>/classifier_<arch>_enhanced.

    python -m training.train_enhanced --dataset mnist --iters 2000 --threads 2
    python -m training.train_enhanced --dataset mnist --data slice --iters 5 --batch 16 --no-ship   # smoke test

The defended pipeline classifies G(z*(x)), so the classifier sees points of G's range, and an attacker who knows
the defense looks for a nearby range point it misreads (the latent "overpowered" attack). Each batch (x, y) of
real training images is inverted, z₀ = E(x) (the shipped encoder; `--invert-steps` of projection without one),
and the classifier is trained on the mean of four cross-entropies, all with the label y:
  1. x itself (it stays usable without the projection),
  2. G(z₀), the clean manifold point,
  3. G(z₀ + δ) with δ found by `--latent-steps` of L2 PGD in latent space, ‖δ‖₂ ≤ `--latent-eps`·σ·√d
     (σ: the generator's latent prior std, d its dimension): the classifier's worst nearby range point,
  4. L∞ PGD (`--img-eps`, `--img-steps`) in image space around G(z₀ + δ): the off-manifold residual a projection
     leaves.
Starts from the shipped classifier_<arch> when present (`--init`), Adam `--lr`. Ships safetensors + ONNX and a
manifest entry with clean test accuracy and on-manifold robustness figures measured on the test slice.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.attacks import pgd
from service.nets import build_classifier
from service.purify import ProjectionConfig, project
from service.registry import Registry
from training import data
from training.common import MODELS_DIR, Progress, setup
from training.train_classifier import accuracy, ship_classifier


def invert(x: torch.Tensor, G: nn.Module, E: nn.Module | None, steps: int) -> torch.Tensor:
    """z₀ for x: E(x), or a short random-start projection when no encoder is shipped."""
    if E is not None:
        with torch.no_grad():
            return E(x)
    return project(x, G, ProjectionConfig(steps=steps, restarts=1), seed=None).z


def latent_adversary(clf: nn.Module, G: nn.Module, z0: torch.Tensor, y: torch.Tensor, radius: float, steps: int,
                     gen: torch.Generator) -> torch.Tensor:  # fmt: skip
    """z₀ + δ maximising CE(clf(G(z₀ + δ)), y) over ‖δ‖₂ ≤ radius (L2 PGD from a random point of the ball)."""
    if steps == 0 or radius == 0:
        return z0
    n, d = z0.shape
    delta = torch.randn(z0.shape, generator=gen).to(z0)
    delta = delta / delta.norm(dim=1, keepdim=True) * radius * torch.rand(n, 1, generator=gen).to(z0)
    alpha = 2.5 * radius / steps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(clf(G(z0 + delta)), y)
        (g,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta + alpha * g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
            delta = delta * (radius / delta.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
    return (z0 + delta).detach()


def load_arrays(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    if args.data == "slice":
        xs, ys = data.load_slice(args.dataset)
    else:
        a = data.load(args.dataset)
        xs, ys = a["x_train"], a["y_train"]
    return torch.from_numpy(data.to_float(xs)), torch.from_numpy(ys.astype(np.int64))


def train(args: argparse.Namespace) -> tuple[nn.Module, list[float]]:
    """Train and return (classifier in eval mode, per-iteration loss history)."""
    device = setup(args.seed, args.threads)
    reg = Registry(args.models_dir)
    G = reg.generator(args.dataset, device)
    E = reg.encoder(args.dataset, device)
    sigma = float(reg.get(f"{args.dataset}/generator").raw.get("latent_std", 1.0))
    radius = args.latent_eps * sigma * math.sqrt(G.latent_dim)
    init_key = f"{args.dataset}/{args.init}" if args.init != "scratch" else None
    clf = build_classifier(args.arch).to(device)
    if init_key and reg.has(init_key):
        clf.load_state_dict(reg.module(init_key).state_dict())
        print(f"starting from {init_key}")
    else:
        print("starting from scratch")
    for p in clf.parameters():
        p.requires_grad_(True)
    x_tr, y_tr = load_arrays(args)
    x_tr, y_tr = x_tr.to(device), y_tr.to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    progress = Progress(args.iters, every=args.log_every)
    history: list[float] = []
    t0 = time.time()
    for it in range(1, args.iters + 1):
        idx = torch.randint(0, len(x_tr), (args.batch,), generator=gen).to(device)
        x, y = x_tr[idx], y_tr[idx]
        clf.eval()  # adversaries see the deterministic network (no dropout)
        z0 = invert(x, G, E, args.invert_steps)
        z_adv = latent_adversary(clf, G, z0, y, radius, args.latent_steps, gen)
        with torch.no_grad():
            on_manifold, latent_adv = G(z0), G(z_adv)
        img_adv = latent_adv
        if args.img_steps > 0 and args.img_eps > 0:
            alpha = args.img_alpha or 2.5 * args.img_eps / args.img_steps
            img_adv = pgd(clf, latent_adv, y, eps=args.img_eps, alpha=alpha, steps=args.img_steps, generator=gen)
        clf.train()
        inputs = torch.cat([x, on_manifold, latent_adv, img_adv])
        losses = F.cross_entropy(clf(inputs), y.repeat(4), reduction="none").view(4, -1).mean(1)
        loss = losses.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        progress(it, loss=loss.item(), real=losses[0].item(), manifold=losses[1].item(), latent=losses[2].item(),
                 image=losses[3].item())  # fmt: skip
    print(f"trained {args.iters} iterations in {(time.time() - t0) / 60:.1f} min "
          f"({(time.time() - t0) / max(args.iters, 1):.2f} s/it)", flush=True)  # fmt: skip
    clf = clf.cpu().eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    return clf, history


def manifold_metrics(args: argparse.Namespace, clf: nn.Module, n: int = 200) -> dict:
    """On the first n slice images: accuracy on x, on G(z₀), under the latent adversary and under both adversaries."""
    reg = Registry(args.models_dir)
    G, E = reg.generator(args.dataset), reg.encoder(args.dataset)
    sigma = float(reg.get(f"{args.dataset}/generator").raw.get("latent_std", 1.0))
    xs, ys = data.load_slice(args.dataset)
    x, y = torch.from_numpy(data.to_float(xs[:n])), torch.from_numpy(ys[:n].astype(np.int64))
    gen = torch.Generator().manual_seed(args.seed + 1)
    z0 = invert(x, G, E, args.invert_steps)
    z_adv = latent_adversary(clf, G, z0, y, args.latent_eps * sigma * math.sqrt(G.latent_dim), args.latent_steps, gen)
    with torch.no_grad():
        lat = G(z_adv)
    both = pgd(clf, lat, y, eps=args.img_eps, alpha=args.img_alpha or 2.5 * args.img_eps / max(args.img_steps, 1),
               steps=args.img_steps, generator=gen)  # fmt: skip
    with torch.no_grad():
        g0 = G(z0)
    return {f"slice{n}_acc_{k}": round(accuracy(clf, v, y), 4)
            for k, v in (("x", x), ("G_z0", g0), ("latent_adv", lat), ("latent_image_adv", both))}  # fmt: skip


def ship(args: argparse.Namespace, clf: nn.Module) -> dict:
    root = Path(args.models_dir)
    gen_sha = Registry(root, verify=False).get(f"{args.dataset}/generator").files["weights"]["sha256"]
    entry = {
        "arch": args.arch.upper(), "generator_sha256": gen_sha, "defense": "enhanced-invert-classify",
        "training": {"method": "enhanced-inc", "threat": {"norm": "linf", "eps": args.img_eps},
                     **{k: getattr(args, k) for k in ("iters", "batch", "lr", "latent_eps", "latent_steps", "img_eps",
                                                      "img_steps", "img_alpha", "invert_steps", "init", "data",
                                                      "seed")}},
    }  # fmt: skip
    return ship_classifier(clf, args.dataset, f"classifier_{args.arch.upper()}_enhanced", entry,
                           manifold_metrics(args, clf), root)  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=data.DATASETS, required=True)
    p.add_argument("--arch", default="A", choices=list("ABCDE"))
    p.add_argument("--init", default="classifier_A", help="shipped classifier to start from, or 'scratch'")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--latent-eps", type=float, default=0.15, help="latent L2 radius in units of σ·√d")
    p.add_argument("--latent-steps", type=int, default=5)
    p.add_argument("--img-eps", type=float, default=0.3)
    p.add_argument("--img-steps", type=int, default=7)
    p.add_argument("--img-alpha", type=float, default=None, help="image PGD step (default 2.5·ε/steps)")
    p.add_argument("--invert-steps", type=int, default=25, help="projection steps when no encoder is shipped")
    p.add_argument(
        "--data", choices=["train", "slice"], default="train", help="slice: the committed test slice (smoke)"
    )
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--no-ship", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse()
    model, _ = train(a)
    if not a.no_ship:
        ship(a, model)
