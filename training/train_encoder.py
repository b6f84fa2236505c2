"""Train the encoder E: x → z against the frozen shipped generator, for the projection's warm start.

    python -m training.train_encoder --dataset mnist --iters 3000

Loss per batch: latent ‖E(G(z)) − z‖² on generated pairs z ~ N(0, σ²I) (σ = the generator's training prior)
plus reconstruction ‖G(E(x)) − x‖² on real training images (gradients flow through the frozen G into E).
Adam 1e-3 β=(0.9, 0.999), batch 64. The encoder is built for the data set's images (`training.data.spec`). Ships
models/<dataset>/encoder.safetensors with its manifest entry (and the data set's image format, `datasets`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from service.nets import Encoder
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


def train(args: argparse.Namespace) -> Encoder:
    device = setup(args.seed, args.threads)
    reg = Registry(args.models_dir)
    G = reg.generator(args.dataset, device)
    z_std = float(reg.get(f"{args.dataset}/generator").raw.get("latent_std", 1.0))
    x_train = torch.from_numpy(data.to_float(data.load(args.dataset)["x_train"])).to(device)
    E = Encoder(shape=data.spec(args.dataset).shape).to(device)
    opt = torch.optim.Adam(E.parameters(), lr=args.lr)
    progress = Progress(args.iters, every=args.log_every)
    t0 = time.time()
    for it in range(1, args.iters + 1):
        z = torch.randn(args.batch, G.latent_dim, device=device) * z_std
        with torch.no_grad():
            x_fake = G(z)
        loss_lat = (E(x_fake) - z).pow(2).mean() / z_std**2
        real = x_train[torch.randint(0, len(x_train), (args.batch,), device=device)]
        loss_rec = (G(E(real)) - real).pow(2).mean()
        loss = args.latent_weight * loss_lat + loss_rec
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress(it, latent=loss_lat.item(), rec_mse=loss_rec.item())
    print(f"trained {args.iters} iterations in {(time.time() - t0) / 60:.1f} min")
    return E.cpu().eval()


@torch.no_grad()
def slice_recon_mse(E: Encoder, dataset: str, models_dir: Path = MODELS_DIR) -> float:
    """Mean ‖G(E(x)) − x‖² over the committed slice (computed before the new file replaces the shipped one)."""
    G = Registry(models_dir).generator(dataset)
    x = torch.from_numpy(data.to_float(eval_slice(dataset)[0]))
    return float((G(E(x)) - x).pow(2).mean())


def ship(args: argparse.Namespace, E: Encoder) -> None:
    rel = f"{args.dataset}/encoder.safetensors"
    metrics = {"slice_mse_G_of_E_x": round(slice_recon_mse(E, args.dataset, args.models_dir), 6)}
    gen_sha = json.loads((args.models_dir / "manifest.json").read_text())["artifacts"][f"{args.dataset}/generator"]
    save_weights(E, args.models_dir / rel)
    record_dataset(data.spec(args.dataset), args.models_dir)
    update_manifest(f"{args.dataset}/encoder", {
        "kind": "encoder", "arch": "defensegan-encoder", "dataset": args.dataset, "command": command_line(),
        "files": {"weights": {"path": rel}}, "metrics": metrics,
        "generator_sha256": gen_sha["files"]["weights"]["sha256"],
        "training": {"iterations": args.iters, "batch": args.batch, "lr": args.lr,
                     "latent_weight": args.latent_weight, "seed": args.seed},
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
    p.add_argument("--no-ship", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    a = parse()
    enc = train(a)
    if not a.no_ship:
        ship(a, enc)
