"""Train MagNet (Meng & Chen 2017) for one dataset: two denoising autoencoders, a reformer and two detectors.

    python -m training.train_magnet --dataset mnist --epochs 100

As the authors' code (train_defense.py, defensive_models.py) trains them: autoencoder I (conv3-avgpool-conv3,
mirrored) and II (conv3, mirrored), sigmoid activations, inputs with Gaussian noise of volume 0.1 (clipped to
[0, 1]) mapped to the clean images under MSE, an L2 activity regulariser of 1e-9 on every convolution's output,
Adam (Keras' defaults, lr 1e-3), batch 256, 100 epochs. The last 5,000 training images are held out as the
validation set; each detector's threshold is the (1 − drop rate) quantile of its clean validation scores, with the
authors' drop rate 0.001 (MNIST: detector I is p=2, detector II p=1). The autoencoders take the data set's channels
(`training.data.spec`): any prepared data set, gray or colour. Ships models/<dataset>/magnet.safetensors
with its manifest entry (thresholds, validation MSE, clean test false-positive rate). Resumable from
runs/magnet/<dataset>/ (same command).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.nets import MAGNET_STRUCTURES, MagNet
from training import data
from training.common import (
    MODELS_DIR,
    RUNS_DIR,
    Progress,
    batches,
    command_line,
    record_dataset,
    save_weights,
    setup,
    update_manifest,
)
from training.train_robust import load_ckpt, save_ckpt

VALIDATION = 5000
DROP_RATE = 0.001


def activity_loss(ae: nn.Sequential, x: torch.Tensor, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(AE(x), Keras' activity regulariser: strength × Σ squared outputs of every convolution, per image)."""
    reg = x.new_zeros(())
    for layer in ae:
        x = layer(x)
        if isinstance(layer, nn.Conv2d):
            reg = reg + x.pow(2).sum() / len(x)
    return x, strength * reg


def held_out(n: int) -> int:
    """Validation images at the end of the training set: 5,000 (the authors'), a fifth of a smaller set."""
    return min(VALIDATION, n // 5)


def noisy(x: torch.Tensor, volume: float) -> torch.Tensor:
    return (x + volume * torch.randn_like(x)).clamp(0.0, 1.0)


@torch.no_grad()
def scores(net: MagNet, x: torch.Tensor, batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    parts = [net.scores(x[i : i + batch]) for i in range(0, len(x), batch)]
    return torch.cat([p[0] for p in parts]).numpy(), torch.cat([p[1] for p in parts]).numpy()


def train(args: argparse.Namespace, arrays: dict[str, np.ndarray] | None = None) -> tuple[MagNet, list[dict]]:
    """Train (or resume) both autoencoders; return the net (eval mode) and the per-epoch history."""
    setup(args.seed, args.threads)
    arrays = arrays if arrays is not None else data.load(args.dataset)
    x_all = torch.from_numpy(data.to_float(arrays["x_train"]))
    k = held_out(len(x_all))
    x_tr, x_val = x_all[:-k], x_all[-k:]
    net = MagNet(data.spec(args.dataset).shape)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    folder = Path(args.run_dir) / args.dataset
    per_epoch = len(x_tr) // args.batch
    total = args.max_steps or args.epochs * per_epoch
    step, history, _ = load_ckpt(folder, net, opt)
    rng = np.random.default_rng(args.seed + step)
    progress, last = Progress(total, every=args.log_every, start=step), time.time()
    net.train()
    while step < total:
        for idx in batches(len(x_tr), args.batch, rng):
            x = x_tr[torch.from_numpy(idx)]
            loss = x.new_zeros(())
            for ae in (net.ae1, net.ae2):
                out, reg = activity_loss(ae, noisy(x, args.noise), args.reg)
                loss = loss + (out - x).pow(2).mean() + reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            progress(step, loss=loss.item())
            if step % per_epoch == 0 or step == total:
                history.append(validate(net, x_val, step / per_epoch))
                net.train()
            if time.time() - last > args.ckpt_minutes * 60 or step == total:
                save_ckpt(folder, net, opt, step, history, [])
                last = time.time()
            if step >= total:
                break
    return net.eval(), history


@torch.no_grad()
def validate(net: MagNet, x_val: torch.Tensor, epoch: float) -> dict:
    net.eval()
    s1, s2 = scores(net, x_val)
    row = {"epoch": round(epoch, 2), "val_mse_I": round(float(s1.mean()), 6), "val_mae_II": round(float(s2.mean()), 6)}
    print(f"epoch {row['epoch']}: validation MSE(I) {row['val_mse_I']:.6f}  MAE(II) {row['val_mae_II']:.6f}",
          flush=True)  # fmt: skip
    return row


def calibrate(net: MagNet, arrays: dict[str, np.ndarray], drop_rate: float) -> dict:
    """Thresholds at the (1 − drop_rate) quantile of the clean validation scores, and the clean test FPR they give."""
    k = held_out(len(arrays["x_train"]))
    x_val = torch.from_numpy(data.to_float(arrays["x_train"][-k:]))
    x_te = torch.from_numpy(data.to_float(arrays["x_test"]))
    (v1, v2), (t1, t2) = scores(net, x_val), scores(net, x_te)
    th1, th2 = float(np.quantile(v1, 1 - drop_rate)), float(np.quantile(v2, 1 - drop_rate))
    return {
        "I": {"p": 2, "threshold": th1, "structure": list(MAGNET_STRUCTURES["I"])},
        "II": {"p": 1, "threshold": th2, "structure": list(MAGNET_STRUCTURES["II"])},
        "drop_rate": drop_rate,
        "n": k,
        "images": f"the last {k} training images (held out from the autoencoders' training)",
        "test_fpr": round(float(((t1 > th1) | (t2 > th2)).mean()), 5),
        "test_images": len(x_te),
    }


def ship(args: argparse.Namespace, net: MagNet, history: list[dict], arrays: dict[str, np.ndarray]) -> dict:
    rel = f"{args.dataset}/magnet.safetensors"
    save_weights(net, Path(args.models_dir) / rel)
    detector = calibrate(net, arrays, args.drop_rate)
    x_te = torch.from_numpy(data.to_float(arrays["x_test"]))
    s1, _ = scores(net, x_te)
    training = {"epochs": args.epochs, "batch": args.batch, "lr": args.lr, "noise": args.noise, "reg": args.reg,
                "seed": args.seed, "validation": held_out(len(arrays["x_train"])), "history": history}  # fmt: skip
    entry = {"kind": "magnet", "dataset": args.dataset, "command": command_line(), "files": {"weights": {"path": rel}},
             "detector": detector, "training": training,
             "metrics": {"test_mse_I": round(float(s1.mean()), 6), "test_fpr": detector["test_fpr"]}}  # fmt: skip
    record_dataset(data.spec(args.dataset), Path(args.models_dir))
    update_manifest(f"{args.dataset}/magnet", entry, Path(args.models_dir))
    print(f"shipped {args.dataset}/magnet: thresholds I {detector['I']['threshold']:.5f} "
          f"II {detector['II']['threshold']:.5f}, clean test FPR {detector['test_fpr']}", flush=True)  # fmt: skip
    return detector


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=data.dataset_name, required=True, help="mnist, fmnist or any prepared data set")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--noise", type=float, default=0.1, help="training noise volume (the authors' v_noise)")
    p.add_argument("--reg", type=float, default=1e-9, help="L2 activity regularisation strength")
    p.add_argument("--drop-rate", type=float, default=DROP_RATE, help="clean validation images each detector drops")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many batches (smoke tests)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--run-dir", default=str(RUNS_DIR / "magnet"))
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    p.add_argument("--no-ship", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    arrays = data.load(args.dataset)
    net, history = train(args, arrays)
    if not args.no_ship:
        ship(args, net, history, arrays)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
