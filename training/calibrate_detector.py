"""Detector calibrations keyed by the projection they were made for: start (random or encoder), L steps, R restarts.

    python -m training.calibrate_detector --dataset mnist --grid random:25:1,random:50:2,encoder:5:1 --record

The reconstruction MSE of a clean image depends on how long and from where it was projected, so a threshold holds
for one (start, L, R) only (a threshold set at L=200 flags 74 % of clean images projected with L=25). Per grid
point: project --n held-out clean test images (drawn at random from test[1000:], outside the committed slice) with
the shipped generator, set the threshold at their (1 − fpr) quantile, then measure the false-positive rate on
--n-test other clean images (the committed slice, test[:n-test], fresh restart noise), with its Wilson 95 %
interval. `--record`
writes each point to the generator's manifest entry under `detector_grid["<start>:<L>:<R>"]`, which the service
looks up (`Registry.detector`); a (start, L, R) with no calibration answers `flagged: null` and says why.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from service.nets import Encoder, Generator
from service.purify import Detector, ProjectionConfig, project
from service.registry import Registry, grid_key
from service.stats import wilson
from training import data
from training.common import MODELS_DIR, command_line, eval_slice, record_metrics, setup

SLICE = 1000  # the committed slice is test[:1000]: the false-positive rate is measured there


def slice_end(test_size: int) -> int:
    """Where the held-out images begin: after the 1,000-image slice, or (a test set of at most 1,000 images, a small
    prepared data set) half-way, the first half measuring the false-positive rate (--n-test at most that)."""
    return SLICE if test_size > SLICE else test_size // 2


def held_out(dataset: str, n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """n clean test images outside the slice, drawn at random from test[1000:] (a block of them is no fair sample:
    thresholds set on test[5000:5150] flagged 6.9-7.7 % of the slice, on test[1000:2000] 2.3-3.7 %), and how."""
    x = data.load(dataset)["x_test"]
    start = slice_end(len(x))
    if n > len(x) - start:
        raise SystemExit(f"--n {n}: {dataset} holds {len(x) - start} test images outside the slice (test[{start}:])")
    idx = np.sort(np.random.default_rng(seed).choice(np.arange(start, len(x)), size=n, replace=False))
    return torch.from_numpy(data.to_float(x[idx])), f"{n} of test[{start}:], numpy default_rng({seed}).choice, sorted"


def parse_grid(text: str) -> list[tuple[str, int, int]]:
    """ "random:25:1,encoder:5:1" → [("random", 25, 1), ("encoder", 5, 1)]."""
    points = []
    for item in text.split(","):
        init, steps, restarts = item.strip().split(":")
        if init not in ("random", "encoder"):
            raise argparse.ArgumentTypeError(f"start must be random or encoder, got {init!r}")
        points.append((init, int(steps), int(restarts)))
    return points


def mses(x: torch.Tensor, G: Generator, cfg: ProjectionConfig, enc: Encoder | None, batch: int, seed: int
         ) -> torch.Tensor:  # fmt: skip
    """Reconstruction MSE of each image after projection, in batches (batch i draws its restarts from seed + i)."""
    return torch.cat(
        [project(x[i : i + batch], G, cfg, encoder=enc, seed=seed + i).mse for i in range(0, len(x), batch)]
    )


def calibrate(reg: Registry, dataset: str, init: str, steps: int, restarts: int, n: int, n_test: int, fpr: float,
              batch: int) -> dict:  # fmt: skip
    """One grid point: the threshold from held-out clean images, and its false-positive rate on other ones."""
    G, enc = reg.generator(dataset), reg.encoder(dataset) if init == "encoder" else None
    if init == "encoder" and enc is None:
        raise SystemExit(f"no encoder is shipped for {dataset}")
    cfg = ProjectionConfig(steps=steps, restarts=restarts, init=init)
    x, images = held_out(dataset, n)
    t = time.perf_counter()
    det = Detector.calibrate(mses(x, G, cfg, enc, batch, seed=0), fpr)
    test = torch.from_numpy(data.to_float(eval_slice(dataset)[0][:n_test]))
    mse_test = mses(test, G, cfg, enc, batch, seed=10**6)  # other images, other restart noise
    flagged = int(det.flag(mse_test).sum())
    lo, hi = wilson(flagged, n_test)
    return {"threshold": det.threshold, "fpr": fpr, "n": n, "steps": steps, "restarts": restarts, "init": init,
            "images": images, "test_fpr": flagged / n_test,
            "test_fpr_ci95": [lo, hi], "test_n": n_test, "test_images": "test[:test_n] (the committed slice)",
            "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=data.dataset_name, required=True, help="mnist, fmnist or any prepared data set")
    p.add_argument("--grid", type=parse_grid, required=True, help="comma list of start:L:R")
    p.add_argument("--n", type=int, default=400, help="held-out clean images the threshold is set on")
    p.add_argument("--n-test", type=int, default=400, help="other clean images its false-positive rate is measured on")
    p.add_argument("--fpr", type=float, default=0.05, help="target false-positive rate")
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--record", action="store_true", help="write the calibrations to the manifest")
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    args = p.parse_args(argv)
    setup(0, args.threads, "cpu")
    reg = Registry(args.models_dir)
    for init, steps, restarts in args.grid:
        cal = calibrate(reg, args.dataset, init, steps, restarts, args.n, args.n_test, args.fpr, args.batch)
        cal["command"] = command_line()
        print(f"{args.dataset} {grid_key(init, steps, restarts)}: threshold {cal['threshold']:.5f}, clean FPR on "
              f"{args.n_test} other images {cal['test_fpr']:.3f} [{cal['test_fpr_ci95'][0]:.3f}, "
              f"{cal['test_fpr_ci95'][1]:.3f}] (target {args.fpr}), {cal['seconds']} s", flush=True)  # fmt: skip
        if args.record:  # the calibration in the manifest, what it cost and its interval in the results tree
            key = grid_key(init, steps, restarts)
            measured = {f"detector_grid/{key}/{k}": cal.pop(k) for k in ("test_fpr_ci95", "seconds")}
            record_metrics(f"{args.dataset}/generator", measured, args.models_dir, job="calibrate_detector",
                           detector_grid={key: cal})  # fmt: skip


if __name__ == "__main__":
    main()
