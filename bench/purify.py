"""Benchmark of the purification engine (issue 3). Prints ratios measured side by side in one run.

    python bench/purify.py                      # all sections on the shipped MNIST models
    python bench/purify.py --sections speed,flops --batches 1,16,64

Sections
  speed   engine (all N·R latents in one tensor, frozen weights) vs a straightforward reading of the paper (a
          Python loop over images and restarts, weights requiring grad), L, R as given, per batch size: img/s and
          the ratio. The naive loop's cost per image does not depend on the batch, so it is timed on
          --naive-images images and reported per image.
  flops   achieved FLOP/s of one projection step (generator forward + backward to z, counted by torch's
          FlopCounterMode) over this machine's dense float32 matmul FLOP/s (2048² and 4096²).
  warm    Invert-and-Classify accuracy on the slice, clean and under FGSM ε=0.3, for random init at L=200, R=10
          and for encoder warm starts at several (L, R): the smallest L·R that matches, and the ratio.
  detect  ROC AUC of the reconstruction MSE, clean vs FGSM ε=0.3, per dataset.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from service.attacks import fgsm
from service.nets import Generator
from service.purify import ProjectionConfig, project, roc_auc
from service.registry import Registry
from training import data

MODELS = Path(__file__).resolve().parent.parent / "models"


def naive_project(x: torch.Tensor, G: Generator, cfg: ProjectionConfig) -> torch.Tensor:
    """The paper read literally: for each image, for each restart, its own optimisation; weights require grad."""
    out = []
    for i in range(len(x)):
        best, best_mse = None, float("inf")
        for _ in range(cfg.restarts):
            z = (torch.randn(1, G.latent_dim) / G.latent_dim**0.5).requires_grad_(True)
            opt = torch.optim.SGD([z], lr=cfg.lr, momentum=cfg.momentum)
            for step in range(cfg.steps):
                if step == int(0.8 * cfg.steps + 0.999):
                    opt.param_groups[0]["lr"] = cfg.lr * cfg.decay
                opt.zero_grad()
                G.zero_grad()
                loss = (G(z) - x[i : i + 1]).pow(2).mean()
                loss.backward()
                opt.step()
            with torch.no_grad():
                rec = G(z)
                mse = float((rec - x[i : i + 1]).pow(2).mean())
            if mse < best_mse:
                best, best_mse = rec, mse
        out.append(best)
    return torch.cat(out)


def sync() -> None:
    """Wait for queued CUDA work (timings of asynchronous kernels); nothing on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, repeat: int = 1) -> float:  # type: ignore[no-untyped-def]
    """Median wall seconds of fn() over `repeat` runs, queued device work included."""
    times = []
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def section_speed(reg: Registry, args: argparse.Namespace, x: torch.Tensor) -> None:
    G = reg.generator("mnist")
    cfg = ProjectionConfig(steps=args.steps, restarts=args.restarts)
    G_naive = Generator()
    G_naive.load_state_dict(G.state_dict())
    G_naive.train()  # weights require grad, as in a straightforward port
    k = args.naive_images
    t_naive = timed(lambda: naive_project(x[:k], G_naive, cfg))
    naive_ips = k / t_naive
    print(f"\n## speed: L={cfg.steps}, R={cfg.restarts}, {torch.get_num_threads()} threads")
    print("| batch | engine img/s | naive img/s | ratio |\n|---|---|---|---|")
    for b in args.batches:
        t = timed(lambda b=b: project(x[:b], G, cfg, seed=0))
        print(f"| {b} | {b / t:.3f} | {naive_ips:.3f} | {b / t / naive_ips:.1f}× |", flush=True)


def matmul_flops(n: int, device: torch.device | str = "cpu") -> float:
    """Dense n×n float32 matmul FLOP/s on `device` (under the current TF32 setting)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    t = timed(lambda: a @ b, repeat=5)
    return 2 * n**3 / t


def step_flops(G: Generator, z: torch.Tensor, target: torch.Tensor) -> int:
    """FLOPs of one projection step on these latents: generator forward + backward to z."""
    with FlopCounterMode(display=False) as fc:  # counted with .backward(): the counter cannot hook autograd.grad
        (G(z) - target).pow(2).mean(dim=(1, 2, 3)).sum().backward()
    return fc.get_total_flops()


def measure_flops(G: Generator, x: torch.Tensor, restarts: int, peak_sizes: tuple[int, ...] = (2048, 4096),
                  steps: int = 20) -> dict[str, float]:  # fmt: skip
    """One step on all of x's N·R latents (on G's device): its FLOPs, achieved FLOP/s, the dense matmul peak."""
    device = next(G.parameters()).device
    z = torch.randn(len(x) * restarts, G.latent_dim, device=device, requires_grad=True)
    target = x.to(device).repeat_interleave(restarts, 0)

    def step() -> None:
        loss = (G(z) - target).pow(2).mean(dim=(1, 2, 3)).sum()
        torch.autograd.grad(loss, z)

    flops = step_flops(G, z, target)
    step()
    t = timed(lambda: [step() for _ in range(steps)]) / steps
    peak = max(matmul_flops(n, device) for n in peak_sizes)
    return {"latents": len(z), "step_flops": flops, "achieved": flops / t, "peak": peak}


def section_flops(reg: Registry, args: argparse.Namespace, x: torch.Tensor) -> None:
    f = measure_flops(reg.generator("mnist"), x[: max(args.batches)], args.restarts)
    print(f"\n## flops: one step on {f['latents']} latents = {f['step_flops'] / 1e9:.2f} GFLOP (fwd + bwd to z)")
    print("| achieved GFLOP/s | dense matmul GFLOP/s | ratio |\n|---|---|---|")
    print(f"| {f['achieved'] / 1e9:.1f} | {f['peak'] / 1e9:.1f} | {f['achieved'] / f['peak']:.2f} |", flush=True)


def defended_acc(reg: Registry, ds: str, x: torch.Tensor, y: torch.Tensor, cfg: ProjectionConfig) -> float:
    G, E, clf = reg.generator(ds), reg.encoder(ds), reg.classifier(ds)
    correct = 0
    for i in range(0, len(x), 50):
        p = project(x[i : i + 50], G, cfg, encoder=E, seed=i)
        with torch.no_grad():
            correct += int((clf(p.images).argmax(1) == y[i : i + 50]).sum())
    return correct / len(x)


def section_warm(reg: Registry, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> None:
    clf = reg.classifier("mnist")
    adv = fgsm(clf, x, y, eps=0.3)
    print(f"\n## warm start (mnist, n={len(x)}): accuracy of classifier A on G(z*)")
    print("| init | L | R | L·R | clean | FGSM ε=0.3 | s/img |\n|---|---|---|---|---|---|---|")
    rows = [("random", args.steps, args.restarts)] + [("encoder", s, r) for s, r in args.warm]
    ref = None
    for init, s, r in rows:
        cfg = ProjectionConfig(steps=s, restarts=r, init=init)  # type: ignore[arg-type]
        t = time.perf_counter()
        clean = defended_acc(reg, "mnist", x, y, cfg)
        per_img = (time.perf_counter() - t) / len(x)
        attacked = defended_acc(reg, "mnist", adv, y, cfg)
        ref = ref or (clean, attacked, s * r)
        match = "" if init == "random" else (" ✓" if clean >= ref[0] - 0.005 and attacked >= ref[1] - 0.005 else "")
        print(f"| {init} | {s} | {r} | {s * r} | {clean:.3f} | {attacked:.3f}{match} | {per_img:.3f} |", flush=True)
    print("✓: within 0.5 points of the L=200, R=10 row on both; the ratio is (200·10)/(L·R) of the first ✓ row.")


def section_detect(reg: Registry, args: argparse.Namespace) -> None:
    print(f"\n## detector ROC AUC, clean vs FGSM ε=0.3 (n={args.n_detect}, L={args.steps}, R={args.restarts})")
    print("| dataset | AUC |\n|---|---|")
    for ds in reg.datasets():
        xs, ys = data.load_slice(ds)
        x = torch.from_numpy(data.to_float(xs[: args.n_detect]))
        y = torch.from_numpy(ys[: args.n_detect].astype("int64"))
        adv = fgsm(reg.classifier(ds), x, y, eps=0.3)
        cfg = ProjectionConfig(steps=args.steps, restarts=args.restarts)
        G = reg.generator(ds)
        clean = project(x, G, cfg, seed=0).mse
        attacked = project(adv, G, cfg, seed=0).mse
        print(f"| {ds} | {roc_auc(clean, attacked):.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="speed,flops,warm,detect")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--restarts", type=int, default=10)
    p.add_argument("--naive-images", type=int, default=1)
    p.add_argument("--n-warm", type=int, default=1000)
    p.add_argument("--warm", default="5x1,10x1,25x1,50x1,25x4", help="encoder (L x R) settings to compare")
    p.add_argument("--n-detect", type=int, default=300)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.warm = [tuple(int(v) for v in w.split("x")) for w in args.warm.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"# bench/purify.py on {platform.processor() or platform.machine()}, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    reg = Registry(MODELS)
    xs, ys = data.load_slice("mnist")
    x = torch.from_numpy(data.to_float(xs))
    y = torch.from_numpy(ys.astype("int64"))
    sections = args.sections.split(",")
    if "speed" in sections:
        section_speed(reg, args, x)
    if "flops" in sections:
        section_flops(reg, args, x)
    if "warm" in sections:
        section_warm(reg, args, x[: args.n_warm], y[: args.n_warm])
    if "detect" in sections:
        section_detect(reg, args)


if __name__ == "__main__":
    main()
