"""Robustness an evaluator can trust: AutoAttack per pipeline and threat, adaptive attacks through the projection,
per-image worst case, intervals with n, the sanity checks, and the pipeline the service serves by default.

    python -m training.robustness --dataset mnist --threads 1        # the recorded run (defaults below)
    python -m training.robustness --dataset fmnist --threads 1
    python -m training.robustness --dataset mnist --defense invert-classify --threads 1   # a 2nd process, same cache
    python -m training.robustness --dataset mnist --quick            # smoke run: a few images, few iterations

Pipelines: every shipped classifier of the dataset bare (`none`), and the adversarially trained ones (and the
enhanced ones) behind the encoder warm-start projection (`invert-classify`, L=25, R=1).
Attacks, run in order on the images every earlier attack failed on (an image is robust only if all failed):
- bare: AutoAttack standard — APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5,000 queries) — from the
  authors' own implementation (`pyautoattack`, the reference), 100 iterations each as published;
- behind the projection: APGD-CE and APGD-T through BPDA (straight-through projection), APGD-CE through the exactly
  differentiated unrolled projection (`service.attacks.Unrolled`), the latent ("overpowered") attack, and Square
  on the real pipeline (gradient-free: it catches masked gradients). The warm start with R=1 is deterministic
  (z₀ = E(x), no random restarts), so EOT has nothing to average; it applies to `defense-gan`'s restarts.
Threats: MNIST L∞ 0.3 and L2 2.0; Fashion-MNIST L∞ 0.1, L∞ 0.3 and L2 1.5; any other prepared data set L∞ 8/255
(its standard threat) and L2 0.5, RobustBench's CIFAR-10 threats (no clean bar: see `robustness_protocol`).
Images: the first n of the committed 1,000-image slice — n = 1,000 for the adversarially trained classifiers at the
standard threat (the enhanced ones too: the default is chosen among them on the same images), 200 at their other
threats, 100 for the classifiers trained without attacks, 100
(standard threat) and 30 (others) behind the projection, where every attack step costs a 25-step projection
(`--n`, `--n-other`, `--n-baseline`, `--defended-n`, `--defended-n-other`). Behind the projection
the gradient attacks run 50 iterations (APGD-T: 3 targets) and Square 200 queries, the CPU's limit; the bare
cells use the published settings. Clean accuracy: the full 10,000 test images (bare) or the first `--clean-n`
(projected). Per-image results are cached under runs/robustness/ (a rerun, or a second process, reuses them).

Writes its run's folder under results/robustness/<dataset>/ (its config; one row per pipeline, with the per-image
flags at the standard threat; its sanity, cross-check and held-out checks), then docs/robustness.md and
models/measured.json from the newest row per pipeline (`training.report`): each pipeline's figures on its
classifier (`metrics.robustness` in /v1/models) and the dataset's measured default — the pipeline with the highest
worst-case accuracy at the standard threat (MNIST L∞ 0.3, Fashion-MNIST L∞ 0.1) among those whose clean accuracy
meets the bar (0.98 / 0.85); the default served is a setting, this is the measured choice beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from service.registry import Registry
from training import data, results
from training.common import MODELS_DIR, add_device_option, command_line, eval_slice, git_commit, results_dir, setup
from training.robustness_attacks import (
    OrtForward,
    Pipeline,
    _cache_path,
    clean_accuracy,
    sanity,
    within,
    worst_case,
)
from training.robustness_page import (
    DOCS,
    JOB,
    measured,
    merge,
    pack_flags,
    page_doc,
    page_from_tree,
    previous_rows,
    render,
)
from training.robustness_protocol import (
    BARE_ATTACKS,
    CHEAP,
    CLEAN_BAR,
    ROBUST_METHODS,
    STANDARD,
    THREATS,
    UNION,
    Budget,
    attacks_for,
    choose_default,
    detect_attacks_for,
    pipelines,
    threat_key,
    union_cell,
    union_key,
)

__all__ = ["CLEAN_BAR", "JOB", "OrtForward", "measured", "render"]
log = logging.getLogger("robustness")


def evaluate_pipeline(reg: Registry, dataset: str, classifier: str, defense: str, x: torch.Tensor,
                      y: torch.Tensor, args: argparse.Namespace, budget: Budget) -> dict:  # fmt: skip
    """Clean accuracy and the per-image worst case under every threat of the dataset and under the union; behind a
    detector, correct-or-flagged under detector-aware attacks at each threat of the union and the union."""
    p = Pipeline(reg, dataset, classifier, defense, args.device)
    method = reg.get(f"{dataset}/{classifier}").raw.get("training", {}).get("method", "standard")
    attacks = attacks_for(defense, tuple(args.bare_attacks), p.classes)
    clean = clean_accuracy(p, dataset, 10000 if defense in CHEAP else args.clean_n, reg)
    candidate = method in ROBUST_METHODS and clean["accuracy"] >= (CLEAN_BAR[dataset] or 0.0)  # could be a default

    def cells(threats: tuple[tuple[str, float], ...], names: tuple[str, ...], judge: str = "correct") -> dict:
        out = {}
        for norm, eps in threats:
            n = min(images(args, dataset, defense, candidate, norm, eps), len(x))
            out[threat_key(norm, eps)] = worst_case(p, x[:n], y[:n], norm, eps, names, args.seed, budget, judge)
        union = union_cell(out, dataset)
        return out | ({union_key(dataset): union} if union else {})

    out = {"classifier": classifier, "defense": defense, "method": method, "clean": clean, "attacks": attacks,
           "threats": cells(THREATS[dataset], attacks)}  # fmt: skip
    if defense != "none" and p.threshold is not None:
        detect = detect_attacks_for(defense)
        out["detect_or_correct"] = cells(UNION[dataset], detect, "correct-or-flagged") | {
            "threshold": p.threshold, "attacks": detect}  # fmt: skip
    return out


def images(args: argparse.Namespace, dataset: str, defense: str, candidate: bool, norm: str, eps: float) -> int:
    """How many images of the slice a pipeline is attacked on at a threat (the module docstring's n)."""
    standard = (norm, eps) == STANDARD[dataset]
    if defense == "magnet" or (defense == "none" and not candidate):
        return args.n_baseline
    if defense != "none":
        return args.defended_n if standard else args.defended_n_other
    return args.n if standard else args.n_other


def info_block() -> dict:
    import platform

    return {"command": command_line(), "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads"}  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    args.device = setup(args.seed, args.threads, args.device)
    reg = Registry(args.models_dir)
    budget = Budget(fab_targets=args.fab_targets)
    if args.quick:
        budget = Budget(iters=5, square_queries=20, defended_iters=3, defended_square_queries=10, latent_steps=10)
    xs, ys = eval_slice(args.dataset)
    x, y = torch.from_numpy(data.to_float(xs)), torch.from_numpy(ys.astype(np.int64))
    chosen = pipelines(reg, args.dataset, args.defended)
    if args.only:
        chosen = [c for c in chosen if c[0] in args.only]
    if args.defense:
        chosen = [c for c in chosen if c[1] == args.defense]
    results, info = [], info_block()
    for clf, defense in chosen:
        log.info("pipeline %s + %s", clf, defense)
        results.append(evaluate_pipeline(reg, args.dataset, clf, defense, x, y, args, budget) | {"evaluation": info})
    partial = bool(args.only or args.defense) and not args.quick
    order = pipelines(reg, args.dataset, None)
    old = previous_rows(reg, args.dataset, results_root(args)) if partial else []
    merged = merge(old, results, order)
    default = choose_default(merged, args.dataset)
    best_union = choose_default(merged, args.dataset, union_key(args.dataset))
    checks: dict = {}
    if default and not args.no_sanity:
        checks |= sanity_and_cross_check(reg, args, default, x, y, budget)
    if default and args.holdout:
        checks["holdout"] = holdout(reg, args, default, budget)
    if best_union and args.holdout:
        checks["holdout_union"] = holdout(reg, args, best_union, budget, union=True)
    if args.quick:
        rows = merge([], results, order)
        return page_doc(args.dataset, info, rows, choose_default(rows, args.dataset), checks)
    return publish(args, reg, results, partial, info, checks)


def publish(args: argparse.Namespace, reg: Registry, rows: list[dict], partial: bool, info: dict,
            checks: dict) -> dict:  # fmt: skip
    """Write the run's folder in the results tree (its pipelines' rows and its checks), then the page and the
    measured figures from the newest row per pipeline. A run with --only or --defense measures some pipelines:
    the others' rows stay those of the runs that measured them."""
    root = results_root(args)
    run_dir = results.start_run(JOB, args.dataset, info, root)
    results.write_rows(run_dir, [{"row": "pipeline"} | {k: v for k, v in pack_flags(r).items()
                                                          if k != "evaluation"} for r in rows])  # fmt: skip
    results.write_rows(run_dir, [{"row": name} | cell for name, cell in checks.items()])
    doc = page_from_tree(reg, args.dataset, root)
    assert doc is not None
    from training import report

    report.write_robustness_page(reg, root, DOCS / "robustness.md")
    report.write_measured(args.models_dir, root)
    return doc


def results_root(args: argparse.Namespace) -> Path:
    return getattr(args, "results_dir", None) or results_dir(args.models_dir)


def sanity_and_cross_check(reg: Registry, args: argparse.Namespace, default: dict, x: torch.Tensor,
                           y: torch.Tensor, budget: Budget) -> dict:  # fmt: skip
    """The sanity checks on the default pipeline, and the service's own PGD against the reference APGD-CE."""
    p = Pipeline(reg, args.dataset, default["classifier"].split("/", 1)[1], default["defense"], args.device)
    norm, eps = STANDARD[args.dataset]
    n = min(args.sanity_n, len(x))
    path = _cache_path(p, norm, eps, ("sanity", "pgd-ours"), n, args.seed, budget, "correct", "")
    if path.exists():
        return json.loads(path.read_text())
    out: dict = {"sanity": {"pipeline": p.name, "threat": threat_key(norm, eps),
                            **sanity(p, x[:n], y[:n], norm, eps, args.seed, budget)}}  # fmt: skip
    ours = float((p.correct(adv := p.attack("pgd-ours", norm, eps, args.seed, budget)(x[:n], y[:n]), y[:n])
                  & within(adv, x[:n], norm, eps)).float().mean())  # fmt: skip
    out["cross_check"] = {"pipeline": p.name, "threat": threat_key(norm, eps), "n": n, "iters": budget.iters,
                          "ours": round(ours, 4), "reference": out["sanity"]["white_box_apgd_ce"]}  # fmt: skip
    if not args.quick:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
    return out


def holdout(reg: Registry, args: argparse.Namespace, pipeline: dict, budget: Budget, union: bool = False) -> dict:
    """A pipeline at the standard threat (or under the union) on held-out test images outside the committed slice
    (test indices 5,000 onwards), same attacks: a check that the slice was not what the figures fit."""
    arr = data.load(args.dataset)
    lo, hi = 5000, 5000 + args.holdout
    x = torch.from_numpy(data.to_float(arr["x_test"][lo:hi]))
    y = torch.from_numpy(arr["y_test"][lo:hi].astype(np.int64))
    p = Pipeline(reg, args.dataset, pipeline["classifier"].split("/", 1)[1], pipeline["defense"], args.device)
    attacks = attacks_for(p.defense, classes=p.classes)
    std = threat_key(*STANDARD[args.dataset])
    cells = {threat_key(norm, eps): worst_case(p, x, y, norm, eps, attacks, args.seed + 1, budget,
                                               images=f"test[{lo}:{hi}]")
             for norm, eps in (UNION[args.dataset] if union else (STANDARD[args.dataset],))}  # fmt: skip
    threat = union_key(args.dataset) if union else std
    cell = union_cell(cells, args.dataset) if union else cells[std]
    assert cell is not None
    return {"pipeline": p.name, "threat": threat, "test_indices": [lo, hi],
            "clean_correct": cells[std]["clean_correct"],
            **{k: v for k, v in cell.items() if k != "robust_flags"}}  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=data.dataset_name, required=True, help="mnist, fmnist or any prepared data set")
    p.add_argument("--n", type=int, default=1000, help="images for the robust-trained pipelines' standard threat")
    p.add_argument("--n-other", type=int, default=200, help="images for the robust-trained pipelines' other threats")
    p.add_argument("--n-baseline", type=int, default=100, help="images for the classifiers trained without attacks")
    p.add_argument("--defended-n", type=int, default=100, help="images for the cells behind the projection")
    p.add_argument("--defended-n-other", type=int, default=30, help="images for the other threats behind it")
    p.add_argument("--clean-n", type=int, default=2000, help="clean test images for the projected pipelines")
    p.add_argument("--sanity-n", type=int, default=100)
    p.add_argument(
        "--only",
        nargs="*",
        help="evaluate these classifiers only: their rows replace theirs on the page, the others stay",
    )
    p.add_argument("--defended", nargs="*", help="the classifiers to evaluate behind the projection")
    p.add_argument(
        "--defense",
        choices=("none", "invert-classify", "magnet"),
        help="evaluate the pipelines with this defense only (their rows replace theirs, as with --only)",
    )
    p.add_argument("--fab-targets", type=int, default=9, help="FAB-T's target classes (AutoAttack standard: 9)")
    p.add_argument(
        "--bare-attacks",
        nargs="+",
        default=list(BARE_ATTACKS),
        choices=BARE_ATTACKS,
        help="the attacks on bare classifiers, in order (default: AutoAttack standard's four)",
    )
    p.add_argument("--no-sanity", action="store_true")
    p.add_argument("--holdout", type=int, default=0, help="also attack the default on this many held-out test images")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, nothing written")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    add_device_option(p)
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    p.add_argument("--results-dir", type=Path, default=None, help="the results tree (default results/)")
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run(parse())
