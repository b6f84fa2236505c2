"""Train an AdvGAN perturbation generator against one shipped classifier (Xiao et al. 2018).

    python -m training.train_advgan --dataset mnist --target classifier_A

    L_G = α·L_adv + β·L_hinge + L_GAN
    L_adv   = mean max(Z_y(x') − max_{i≠y} Z_i(x'), −κ)             (CW-style, untargeted)
    L_hinge = mean max(0, ‖x' − x‖₂ − c)                               (soft hinge on the perturbation norm)
    L_GAN   = mean (D(x') − 1)²,  L_D = mean (D(x) − 1)² + D(x')²      (least-squares GAN)

x' = clamp(x + ε·tanh(G(x)), 0, 1) with ε = 0.3 (`service.nets.AdvGANGenerator`), so the L∞ bound holds by
construction. The target classifier is the shipped, frozen one (semi-white-box: it is needed only for training).
Adam (lr 1e-3 for G, 1e-3 for D, β = (0.5, 0.999)), batch 128, stops after --epochs or --minutes, whichever comes
first. Measures on the full 10,000-image test set: attack success rate (prediction ≠ true label, over all images,
as the paper reports it, and over the images the classifier got right) and the mean L2 / L∞ perturbation; ships
models/<dataset>/advgan_<arch>.safetensors and its manifest entry.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.attacks import generator_key
from service.nets import AdvGANDiscriminator, AdvGANGenerator
from service.registry import Registry
from training import data
from training.common import (
    MODELS_DIR,
    RUNS_DIR,
    batches,
    command_line,
    eval_slice,
    record_dataset,
    save_grid,
    save_weights,
    setup,
    sha256_file,
    update_manifest,
)


def cw_margin(logits: torch.Tensor, labels: torch.Tensor, kappa: float) -> torch.Tensor:
    real = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), -torch.inf).amax(1)
    return torch.clamp(real - other, min=-kappa)


@torch.no_grad()
def evaluate(gen: nn.Module, clf: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> dict:
    """Success rate (all images; originally-correct images), mean L2/L∞ perturbation, clean accuracy."""
    gen.eval()
    fooled, fooled_correct, correct, l2, linf = 0, 0, 0, 0.0, 0.0
    for i in range(0, len(x), batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        adv = gen(xb)
        ok = clf(xb).argmax(1) == yb
        wrong = clf(adv).argmax(1) != yb
        d = (adv - xb).flatten(1)
        fooled += int(wrong.sum())
        fooled_correct += int((wrong & ok).sum())
        correct += int(ok.sum())
        l2 += float(d.norm(dim=1).sum())
        linf += float(d.abs().amax(1).sum())
    gen.train()
    n = len(x)
    return {
        "success_rate": round(fooled / n, 4),
        "success_rate_on_correct": round(fooled_correct / max(correct, 1), 4),
        "clean_accuracy": round(correct / n, 4),
        "mean_l2": round(l2 / n, 4),
        "mean_linf": round(linf / n, 4),
        "images": n,
    }


def train(args: argparse.Namespace) -> tuple[nn.Module, dict, Registry]:
    device = setup(args.seed, args.threads)
    reg = Registry(args.models_dir)
    clf = reg.classifier(args.dataset, args.target, device)  # frozen, eval mode
    arrays = data.load(args.dataset)
    x_tr = torch.from_numpy(data.to_float(arrays["x_train"])).to(device)
    y_tr = torch.from_numpy(arrays["y_train"].astype(np.int64)).to(device)
    xs, ys = eval_slice(args.dataset)
    x_sl = torch.from_numpy(data.to_float(xs)).to(device)
    y_sl = torch.from_numpy(ys.astype(np.int64)).to(device)
    shape = data.spec(args.dataset).shape
    gen = AdvGANGenerator(eps=args.eps, shape=shape).to(device)
    disc = AdvGANDiscriminator(shape).to(device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.999))
    rng = np.random.default_rng(args.seed)
    run_dir = Path(args.run_dir) / generator_key(args.dataset, args.target)
    t0, step = time.time(), 0
    total = args.epochs * (len(x_tr) // args.batch)
    print(f"training AdvGAN against {args.dataset}/{args.target} on {device}: up to {args.epochs} epochs "
          f"({total} steps) or {args.minutes} min", flush=True)  # fmt: skip
    stop = False
    for epoch in range(1, args.epochs + 1):
        for idx in batches(len(x_tr), args.batch, rng):
            xb, yb = x_tr[idx], y_tr[idx]
            adv = gen(xb)
            # discriminator: real images → 1, adversarial → 0
            loss_d = (disc(xb) - 1).pow(2).mean() + disc(adv.detach()).pow(2).mean()
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            # generator
            loss_gan = (disc(adv) - 1).pow(2).mean()
            loss_adv = cw_margin(clf(adv), yb, args.kappa).mean()
            loss_hinge = torch.clamp((adv - xb).flatten(1).norm(dim=1) - args.hinge_c, min=0).mean()
            loss_g = args.alpha * loss_adv + args.beta * loss_hinge + args.gamma * loss_gan
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            step += 1
            if step % args.log_every == 0:
                el = time.time() - t0
                print(f"[{step}/{total}] ep {epoch} {el / step:.3f}s/it {el / 60:.1f}min loss_d={loss_d.item():.4f} "
                      f"gan={loss_gan.item():.4f} adv={loss_adv.item():.4f} hinge={loss_hinge.item():.4f}",
                      flush=True)  # fmt: skip
            if time.time() - t0 > args.minutes * 60:
                stop = True
                break
        m = evaluate(gen, clf, x_sl, y_sl)
        print(f"epoch {epoch}: slice success {m['success_rate']:.4f} mean L2 {m['mean_l2']:.3f} "
              f"L∞ {m['mean_linf']:.3f} ({(time.time() - t0) / 60:.1f} min)", flush=True)  # fmt: skip
        with torch.no_grad():
            save_grid(torch.cat([x_sl[:20], gen.eval()(x_sl[:20])]), run_dir / f"epoch{epoch:03d}.png")
            gen.train()
        if stop:
            break
    gen = gen.cpu().eval()
    info = {"steps": step, "epochs_run": epoch, "minutes": round((time.time() - t0) / 60, 1)}
    return gen, info, reg


def ship(args: argparse.Namespace, gen: nn.Module, info: dict, reg: Registry) -> dict:
    key = generator_key(args.dataset, args.target)
    rel = Path(f"{key}.safetensors")
    arrays = data.load(args.dataset)
    x_te = torch.from_numpy(data.to_float(arrays["x_test"]))
    y_te = torch.from_numpy(arrays["y_test"].astype(np.int64))
    clf = reg.classifier(args.dataset, args.target, "cpu")
    metrics = evaluate(gen, clf, x_te, y_te)
    save_weights(gen, args.models_dir / rel)
    target_art = reg.get(f"{args.dataset}/{args.target}")
    entry = {
        "kind": "advgan",
        "arch": None,
        "dataset": args.dataset,
        "target": f"{args.dataset}/{args.target}",
        "target_sha256": sha256_file(target_art.path(reg.root)),
        "eps": args.eps,
        "command": command_line(),
        "training": {
            "epochs": args.epochs,
            "minutes": args.minutes,
            "batch": args.batch,
            "lr": args.lr,
            "alpha": args.alpha,
            "beta": args.beta,
            "gamma": args.gamma,
            "hinge_c": args.hinge_c,
            "kappa": args.kappa,
            "seed": args.seed,
            **info,
        },  # fmt: skip
        "files": {"weights": {"path": str(rel)}},
        "metrics": {f"test_{k}" if k != "images" else "test_images": v for k, v in metrics.items()},
    }
    record_dataset(data.spec(args.dataset), args.models_dir)
    update_manifest(key, entry, args.models_dir)
    print(f"shipped {rel}: {metrics}", flush=True)
    return metrics


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=data.dataset_name, required=True, help="mnist, fmnist or any prepared data set")
    p.add_argument("--target", default="classifier_A", help="the shipped classifier to attack")
    p.add_argument("--eps", type=float, default=0.3, help="L∞ bound (the registry loads ε = 0.3; others: --no-ship)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--minutes", type=float, default=35.0, help="wall-clock budget; stops after the current batch")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=10.0, help="weight of the adversarial (CW) loss")
    p.add_argument("--beta", type=float, default=1.0, help="weight of the hinge on the perturbation L2 norm")
    p.add_argument("--gamma", type=float, default=1.0, help="weight of the GAN loss")
    p.add_argument("--hinge-c", type=float, default=3.0, help="perturbation L2 norm allowed before the hinge bites")
    p.add_argument("--kappa", type=float, default=5.0, help="CW confidence margin of the adversarial loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR, help="where the target is and the generator goes")
    p.add_argument("--run-dir", type=Path, default=RUNS_DIR, help="per-epoch example grids go under it")
    p.add_argument("--no-ship", action="store_true", help="train and report only")
    a = p.parse_args(argv)
    if a.eps != AdvGANGenerator().eps and not a.no_ship:
        p.error("the registry builds AdvGANGenerator with its default ε = 0.3; train other bounds with --no-ship")
    return a


if __name__ == "__main__":
    a = parse()
    g, i, r = train(a)
    if not a.no_ship:
        ship(a, g, i, r)
