"""Adversarial training: PGD (Madry et al. 2018) or TRADES (Zhang et al. 2019), resumable, one command per model.

    python -m training.train_robust --dataset mnist --method trades --eps 0.3 --epochs 8 --threads 1
    python -m training.train_robust --dataset fmnist --method trades --eps 0.1 --epochs 8 --threads 1
    python -m training.train_robust --dataset mnist --method pgd --eps 0.3 --epochs 8 --threads 1
    python -m training.train_robust --dataset mnist --method max --eps 0.3 --eps2 2.0 --epochs 3 --lr 3e-4 \
        --init classifier_S_trades0.3_ema --eps-ramp 0 --ema 0.999 --name classifier_S_union --threads 1

Ships models/<dataset>/classifier_<arch>_<method><eps> (safetensors + ONNX + manifest entry with `training.method`
and `training.threat`). Defaults follow the official code where the CPU allows:
- TRADES: loss CE(f(x), y) + β·KL(f(x) ‖ f(x')), x' found by `--steps` sign-gradient steps of size `--alpha` on the
  KL from x + 0.001·N(0, I) with the model in eval mode (official `trades.py`); β = 6 (their robust setting).
- PGD: CE(f(x'), y), x' by `--steps` of L∞ PGD from a uniform random start (Madry et al.).
- Max (both threats at once; Tramèr & Boneh 2019, the "worst-case" baseline of Maini et al. 2020): per image the
  one of an L∞ PGD adversary (ε = `--eps`) and an L2 PGD adversary (ε = `--eps2`) with the higher loss, CE on it.
- MSD (Maini et al. 2020, the union's own training): one adversary that picks, at every step and per image, the
  L∞ or the L2 steepest-ascent step with the higher loss (`msd`); CE on it. About 1.5 PGD's cost against max's 2.
- Network S (TRADES' SmallCNN) by default: a third of classifier A's cost per attack step on this CPU.
The official schedules (40 steps of 0.01, 100 epochs) cost ~60 h here; we take 10 steps of ε/4 (the same
2.5·ε/steps reach rule as Madry's), ε ramped linearly over the first `--eps-ramp` epochs, and Adam with a
one-cycle learning rate (linear warm-up over 10 %, cosine decay to 0) over `--epochs`.

`--ema D` keeps an exponential moving average of the weights (decay D per batch; Gowal et al. 2020, "Uncovering
the limits of adversarial training", find weight averaging among the cheapest gains): the average is what the
per-epoch check measures and what ships.

Each epoch prints clean accuracy and FGSM / PGD-20 accuracy on 500 held-out test images (the last 500, outside
the committed 1,000-image slice): PGD far below FGSM is catastrophic overfitting, seen when it happens.
A checkpoint (model, weight average, optimiser, position; safetensors and JSON) is written to
runs/robust/<name>/ every `--ckpt-minutes` and at each epoch's end; the same command resumes from it. A run that
spans sessions takes `--run-dir checkpoints/robust`, committed with the code (checkpoints/README.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from service.attacks import fgsm, pgd, pgd_l2
from service.attacks.pgd import ball_step
from service.nets import build_classifier
from service.registry import Registry
from training import data
from training.common import (
    MODELS_DIR,
    RUNS_DIR,
    Progress,
    add_device_option,
    batches,
    check_resume,
    command_line,
    git_commit,
    run_arguments,
    setup,
)
from training.train_classifier import accuracy, ship_classifier

MONITOR = 500  # held-out test images for the per-epoch check (the last ones; the slice is the first 1,000)
# what defines a run: a checkpoint saves them and a resume must repeat them (training.common.check_resume)
RUN_ARGS = ("dataset", "method", "arch", "eps", "eps2", "steps", "alpha_frac", "beta", "epochs", "eps_ramp", "batch",
            "lr", "seed", "ema", "init")  # fmt: skip


def trades_adversary(model: nn.Module, x: torch.Tensor, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """TRADES' inner maximisation: sign-gradient ascent on KL(f(x) ‖ f(x')) within the L∞ ball (official code)."""
    with torch.no_grad():
        p_nat = F.softmax(model(x), dim=1)
    adv = x + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(adv), dim=1), p_nat, reduction="sum")
        (grad,) = torch.autograd.grad(kl, adv)
        adv = torch.min(torch.max(adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0.0, 1.0)
    return adv.detach()


def robust_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace,
                eps: float) -> torch.Tensor:  # fmt: skip
    """One batch's training loss (the model is left in train mode)."""
    alpha = eps * args.alpha_frac
    model.eval()
    if args.method == "trades":
        adv = trades_adversary(model, x, eps, alpha, args.steps) if eps > 0 else x
        model.train()
        logits = model(x)
        kl = F.kl_div(F.log_softmax(model(adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return F.cross_entropy(logits, y) + args.beta * kl
    if args.method in UNION_ADVERSARIES:
        adv = UNION_ADVERSARIES[args.method](model, x, y, eps, eps * args.eps2 / args.eps, args) if eps > 0 else x
    else:
        adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=args.steps) if eps > 0 else x
    model.train()
    return F.cross_entropy(model(adv), y)


def worst_of_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, eps2: float,
                   args: argparse.Namespace) -> torch.Tensor:  # fmt: skip
    """Per image, the L∞ or L2 PGD adversary with the higher cross-entropy (the model in eval mode)."""
    a_inf = pgd(model, x, y, eps=eps, alpha=eps * args.alpha_frac, steps=args.steps)
    a_l2 = pgd_l2(model, x, y, eps=eps2, alpha=eps2 * args.alpha_frac, steps=args.steps)
    with torch.no_grad():
        worse = F.cross_entropy(model(a_l2), y, reduction="none") > F.cross_entropy(model(a_inf), y, reduction="none")
    return torch.where(worse.view(-1, 1, 1, 1), a_l2, a_inf)


def msd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, eps2: float,
        args: argparse.Namespace) -> torch.Tensor:  # fmt: skip
    """Multi steepest descent (Maini, Wong & Kolter 2020, the official `msd_v0` without its L1 step): from x, each of
    `--steps` steps takes one gradient, forms the L∞ step (α·sign g, δ clamped to ε) and the L2 step (α₂·g/‖g‖₂, δ
    scaled into ε₂), and keeps per image the one with the higher loss; returns the highest-loss point visited. One
    backward and two forwards a step, where `max` runs two whole PGD attacks."""
    x0, adv = x.detach(), x.detach().clone()
    best, best_loss = adv.clone(), torch.full((len(x),), -math.inf, device=x.device)
    for _ in range(args.steps):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
        cands = [ball_step(adv.detach(), grad, x0, e, e * args.alpha_frac, n) for e, n in ((eps, "linf"), (eps2, "l2"))]
        with torch.no_grad():
            losses = [F.cross_entropy(model(a), y, reduction="none") for a in cands]
            pick = (losses[1] > losses[0]).view(-1, 1, 1, 1)
            adv, loss = torch.where(pick, cands[1], cands[0]), torch.maximum(losses[0], losses[1])
            better = loss > best_loss
            best, best_loss = torch.where(better.view(-1, 1, 1, 1), adv, best), torch.where(better, loss, best_loss)
    return best.detach()


# the methods trained against L∞ and L2 at once (`--eps2`), each with its adversary
UNION_ADVERSARIES = {"max": worst_of_norms, "msd": msd}
UNION_METHODS = tuple(UNION_ADVERSARIES)


def lr_at(step: int, total: int, peak: float) -> float:
    """One-cycle: linear warm-up over the first 10 % of steps, then cosine decay to 0."""
    warm = max(1, total // 10)
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def monitor(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, eps2: float = 0.0) -> dict[str, float]:
    """Clean, FGSM and PGD-20 (α = ε/8, random start) accuracy on the held-out monitor images. With `eps2`, on the
    first 200 of them: L2 PGD-20 (α = ε₂/8), torchattacks' L2 Square (1,000 queries: an L∞-trained MNIST model masks
    L2 gradients, which a score-based attack does not need) and the union (correct under all three)."""
    model.eval()
    chunks = [(x[i : i + 250], y[i : i + 250]) for i in range(0, len(x), 250)]
    adv_f = torch.cat([fgsm(model, xc, yc, eps=eps) for xc, yc in chunks])
    adv_p = torch.cat([pgd(model, xc, yc, eps=eps, alpha=eps / 8, steps=20) for xc, yc in chunks])
    out = {"clean": accuracy(model, x, y), "fgsm": accuracy(model, adv_f, y), "pgd20": accuracy(model, adv_p, y)}
    if eps2:
        import torchattacks  # test/train tool, installed beside the service's dependencies

        x2, y2 = x[:200], y[:200]
        adv_2 = pgd_l2(model, x2, y2, eps=eps2, alpha=eps2 / 8, steps=20)
        adv_s = torchattacks.Square(model, norm="L2", eps=eps2, n_queries=1000, n_restarts=1, seed=0)(x2, y2)
        with torch.no_grad():
            ok_inf, ok_2, ok_s = (model(a).argmax(1) == y2 for a in (adv_p[:200], adv_2, adv_s))
        out |= {"pgd20_l2": float(ok_2.float().mean()), "square_l2": float(ok_s.float().mean()),
                "union": float((ok_inf & ok_2 & ok_s).float().mean())}  # fmt: skip
    return out


def epoch_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epoch: float, args: argparse.Namespace) -> dict:
    """The per-epoch held-out check, printed; its record for the history."""
    m = monitor(model, x, y, args.eps, args.eps2 if args.method in UNION_METHODS else 0)
    l2 = (f" | first 200: L2 PGD-20 {m['pgd20_l2']:.3f} L2 Square-1000 {m['square_l2']:.3f} union"
          f" {m['union']:.3f} (ε₂={args.eps2:g})" if "union" in m else "")  # fmt: skip
    print(f"epoch {epoch:.2f}: held-out {len(x)} clean {m['clean']:.3f} FGSM {m['fgsm']:.3f} "
          f"PGD-20 {m['pgd20']:.3f} (ε={args.eps:g}){l2}", flush=True)  # fmt: skip
    return {"epoch": round(epoch, 2), **m}


def model_name(args: argparse.Namespace) -> str:
    return getattr(args, "name", None) or f"classifier_{args.arch.upper()}_{args.method}{args.eps:g}"


def init_weights(model: nn.Module, args: argparse.Namespace) -> None:
    """Start from the shipped classifier `--init` (its hash verified), when one is named."""
    if args.init:
        model.load_state_dict(Registry(args.models_dir).module(f"{args.dataset}/{args.init}").state_dict())
        print(f"starting from {args.dataset}/{args.init}", flush=True)


Hook = Callable[[nn.Module, torch.optim.Optimizer, int], "dict[str, float] | None"]


class WeightAverage:
    """Exponential moving average of a model's parameters and buffers (the model trained stays as it is)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = model.state_dict()
        for k, v in self.model.state_dict().items():
            if v.is_floating_point():
                v.lerp_(live[k], 1.0 - self.decay)
            else:
                v.copy_(live[k])


def save_ckpt(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, history: list,
               segments: list, ema: WeightAverage | None = None, run_args: dict | None = None) -> None:  # fmt: skip
    """Write the run's state as safetensors and JSON only (no pickle: a checkpoint may be committed and resumed on
    another machine); state.json goes last, so a checkpoint is whole once it exists."""
    folder.mkdir(parents=True, exist_ok=True)
    opt_state = opt.state_dict()
    tensors_of = {"model": model.state_dict(), "optim": {f"{i}.{k}": v for i, s in opt_state["state"].items()
                                                         for k, v in s.items()}}  # fmt: skip
    if ema is not None:
        tensors_of["ema"] = ema.model.state_dict()
    for name, tensors in tensors_of.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{name}.tmp"))
        (folder / f"{name}.tmp").replace(folder / f"{name}.safetensors")
    state = {"step": step, "history": history, "segments": segments, "args": run_args,
             "param_groups": opt_state["param_groups"]}  # fmt: skip
    (folder / "state.tmp").write_text(json.dumps(state, indent=1))
    (folder / "state.tmp").replace(folder / "state.json")


def load_ckpt(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, ema: WeightAverage | None = None,
              run_args: dict | None = None) -> tuple[int, list, list]:  # fmt: skip
    """(step, per-epoch history, the commands that ran so far with the step each started at); a checkpoint made
    with other run arguments is refused."""
    if not (folder / "state.json").exists():
        return 0, [], []
    state = json.loads((folder / "state.json").read_text())
    if run_args is not None:
        check_resume(state.get("args"), run_args, folder)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    if ema is not None and (folder / "ema.safetensors").exists():
        ema.model.load_state_dict(load_file(str(folder / "ema.safetensors")))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(folder / "optim.safetensors")).items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    print(f"resumed from {folder} at step {state['step']}", flush=True)
    return int(state["step"]), list(state["history"]), list(state["segments"])


def add_segment(segments: list, start: int, device: torch.device) -> list:
    """Record this invocation (its first step, command, commit and device) as the run's next segment: every resume
    is one, whatever its command; one that started at the same step as the last made no progress and replaces it."""
    seg = {"from_step": start, "command": command_line(), "commit": git_commit(), "device": device.type}
    return [*(segments[:-1] if segments and segments[-1]["from_step"] == start else segments), seg]


def tensors(arrays: dict[str, np.ndarray], monitor_n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(training images, labels, monitor images, labels) on `device`: the monitor is the last test images."""
    x_tr = torch.from_numpy(data.to_float(arrays["x_train"])).to(device)
    y_tr = torch.from_numpy(arrays["y_train"].astype(np.int64)).to(device)
    x_mon = torch.from_numpy(data.to_float(arrays["x_test"][-monitor_n:])).to(device)
    y_mon = torch.from_numpy(arrays["y_test"][-monitor_n:].astype(np.int64)).to(device)
    return x_tr, y_tr, x_mon, y_mon


def train(args: argparse.Namespace, arrays: dict[str, np.ndarray] | None = None,
          hook: Hook | None = None) -> tuple[nn.Module, list]:  # fmt: skip
    """Train (or resume) and return the model (CPU, eval mode) and the per-epoch history. `hook(model, opt, step)`
    runs after each batch's step (an extra objective's own step); what it returns is shown in the progress line."""
    device = setup(args.seed, args.threads, args.device)
    x_tr, y_tr, x_mon, y_mon = tensors(arrays if arrays is not None else data.load(args.dataset), args.monitor, device)
    spec = data.spec(args.dataset)
    model = build_classifier(args.arch, spec.shape, spec.num_classes).to(device)
    init_weights(model, args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    ema = WeightAverage(model, args.ema) if args.ema else None
    folder = Path(args.run_dir) / model_name(args)
    run_args = run_arguments(args, RUN_ARGS)
    start, history, segments = load_ckpt(folder, model, opt, ema, run_args)
    segments = args.segments = add_segment(segments, start, device)
    per_epoch = len(x_tr) // args.batch
    total = per_epoch * args.epochs
    if args.max_steps:
        total = min(total, args.max_steps)
    progress, last_ckpt = Progress(total, every=args.log_every, start=start), time.time()
    step, losses = start, []  # device scalars: read once at the end (and when a progress line prints)
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        rng = np.random.default_rng(args.seed * 1000 + epoch)  # the epoch's order, the same after a resume
        for idx in list(batches(len(x_tr), args.batch, rng))[offset:]:
            eps = args.eps * min(1.0, (step + 1) / max(1, args.eps_ramp * per_epoch))
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args.lr)
            model.train()
            loss = robust_loss(model, x_tr[idx], y_tr[idx], args, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if ema is not None:
                ema.update(model)
            losses.append(loss.detach())
            extra = (hook(model, opt, step) if hook else None) or {}
            if progress.due(step):
                progress(step, loss=float(losses[-1]), eps=eps, epoch=epoch + 1, **extra)
            if time.time() - last_ckpt > args.ckpt_minutes * 60:
                save_ckpt(folder, model, opt, step, history, segments, ema, run_args)
                last_ckpt = time.time()
            if step >= total:
                break
        if step % per_epoch == 0 or step >= total:
            history.append(epoch_check(ema.model if ema else model, x_mon, y_mon, step / per_epoch, args))
            save_ckpt(folder, model, opt, step, history, segments, ema, run_args)
            last_ckpt = time.time()
    args.losses = torch.stack(losses).tolist() if losses else []
    shipped = ema.model if ema is not None else model
    return shipped.cpu().eval(), history


def ship(args: argparse.Namespace, model: nn.Module, history: list, extra: dict | None = None) -> dict:
    """Ship the model with its manifest entry; `extra` adds to its `training` record."""
    training = {
        "method": args.method, "threat": threat(args), "epochs": args.epochs,
        "batch": args.batch, "lr": args.lr, "optimizer": "adam, one-cycle", "steps": args.steps,
        "alpha": round(args.eps * args.alpha_frac, 6), "eps_ramp_epochs": args.eps_ramp, "seed": args.seed,
        **({"beta": args.beta} if args.method == "trades" else {}), "history": history,
        **({"weight_average": {"kind": "ema", "decay": args.ema}} if args.ema else {}),
        "segments": getattr(args, "segments", []), **({"init": f"{args.dataset}/{args.init}"} if args.init else {}),
    }  # fmt: skip
    training |= extra or {}
    return ship_classifier(model, args.dataset, model_name(args), {"arch": args.arch.upper(), "training": training},
                           models_dir=args.models_dir)  # fmt: skip


def threat(args: argparse.Namespace) -> dict:
    """The threat a model is trained for, as the manifest records it."""
    if args.method in UNION_METHODS:
        return {"norm": "linf+l2", "eps": args.eps, "eps_l2": args.eps2}
    return {"norm": "linf", "eps": args.eps}


def parser(doc: str | None = None, eps: float | None = None) -> argparse.ArgumentParser:
    """The training options (train_enhanced adds its own to these); `eps` None makes --eps required."""
    p = argparse.ArgumentParser(description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=data.dataset_name, required=True, help="mnist, fmnist or any prepared data set")
    p.add_argument("--method", choices=("trades", "pgd", *UNION_METHODS), default="trades")
    p.add_argument("--arch", default="S", help="classifier network (A–E, S)")
    p.add_argument("--eps", type=float, required=eps is None, default=eps,
                   help="L∞ training budget (MNIST 0.3, Fashion-MNIST 0.1)")  # fmt: skip
    p.add_argument("--eps2", type=float, default=2.0, help="L2 training budget of --method max / msd")
    p.add_argument("--steps", type=int, default=10, help="attack steps per batch")
    p.add_argument("--alpha-frac", type=float, default=0.25, help="attack step size as a fraction of ε")
    p.add_argument("--beta", type=float, default=6.0, help="TRADES' robustness weight")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--eps-ramp", type=float, default=1.5, help="epochs over which ε rises linearly from 0")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    add_device_option(p)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many batches (smoke tests)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--monitor", type=int, default=MONITOR, help="held-out test images for the per-epoch check")
    p.add_argument("--ema", type=float, default=0.0, help="weight-average decay per batch (0: off); ships the average")
    p.add_argument("--name", help="shipped name (default classifier_<arch>_<method><eps>)")
    p.add_argument("--init", help="shipped classifier to start from (fine-tuning); default: random weights")
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--run-dir", default=str(RUNS_DIR / "robust"))
    p.add_argument("--no-ship", action="store_true", help="train and report only")
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


if __name__ == "__main__":
    a = parse()
    m, h = train(a)
    if not a.no_ship:
        ship(a, m, h)
