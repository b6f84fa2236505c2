"""Train the encoder E: x → z against the frozen shipped generator, for the projection's warm start.

    python -m training.train_encoder --dataset mnist --iters 3000
    python -m training.train_encoder --dataset shapes --joint --iters 6000 --lr 1e-4 --latent-weight 0

Loss per batch: latent ‖E(G(z)) − z‖² on generated pairs z ~ N(0, σ²I) (σ = the generator's training prior)
plus reconstruction ‖G(E(x)) − x‖² on real training images (gradients flow through the frozen G into E).
Adam 1e-3 β=(0.9, 0.999), batch 64. The encoder is built for the data set's images (`training.data.spec`). Ships
models/<dataset>/encoder.safetensors with its manifest entry (and the data set's image format, `datasets`).

`--joint` fine-tunes a pair trained together (`train_gan --recon`) on reconstruction: the shipped encoder and
generator both learn, the generator's batch-norm statistics stay fixed (eval mode, as the projection runs it), and
both are shipped; the generator's manifest entry appends the run to its `segments`. A short GAN run leaves outlines
blurred in G(E(x)); this pulls the range onto the training images without a new adversarial run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from service.nets import Encoder, Generator
from service.registry import Registry
from training import data
from training.common import (
    MODELS_DIR,
    Progress,
    command_line,
    eval_slice,
    record_dataset,
    save_weights,
    setup,
    update_manifest,
)


def models(args: argparse.Namespace, reg: Registry, device: torch.device) -> tuple[Generator, Encoder, list]:
    """The generator (learning with --joint, frozen otherwise), the encoder to train and the parameters to learn."""
    G = reg.generator(args.dataset, device)
    if not args.joint:
        E = Encoder(shape=data.spec(args.dataset).shape).to(device)
        return G, E, list(E.parameters())
    E = reg.encoder(args.dataset, device)
    if E is None:
        raise SystemExit(f"--joint needs a shipped {args.dataset}/encoder (train_gan --recon)")
    params = [*G.parameters(), *E.parameters()]
    for p in params:
        p.requires_grad_(True)
    return G, E, params  # both stay in eval mode: batch norm as the projection runs it


def train(args: argparse.Namespace) -> tuple[Encoder, Generator | None]:
    """The trained encoder, and with --joint the fine-tuned generator (None otherwise)."""
    device = setup(args.seed, args.threads)
    reg = Registry(args.models_dir)
    G, E, params = models(args, reg, device)
    z_std = float(reg.get(f"{args.dataset}/generator").raw.get("latent_std", 1.0))
    x_train = torch.from_numpy(data.to_float(data.load(args.dataset)["x_train"])).to(device)
    opt = torch.optim.Adam(params, lr=args.lr)
    progress = Progress(args.iters, every=args.log_every)
    t0 = time.time()
    for it in range(1, args.iters + 1):
        real = x_train[torch.randint(0, len(x_train), (args.batch,), device=device)]
        loss_rec = (G(E(real)) - real).pow(2).mean()
        loss_lat = latent_loss(G, E, args.batch, z_std) if args.latent_weight else torch.zeros(())
        loss = args.latent_weight * loss_lat + loss_rec
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress(it, latent=loss_lat.item(), rec_mse=loss_rec.item())
    print(f"trained {args.iters} iterations in {(time.time() - t0) / 60:.1f} min")
    for p in params:
        p.requires_grad_(False)
    return E.cpu().eval(), G.cpu().eval() if args.joint else None


def latent_loss(G: Generator, E: Encoder, batch: int, z_std: float) -> torch.Tensor:
    """‖E(G(z)) − z‖² / σ² on generated pairs, z ~ N(0, σ²I)."""
    z = torch.randn(batch, G.latent_dim, device=next(E.parameters()).device) * z_std
    with torch.no_grad():
        x_fake = G(z)
    return (E(x_fake) - z).pow(2).mean() / z_std**2


@torch.no_grad()
def slice_recon_mse(E: Encoder, G: Generator, dataset: str) -> float:
    """Mean ‖G(E(x)) − x‖² over the committed slice."""
    x = torch.from_numpy(data.to_float(eval_slice(dataset)[0]))
    return float((G(E(x)) - x).pow(2).mean())


def ship_generator(args: argparse.Namespace, G: Generator) -> None:
    """The fine-tuned generator over the shipped one; its entry keeps the GAN run and appends this segment."""
    key, rel = f"{args.dataset}/generator", f"{args.dataset}/generator.safetensors"
    entry = json.loads((args.models_dir / "manifest.json").read_text())["artifacts"][key]
    entry = {k: v for k, v in entry.items() if k not in ("commit", "created", "detector", "detector_grid")}
    segment = {"command": command_line(), "objective": "reconstruction (generator and encoder)",
               "iterations": args.iters, "batch": args.batch, "lr": args.lr, "seed": args.seed}  # fmt: skip
    entry["segments"] = [*entry.get("segments", []), segment]
    save_weights(G, args.models_dir / rel)
    update_manifest(key, entry, args.models_dir)
    print(f"shipped models/{rel}")


def ship(args: argparse.Namespace, E: Encoder, tuned: Generator | None) -> None:
    """The encoder to models/, after the generator it was trained with where that was fine-tuned too."""
    rel = f"{args.dataset}/encoder.safetensors"
    if tuned is not None:
        ship_generator(args, tuned)
    G = tuned or Registry(args.models_dir).generator(args.dataset)
    metrics = {"slice_mse_G_of_E_x": round(slice_recon_mse(E, G, args.dataset), 6)}
    gen_sha = json.loads((args.models_dir / "manifest.json").read_text())["artifacts"][f"{args.dataset}/generator"]
    save_weights(E, args.models_dir / rel)
    record_dataset(data.spec(args.dataset), args.models_dir)
    update_manifest(f"{args.dataset}/encoder", {
        "kind": "encoder", "arch": "defensegan-encoder", "dataset": args.dataset, "command": command_line(),
        "files": {"weights": {"path": rel}}, "metrics": metrics,
        "generator_sha256": gen_sha["files"]["weights"]["sha256"],
        "training": {"iterations": args.iters, "batch": args.batch, "lr": args.lr,
                     "latent_weight": args.latent_weight, "seed": args.seed,
                     **({"joint_with": "generator", "init": "shipped"} if args.joint else {})},
    }, args.models_dir)  # fmt: skip
    print(f"shipped models/{rel}: {metrics}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=data.dataset_name, required=True, help="mnist, fmnist or any prepared data set")
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latent-weight", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR, help="where the generator is and the encoder goes")
    p.add_argument(
        "--joint",
        action="store_true",
        help="fine-tune the shipped encoder and generator together on reconstruction; ship both",
    )
    p.add_argument("--no-ship", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse()
    enc, gen = train(a)
    if not a.no_ship:
        ship(a, enc, gen)
