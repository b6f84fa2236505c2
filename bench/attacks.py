"""Benchmark of the attacks (issue 5) on the shipped MNIST classifier A. Prints one table, measured in one run.

    python -m bench.attacks                        # the table on 300 slice images, timings on 1,000
    python -m bench.attacks --full --cw-images 20  # + AdvGAN and FGSM on the full 10,000-image test set (data/)

Per attack: success rate on the undefended classifier (prediction ≠ true label, over all images, as AdvGAN's
paper reports it), mean L2 and L∞ perturbation, and generation time per 1,000 images — every attack timed in the
same process, same threads, same batch of 1,000, best of --repeats (iterative attacks are timed on --images
images and scaled). FGSM vs AdvGAN is the paper's comparison (Xiao et al. 2018: FGSM 0.06 s, AdvGAN < 0.01 s per
1,000 images, on a GPU).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from service import attacks as A
from service.registry import Registry
from training import data

MODELS = Path(__file__).resolve().parent.parent / "models"


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    assert out is not None
    return out, best


def row(name: str, model: torch.nn.Module, adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, s_per_1k: float,
        note: str = "") -> str:  # fmt: skip
    with torch.no_grad():
        wrong = float((model(adv).argmax(1) != y).float().mean())
    d = (adv - x).flatten(1)
    return (f"| {name:<22} | {len(x):>6} | {100 * wrong:6.2f}% | {float(d.norm(dim=1).mean()):6.3f} | "
            f"{float(d.abs().amax(1).mean()):5.3f} | {s_per_1k:9.4f} | {note}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=300, help="slice images for the success/perturbation columns")
    p.add_argument("--cw-images", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--full", action="store_true", help="AdvGAN and FGSM on the full test set (needs data/mnist.npz)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    reg = Registry(MODELS)
    clf = reg.classifier("mnist", "classifier_A")
    gen = reg.module("mnist/advgan_A")
    xs, ys = data.load_slice("mnist")
    x_all = torch.from_numpy(data.to_float(xs))
    y_all = torch.from_numpy(ys.astype(np.int64))
    x, y = x_all[150 : 150 + a.images], y_all[150 : 150 + a.images]  # 0–149: the substitute's seed images
    print(f"# attacks on mnist/classifier_A — {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {a.threads} thread(s)\n")  # fmt: skip

    # timing: FGSM vs AdvGAN on the same 1,000 images, same process
    x1k, y1k = x_all[:1000], y_all[:1000]
    _, t_fgsm = timed(lambda: A.fgsm(clf, x1k, y1k), a.repeats)
    _, t_adv = timed(lambda: A.advgan(None, x1k, y1k, generator=gen), a.repeats)
    print(f"generation time per 1,000 images: FGSM {t_fgsm:.4f} s, AdvGAN {t_adv:.4f} s "
          f"(AdvGAN / FGSM = {t_adv / t_fgsm:.2f})\n")  # fmt: skip

    if a.full:
        arrays = data.load("mnist")
        xt = torch.from_numpy(data.to_float(arrays["x_test"]))
        yt = torch.from_numpy(arrays["y_test"].astype(np.int64))
        with torch.no_grad():
            adv = torch.cat([gen(xt[i : i + 1000]) for i in range(0, len(xt), 1000)])
        fg = torch.cat([A.fgsm(clf, xt[i : i + 1000], yt[i : i + 1000]) for i in range(0, len(xt), 1000)])
        print("full test set (10,000 images):")
        print("| attack | images | success | mean L2 | mean L∞ | s / 1k img | |")
        print("|---|---|---|---|---|---|---|")
        print(row("AdvGAN (ε=0.3)", clf, adv, xt, yt, t_adv))
        print(row("FGSM (ε=0.3)", clf, fg, xt, yt, t_fgsm))
        print()

    def per_1k(fn: Callable[[], torch.Tensor], n: int) -> tuple[torch.Tensor, float]:
        out, t = timed(fn, 1)
        return out, t * 1000 / n

    print(f"slice images {150}–{150 + a.images - 1} (CW on the first {a.cw_images}):")
    print("| attack | images | success | mean L2 | mean L∞ | s / 1k img | notes |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    print(row("FGSM ε=0.3", clf, A.fgsm(clf, x, y), x, y, t_fgsm))
    adv, t = per_1k(lambda: A.rand_fgsm(clf, x, y, generator=g), len(x))
    print(row("RAND+FGSM ε=0.3 α=0.05", clf, adv, x, y, t))
    adv, t = per_1k(lambda: A.pgd(clf, x, y, generator=g), len(x))
    print(row("PGD-L∞ ε=0.3 40 steps", clf, adv, x, y, t))
    adv, t = per_1k(lambda: A.pgd_l2(clf, x, y, generator=g), len(x))
    print(row("PGD-L2 ε=3 40 steps", clf, adv, x, y, t))
    xc, yc = x[: a.cw_images], y[: a.cw_images]
    adv, t = per_1k(lambda: A.cw(clf, xc, yc), len(xc))
    print(row("CW-L2 (converging)", clf, adv, xc, yc, t, "9 search steps × ≤100, lr 0.1"))
    adv, t = per_1k(lambda: A.cw_defense_gan(clf, xc, yc), len(xc))
    print(row("CW-L2 (Defense-GAN)", clf, adv, xc, yc, t, "1 step, 100 it, lr 10, c 100"))
    print(row("AdvGAN ε=0.3", clf, A.advgan(None, x, y, generator=gen), x, y, t_adv, "one forward pass"))
    t0 = time.perf_counter()
    sub = A.train_substitute(clf, x_all[:150], arch="E")
    t_train = time.perf_counter() - t0
    adv, t = per_1k(lambda: A.substitute(clf, x, y, substitute_model=sub.model), len(x))
    print(row("substitute E + FGSM", clf, adv, x, y, t,
              f"black box: {sub.oracle_queries} label queries, trained in {t_train:.1f} s"))  # fmt: skip


if __name__ == "__main__":
    main()
