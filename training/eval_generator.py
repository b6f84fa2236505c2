"""Measure a generator as a defense: reconstruction quality and robustness under FGSM, on the committed slice.

    python -m training.eval_generator --dataset mnist --n 300                     # the shipped generator
    python -m training.eval_generator --dataset mnist --ckpt runs/mnist/wgan/ckpt.pt --n 64 --tag it2000
    python -m training.eval_generator --dataset mnist --n 300 --record            # write metrics to the results tree

For the first n slice images: classifier A's accuracy on x, on G(z*) of x (clean), and on G(z*) of FGSM(x)
computed on classifier A alone (ε = 0.3, the Defense-GAN white-box setting), with Wilson 95% intervals; the mean
reconstruction MSE; the MSE detector's ROC AUC (clean vs adversarial). Every run is appended to
docs/experiments/generator_<dataset>.jsonl (committed) so that attempts can be compared.

`--range train-set` replaces the generator by the 60,000 training images themselves (the projection becomes the
nearest training image under MSE): what a generator that had learned exactly its training data would do.
`--range train-set+x` adds each query's own clean image to that set (an oracle range that contains the answer).

    python -m training.eval_generator --dataset mnist --n 300 --range train-set --tag "training set"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from service.attacks import fgsm
from service.nets import Encoder, Generator
from service.purify import Detector, ProjectionConfig, freeze, project, roc_auc
from service.registry import Registry
from service.stats import wilson
from training import data
from training.common import MODELS_DIR, ROOT, command_line, eval_slice, generator_iterations, record_metrics, setup

EXPERIMENTS = ROOT / "docs" / "experiments"
RANGE_NAMES = {"train-set": "training set (nearest image)", "train-set+x": "training set ∪ {x} (oracle)"}


def load_generator(args: argparse.Namespace, reg: Registry) -> tuple[Generator, Encoder | None]:
    """The generator to evaluate, and the encoder that goes with it: a `train_gan --recon` checkpoint's own, the
    shipped one otherwise (None where none is shipped)."""
    if args.ckpt:
        shape = data.spec(args.dataset).shape
        G, src = Generator(shape=shape), Path(args.ckpt)
        ck = torch.load(src, weights_only=True) if src.suffix == ".pt" else {"G": load_file(str(src))}
        G.load_state_dict(ck["G"])
        if "E" in ck:
            E = Encoder(shape=shape)
            E.load_state_dict(ck["E"])
            return freeze(G), freeze(E)  # type: ignore[return-value]
        return freeze(G), reg.encoder(args.dataset)  # type: ignore[return-value]
    return reg.generator(args.dataset), reg.encoder(args.dataset)


def project_batched(x: torch.Tensor, G: Generator, cfg: ProjectionConfig, enc: torch.nn.Module | None,
                    batch: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    imgs, mses = [], []
    for i in range(0, len(x), batch):
        p = project(x[i : i + batch], G, cfg, encoder=enc, seed=i)
        imgs.append(p.images)
        mses.append(p.mse)
    return torch.cat(imgs), torch.cat(mses)


def shipped_name(reg: Registry, dataset: str) -> str:
    """Which shipped generator a row measured ("shipped (N it)"): generators are retrained over time."""
    entry = reg.get(f"{dataset}/generator").raw
    return f"shipped ({generator_iterations(entry)} it)" if entry.get("training") else "shipped"


def nearest(x: torch.Tensor, bank: torch.Tensor, own: torch.Tensor | None = None,
            chunk: int = 100) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The image of `bank` (M×C×H×W) nearest each x under MSE, and that MSE; with `own`, each query may also
    pick own[i] (an oracle range holding the query's clean image)."""
    flat = bank.flatten(1)
    sq = (flat**2).sum(1)
    imgs, mses = [], []
    for i in range(0, len(x), chunk):
        q = x[i : i + chunk].flatten(1)
        d = (q**2).sum(1, keepdim=True) - 2 * q @ flat.T + sq[None]
        dist, idx = d.min(1)
        best = bank[idx]
        if own is not None:
            o = own[i : i + chunk]
            d_own = ((q - o.flatten(1)) ** 2).sum(1)
            take = d_own < dist
            best = torch.where(take[:, None, None, None], o, best)
        imgs.append(best)
        mses.append(((best - x[i : i + chunk]) ** 2).flatten(1).mean(1))
    return torch.cat(imgs), torch.cat(mses)


def evaluate(args: argparse.Namespace) -> dict:
    setup(args.seed, args.threads)
    reg = Registry(MODELS_DIR)
    clf = reg.classifier(args.dataset, args.classifier)
    xs, ys = eval_slice(args.dataset)
    x = torch.from_numpy(data.to_float(xs[: args.n]))
    y = torch.from_numpy(ys[: args.n].astype("int64"))
    cfg = ProjectionConfig(steps=args.steps, restarts=args.restarts, init=args.init, init_std=args.init_std,
                           z_max_norm=args.z_max_norm, z_min_norm=args.z_min_norm, lr=args.lr)  # fmt: skip
    adv = fgsm(clf, x, y, eps=args.eps)
    G, enc = None, None
    if args.range == "generator":
        G, own_encoder = load_generator(args, reg)
        enc = own_encoder if args.init == "encoder" else None

        def purify(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return project_batched(v, G, cfg, enc, args.batch)
    else:
        bank = torch.from_numpy(data.to_float(data.load(args.dataset)["x_train"]))
        own = x if args.range == "train-set+x" else None

        def purify(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return nearest(v, bank, own)

    t0 = time.time()
    rec_clean, mse_clean = purify(x)
    t_clean = time.time() - t0
    rec_adv, mse_adv = purify(adv)
    with torch.no_grad():
        acc = {name: int((clf(v).argmax(1) == y).sum()) for name, v in
               (("x", x), ("adv", adv), ("G_clean", rec_clean), ("G_adv", rec_adv))}  # fmt: skip
    n = len(x)
    out = {
        "dataset": args.dataset, "tag": args.tag, "n": n, "classifier": args.classifier,
        "generator": RANGE_NAMES.get(args.range) or args.ckpt or shipped_name(reg, args.dataset),
        "steps": cfg.steps, "restarts": cfg.restarts, "init": cfg.init, "init_std": args.init_std,
        "z_max_norm": args.z_max_norm, "z_min_norm": args.z_min_norm, "lr": cfg.lr, "eps": args.eps,
        "acc_clean_no_defense": acc["x"] / n, "acc_fgsm_no_defense": acc["adv"] / n,
        "acc_clean_defended": acc["G_clean"] / n, "acc_clean_defended_ci95": wilson(acc["G_clean"], n),
        "acc_fgsm_defended": acc["G_adv"] / n, "acc_fgsm_defended_ci95": wilson(acc["G_adv"], n),
        "mse_clean": float(mse_clean.mean()), "mse_fgsm": float(mse_adv.mean()),
        "detector_auc_fgsm": roc_auc(mse_clean, mse_adv),
        "seconds_per_image": t_clean / n, "threads": torch.get_num_threads(), "command": command_line(),
    }  # fmt: skip
    if args.range != "generator":  # no descent: the projection settings do not apply
        out |= dict.fromkeys(("steps", "restarts", "init", "init_std", "lr"))
    print(json.dumps(out, indent=1))
    log = EXPERIMENTS / f"generator_{args.dataset}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps(out) + "\n")
    if args.record and G is not None:  # parse() allows --record with the generator range only
        record(args, out, G, enc, cfg, mse_clean)
    return out


def record(args: argparse.Namespace, out: dict, G: Generator, enc: torch.nn.Module | None,
           cfg: ProjectionConfig, mse_clean_slice: torch.Tensor) -> None:  # fmt: skip
    """Record the figures (results/eval_generator/) and, on the generator's manifest entry, a detector threshold
    calibrated on held-out clean test images (indices 5000…, outside the slice) at --fpr with its false-positive
    rate on the slice."""
    prefix = "rec" if args.init == "random" else "warm"
    kept = ("n", "steps", "restarts", "classifier", "eps")
    metrics = {f"{prefix}_{k}": v for k, v in out.items() if k.startswith(("acc_", "mse_", "detector_")) or k in kept}
    metrics[f"{prefix}_command"] = out["command"]
    x_test = data.load(args.dataset)["x_test"]
    lo = 5000 if len(x_test) > 5000 else len(x_test) // 2  # a small prepared data set: its second half
    held_out = torch.from_numpy(data.to_float(x_test[lo : lo + args.n_calibration]))
    _, mse_cal = project_batched(held_out, G, cfg, enc, args.batch)
    det = Detector.calibrate(mse_cal, args.fpr)
    metrics[f"{prefix}_detector_fpr_on_slice"] = float(det.flag(mse_clean_slice).float().mean())
    calibration = {"threshold": det.threshold, "fpr": det.fpr, "n": len(held_out), "steps": cfg.steps,
                   "restarts": cfg.restarts, "images": f"test[{lo}:{lo}+n]",
                   "test_fpr": metrics[f"{prefix}_detector_fpr_on_slice"], "test_n": len(mse_clean_slice),
                   "test_images": "test[:test_n] (the committed slice)"}  # fmt: skip
    record_metrics(f"{args.dataset}/generator", metrics, job="eval_generator", detector={args.init: calibration})
    print("recorded", metrics, calibration)


def report(dataset: str, out: Path) -> None:
    """Render every recorded attempt of `dataset` (docs/experiments/generator_<dataset>.jsonl) as a markdown table."""
    rows = [json.loads(line) for line in (EXPERIMENTS / f"generator_{dataset}.jsonl").read_text().splitlines()]
    lines = [f"### {dataset}: every attempt ({len(rows)} runs)", "",
             "| tag | generator | n | L | R | init | z constraint | clean on G(z*) | FGSM ε=0.3 on G(z*) [95% CI] "
             "| MSE clean / FGSM | detector AUC | s/img |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lo, hi = r["acc_fgsm_defended_ci95"]
        gen = r["generator"]
        gen = gen if gen.startswith("shipped") or gen in RANGE_NAMES.values() else Path(gen).name
        init = "–" if r["init"] is None else r["init"] + ("" if r.get("init_std") is None else f" σ={r['init_std']:g}")
        lo_z, hi_z = r.get("z_min_norm"), r.get("z_max_norm")
        zc = "–" if not (lo_z or hi_z) else f"{lo_z or 0}≤‖z‖≤{hi_z or '∞'}"
        lines.append(
            f"| {r['tag']} | {gen} | {r['n']} | {r['steps'] or '–'} | {r['restarts'] or '–'} | {init} | {zc} "
            f"| {r['acc_clean_defended']:.3f} | {r['acc_fgsm_defended']:.3f} [{lo:.3f}, {hi:.3f}] "
            f"| {r['mse_clean']:.4f} / {r['mse_fgsm']:.4f} | {r['detector_auc_fgsm']:.3f} "
            f"| {r['seconds_per_image']:.2f} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    text = out.read_text() if out.exists() else ""
    start = text.find(f"### {dataset}: every attempt")
    block = "\n".join(lines) + "\n"
    if start >= 0:
        end = text.find("### ", start + 4)
        text = text[:start] + block + ("\n" + text[end:] if end >= 0 else "")
    else:
        text = text + ("\n" if text else "") + block
    out.write_text(text)
    print(block)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=data.dataset_name, required=True, help="mnist, fmnist or any prepared data set")
    p.add_argument("--ckpt", help="evaluate this checkpoint (.pt) or safetensors instead of the shipped generator")
    p.add_argument(
        "--range",
        choices=["generator", *RANGE_NAMES],
        default="generator",
        help="project onto the generator's range, or onto the training images themselves (a bound)",
    )
    p.add_argument("--classifier", default="classifier_A")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--restarts", type=int, default=10)
    p.add_argument("--lr", type=float, default=10.0)
    p.add_argument("--init", choices=["random", "encoder"], default="random")
    p.add_argument("--init-std", type=float, default=None)
    p.add_argument("--z-max-norm", type=float, default=None)
    p.add_argument("--z-min-norm", type=float, default=None)
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tag", default="")
    p.add_argument("--record", action="store_true", help="write figures + detector calibration to the manifest")
    p.add_argument("--fpr", type=float, default=0.05, help="detector target false-positive rate")
    p.add_argument("--n-calibration", type=int, default=300)
    p.add_argument("--report", metavar="MD", help="only render all recorded attempts into this markdown file")
    args = p.parse_args(argv)
    if args.record and args.range != "generator":
        p.error("--record writes the shipped generator's figures: it needs --range generator")
    return args


if __name__ == "__main__":
    a = parse()
    if a.report:
        report(a.dataset, Path(a.report))
    else:
        evaluate(a)
