"""Train the Defense-GAN generator (WGAN-GP by default, as in Samangouei et al. 2018).

    python -m training.train_gan --dataset mnist --iters 20000

Defaults are the official config: latent 128, batch 50, 5 critic steps per generator step, gradient penalty 10,
Adam lr 1e-4 β=(0.5, 0.9), z ~ N(0, I). `--objective dcgan` (1 D step, BCE, Adam 2e-4 β1 0.5) is the cheaper
alternative for CPU hosts. `--recon λ` trains an encoder beside them and adds λ·‖G(E(x)) − x‖² (mean squared)
to the generator's loss, a pull of the range towards the training images that a CPU's few thousand iterations
need on colour data; the encoder's weights stay in the checkpoint (`training.train_encoder` trains the shipped
one). Networks are built for the dataset's image shape (`training.data.spec`). Checkpoints go to
runs/<dataset>/<tag>/ckpt.pt every --ckpt-every iterations and a run resumes from its checkpoint; sample grids
(and reconstructions, with --recon) are written beside it. `--ship` exports the generator to
models/<dataset>/generator.safetensors and records it in models/manifest.json.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from service.nets import LATENT_DIM, Critic, Encoder, Generator
from service.registry import sha256_file
from training import data
from training.common import (
    RUNS_DIR,
    Progress,
    check_resume,
    command_line,
    record_dataset,
    run_arguments,
    save_grid,
    save_weights,
    setup,
    update_manifest,
)

LATENT_SCALE = 10**-0.5  # of a generator trained with an encoder (--recon): the projection's lr 10 acts as lr 1
# the arguments that define a run: saved in its checkpoint, and a resume must repeat them (--iters may grow)
RUN_ARGS = ("dataset", "objective", "batch", "critic_iters", "gp", "lr", "z_std", "seed", "recon")


def gradient_penalty(critic: Critic, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """(‖∇_x̂ D(x̂)‖₂ − 1)² on random interpolates x̂ between real and fake (Gulrajani et al. 2017)."""
    alpha = torch.rand(real.size(0), 1, 1, 1, device=real.device)
    x_hat = (real + alpha * (fake - real)).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1.0) ** 2).mean()


def critic_loss(D: Critic, real: torch.Tensor, fake: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """WGAN-GP's critic loss (Gulrajani et al. 2017), or DCGAN's discriminator cross-entropy."""
    if args.objective == "wgan-gp":
        d_real, d_fake = D(real).mean(), D(fake).mean()
        return d_fake - d_real + args.gp * gradient_penalty(D, real, fake)
    lr_, lf_ = D(real), D(fake)
    return 0.5 * (F.binary_cross_entropy_with_logits(lr_, torch.ones_like(lr_))
                  + F.binary_cross_entropy_with_logits(lf_, torch.zeros_like(lf_)))  # fmt: skip


Optimizers = tuple[torch.optim.Optimizer, torch.optim.Optimizer]


def step(G: Generator, D: Critic, opts: Optimizers, args: argparse.Namespace, real_batch: Callable[[], torch.Tensor],
         sample_z: Callable[[int], torch.Tensor], E: Encoder | None = None) -> tuple[float, float]:  # fmt: skip
    """One generator iteration: the critic's steps (--critic-iters for WGAN-GP, one for DCGAN), then the generator's
    (with the encoder `E`, trained by the same optimizer, and the reconstruction term where --recon is set)."""
    opt_g, opt_d = opts
    wgan = args.objective == "wgan-gp"
    for _ in range(args.critic_iters if wgan else 1):
        real = real_batch()
        with torch.no_grad():
            fake = G(sample_z(args.batch))
        loss_d = critic_loss(D, real, fake, args)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
    for p in D.parameters():
        p.requires_grad_(False)
    out = D(G(sample_z(args.batch)))
    loss_g = -out.mean() if wgan else F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
    if E is not None:
        real = real_batch()
        loss_g = loss_g + args.recon * F.mse_loss(G(E(real)), real)
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    for p in D.parameters():
        p.requires_grad_(True)
    return loss_d.item(), loss_g.item()


def resume(path: Path, args: argparse.Namespace, state: dict[str, Any], device: torch.device) -> int:
    """Load the run's checkpoint into `state` (modules and optimizers by name) and the RNG; return its iteration
    (0 where there is none). A checkpoint made with other arguments is refused."""
    if not path.exists():
        return 0
    ck = torch.load(path, map_location=device, weights_only=True)
    check_resume(ck.get("args"), run_arguments(args, RUN_ARGS), path)
    for name, obj in state.items():
        obj.load_state_dict(ck[name])
    torch.set_rng_state(ck["rng"])
    print(f"resumed {path} at iteration {int(ck['iter'])}")
    return int(ck["iter"])


def save_checkpoint(path: Path, args: argparse.Namespace, state: dict[str, Any], it: int) -> None:
    """The run's state, its iteration, the RNG and the arguments that define it, written atomically."""
    tmp = path.with_suffix(".tmp")
    torch.save({**{name: obj.state_dict() for name, obj in state.items()}, "iter": it, "rng": torch.get_rng_state(),
                "args": run_arguments(args, RUN_ARGS)}, tmp)  # fmt: skip
    tmp.replace(path)


def train(args: argparse.Namespace, x_train_u8: np.ndarray | None = None) -> Path:
    """Train (resuming from the run's checkpoint), write samples and checkpoints; return the generator file.

    `x_train_u8` overrides the cached training images (tests). Per-iteration losses go to `args.history`.
    """
    device = setup(args.seed, args.threads)
    run_dir = Path(args.runs_dir) / args.dataset / args.tag
    run_dir.mkdir(parents=True, exist_ok=True)
    x_u8 = x_train_u8 if x_train_u8 is not None else data.load(args.dataset)["x_train"]
    x_train = torch.from_numpy(data.to_float(x_u8)).to(device)

    shape = data.spec(args.dataset).shape
    G = Generator(shape=shape).to(device)
    D = Critic(shape=shape, norm=shape[1] != 28 and args.objective == "dcgan").to(device)
    E = Encoder(shape=shape).to(device) if args.recon else None
    wgan = args.objective == "wgan-gp"
    lr = args.lr or (1e-4 if wgan else 2e-4)
    betas = (0.5, 0.9) if wgan else (0.5, 0.999)
    opt_g = torch.optim.Adam([*G.parameters(), *(E.parameters() if E else ())], lr=lr, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=lr, betas=betas)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    fixed_z = torch.randn(100, LATENT_DIM, generator=gen).mul_(args.z_std).to(device)
    state = {"G": G, "D": D, "opt_g": opt_g, "opt_d": opt_d, **({"E": E} if E else {})}
    ckpt_path = run_dir / "ckpt.pt"
    start = resume(ckpt_path, args, state, device)

    def sample_z(k: int) -> torch.Tensor:
        return torch.randn(k, LATENT_DIM, device=device) * args.z_std

    def real_batch() -> torch.Tensor:
        return x_train[torch.randint(0, len(x_train), (args.batch,), device=device)]

    progress = Progress(args.iters, every=args.log_every, start=start)
    args.history = []
    t0 = time.time()
    for it in range(start + 1, args.iters + 1):
        loss_d, loss_g = step(G, D, (opt_g, opt_d), args, real_batch, sample_z, E)
        args.history.append((loss_d, loss_g))
        progress(it, loss_d=loss_d, loss_g=loss_g)
        if it % args.ckpt_every == 0 or it == args.iters:
            save_checkpoint(ckpt_path, args, state, it)
            with torch.no_grad():
                save_grid(G(fixed_z), run_dir / f"samples_{it:06d}.png")
                if E is not None:
                    x = real_batch()[:50]
                    save_grid(torch.cat([x, G(E(x))]), run_dir / f"reconstructions_{it:06d}.png")
    print(f"trained {args.iters - start} iterations in {(time.time() - t0) / 60:.1f} min")

    if E is not None:
        fit_to_encoder(G, E, x_train)
    out = run_dir / "generator.safetensors"
    save_weights(G, out)
    if args.ship:
        ship(args, G, E)
    return out


@torch.no_grad()
def fit_to_encoder(G: Generator, E: Encoder, x_train: torch.Tensor, images: int = 10_000,
                   scale: float = LATENT_SCALE) -> None:  # fmt: skip
    """Fit a jointly trained pair to the warm-start projection, in place; the range G spans is unchanged.

    - G's batch-norm statistics are re-estimated over G(E(x)) of the first `images` training images. Training
      mixes batches of z ~ N(0, I) and of E(x), whose statistics differ (the encoder's codes lie near the origin),
      so eval-mode G(E(x)) is not what training reconstructed without it.
    - The latent is rescaled, z' = z / scale (G's first layer × scale, the encoder's head ÷ scale): the projection's
      fixed SGD step (lr 10, Defense-GAN's) then moves z by lr·scale², a step this pair's range stays stable under.
    """
    E.eval()
    update_bn((E(x_train[i : i + 500]) for i in range(0, min(images, len(x_train)), 500)), G)
    G.eval()
    G.fc.weight.mul_(scale)
    head = E.body[-1]
    head.weight.div_(scale)
    head.bias.div_(scale)


def ship(args: argparse.Namespace, G: Generator, E: Encoder | None = None) -> None:
    """The generator (and, trained beside it with --recon, its encoder: the projection's warm start) to models/."""
    spec = data.spec(args.dataset)
    target = Path("models") / args.dataset / "generator.safetensors"
    save_weights(G, Path(__file__).resolve().parent.parent / target)
    record_dataset(spec)
    training = {"objective": args.objective, "iterations": args.iters, "batch": args.batch,
                "critic_iters": args.critic_iters if args.objective == "wgan-gp" else 1, "seed": args.seed,
                **({"recon": args.recon} if args.recon else {})}  # fmt: skip
    update_manifest(f"{args.dataset}/generator", {
        "files": {"weights": {"path": f"{args.dataset}/generator.safetensors"}},
        "kind": "generator", "arch": "defensegan-mnist" if spec.side == 28 else f"dcgan-{spec.side}",
        "dataset": args.dataset, "classes": list(spec.classes), "latent_dim": LATENT_DIM,
        "latent_std": args.z_std / (LATENT_SCALE if E is not None else 1.0),
        "command": command_line(), "training": training,
    })  # fmt: skip
    print(f"shipped {target}")
    if E is not None:
        models = Path(__file__).resolve().parent.parent / "models" / args.dataset
        save_weights(E, models / "encoder.safetensors")
        update_manifest(f"{args.dataset}/encoder", {
            "generator_sha256": sha256_file(models / "generator.safetensors"),
            "files": {"weights": {"path": f"{args.dataset}/encoder.safetensors"}}, "kind": "encoder",
            "arch": "defensegan-encoder", "dataset": args.dataset, "latent_dim": LATENT_DIM, "command": command_line(),
            "training": {"joint_with": "generator", "recon": args.recon, "iterations": args.iters, "seed": args.seed},
        })  # fmt: skip
        print(f"shipped models/{args.dataset}/encoder.safetensors (trained with the generator)")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=data.dataset_name, required=True)
    p.add_argument("--objective", choices=["wgan-gp", "dcgan"], default="wgan-gp")
    p.add_argument("--iters", type=int, default=200_000, help="generator iterations (paper: 200k)")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--critic-iters", type=int, default=5)
    p.add_argument("--gp", type=float, default=10.0)
    p.add_argument("--lr", type=float, default=None, help="default 1e-4 (wgan-gp) or 2e-4 (dcgan)")
    p.add_argument("--z-std", type=float, default=1.0, help="std of the latent prior in training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recon", type=float, default=0.0, help="weight of a jointly trained encoder's reconstruction "
                   "error in the generator's loss (0: the plain GAN)")  # fmt: skip
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--tag",
        default=None,
        help="run folder under <runs-dir>/<dataset>/ (default: wgan or dcgan, the "
        "objective's; the shipped generators' runs are wgan, so the same command resumes them)",
    )
    p.add_argument("--runs-dir", default=str(RUNS_DIR))
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ship", action="store_true", help="export to models/ and record in the manifest")
    args = p.parse_args(argv)
    args.tag = args.tag or ("wgan" if args.objective == "wgan-gp" else "dcgan")
    return args


if __name__ == "__main__":
    train(parse())
