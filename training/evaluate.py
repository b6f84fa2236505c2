"""Robustness evaluation: regenerate docs/results.md (Defense-GAN Tables 1 and 4, detector AUC, adaptive attacks).

    python -m training.evaluate --dataset mnist --n 1000            # the full tables (hours on CPU, see docs)
    python -m training.evaluate --dataset mnist --quick             # smoke test: a few dozen images, reduced L/R
    python -m training.evaluate --dataset mnist --n 100 --columns magnet   # one column; the others: newest rows
    python -m training.evaluate --dataset mnist --n 100 --rerender  # redraw the page from results/, measure nothing

For classifiers A–D, on the first n images of the committed test slice:
- white-box attacks computed on each column's own classifier (oblivious to the projection, as in the paper):
  FGSM ε=0.3, RAND+FGSM (ε=0.3, α=0.05), CW-L2 (Defense-GAN's cleverhans preset);
- black-box substitute attacks (Papernot et al.) for the pairs of Defense-GAN Table 1 (classifier/substitute);
- the MSE detector's ROC AUC per attack (reconstruction MSE of clean vs attacked inputs);
- adaptive attacks at the same L∞ budget, printed next to the oblivious rows: BPDA+EOT through the projection
  (PGD-40 on the classifiers that have no projection), and the latent-space ("overpowered") attack.
Columns: No attack, No defense, Defense-GAN-Orig (L=200, R=10 before the classifier trained on the images),
Defense-GAN-Rec (the same projection before classifier_<X>_rec, trained on reconstructions), encoder warm start
(the generator's recorded L, R, else L=25, R=1), Enhanced Invert-and-Classify (classifier_<X>_enhanced behind the
warm-start projection), and the adversarial-training baselines classifier_<X>_adv0.3 / _adv0.15
("not shipped" where absent).

Every accuracy is printed with n and a Wilson 95% interval as soon as it is measured. Projections are cached per
(dataset, input images, L, R, init, seed, generator and encoder weights) for the run (and on disk under
--cache-dir), so an input set shared by several classifiers or columns is projected once. The defense is
evaluated with a seed the attacker does not get (`seed + 1000`); the attacker's own pipeline uses `seed`.
Each run writes its folder under results/evaluate/<dataset>/ (its config and one row per cell it measured,
`training.eval_store`); the page shows per cell the newest row on the same n images, and `python -m training.report`
rebuilds it, and the headline figures /v1/models shows (`eval_clean_accuracy`, `eval_fixed_step_min`, `evaluation`,
in models/measured.json), from the results tree alone. `eval_fixed_step_min` is the lowest accuracy over these
paper-protocol and fixed-step attacks (FGSM, RAND+FGSM, BPDA+EOT PGD-40, latent): an upper bound on robustness, not a
robustness figure — the figures to trust are `training.robustness`'s (AutoAttack-grade, per-image worst case).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from pathlib import Path

import torch

import training.common as common
from service.nets import IMAGE_SHAPE
from service.registry import Registry
from training import data, eval_store, results
from training.common import command_line, git_commit, warm_config
from training.eval_page import render, write_page
from training.eval_paper import ORIG_STANDS_IN, paper_comparison
from training.eval_protocol import (
    ATTACK_NAMES,
    COLUMNS,
    PAPER,
    SECTIONS,
    Cell,
    Settings,
    auc_ci,
    from_json,
    quick_settings,
    to_json,
)
from training.eval_sections import Evaluation

ROOT = Path(__file__).resolve().parent.parent
# the budgets a run records in its config (the page states them)
RUN_SETTINGS = ("adaptive_n", "eot_samples", "pgd_steps", "pgd_alpha", "latent_steps", "attacker_steps",
                "attacker_restarts", "adaptive_classifiers", "cw", "substitute")  # fmt: skip
__all__ = [
    "ATTACK_NAMES",
    "COLUMNS",
    "ORIG_STANDS_IN",
    "PAPER",
    "Cell",
    "Evaluation",
    "Settings",
    "auc_ci",
    "paper_comparison",
]  # what the tests and the report use by this module's name


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} CPUs, {dev}; torch {torch.__version__} with {torch.get_num_threads()} "
            f"thread(s); Python {platform.python_version()}")  # fmt: skip


def load_holdout(dataset: str, n_needed: int, size: int) -> torch.Tensor | None:
    """The substitute's seed images: the last `size` test images (outside the slice), else the slice's tail; None
    (the black-box rows skipped) for images other than MNIST's 1×28×28, which the substitutes are built for."""
    shape = data.spec(dataset).shape
    if shape != IMAGE_SHAPE:
        print(f"black-box rows skipped: the substitutes (service.attacks.train_substitute) are built for 1×28×28 "
              f"images, {dataset}'s are {'×'.join(map(str, shape))}", flush=True)  # fmt: skip
        return None
    try:
        x = data.load(dataset)["x_test"][-size:]
    except data.DataError:
        xs, _ = common.eval_slice(dataset)
        if n_needed + size > len(xs):
            print(f"warning: data/{dataset}.npz missing and n + {size} > {len(xs)}: black-box rows skipped")
            return None
        x = xs[-size:]
    return torch.from_numpy(data.to_float(x))


def example_figure(ev: Evaluation, path: Path) -> bool:
    """Clean images, FGSM on classifier A, and the Defense-GAN reconstructions of both (rows of 10)."""
    adv = ev.adv_cache.get(("fgsm", ev.key("A", "none"), len(ev.x)))
    if adv is None or ev.G is None:
        return False
    k = min(10, len(ev.x))
    rec_clean, _ = ev.project(ev.x, ev.s.rec, "figure")
    rec_adv, _ = ev.project(adv, ev.s.rec, "figure")
    common.save_grid(torch.cat([ev.x[:k], rec_clean[:k], adv[:k], rec_adv[:k]]), path, nrow=k)
    return True


def settings_for(args: argparse.Namespace, reg: Registry) -> Settings:
    """The run's Settings: --quick's or the defaults, the warm start the generator records, the flags given."""
    s = quick_settings() if args.quick else Settings()
    if not args.quick and reg.has(f"{args.dataset}/generator"):
        s.warm = warm_config(reg, args.dataset)
    for name in ("n", "adaptive_n", "eot_samples", "pgd_steps", "latent_steps", "attacker_steps",
                 "attacker_restarts", "batch"):  # fmt: skip
        if getattr(args, name, None) is not None:
            setattr(s, name, getattr(args, name))
    if args.steps is not None or args.restarts is not None:
        s.rec = s.rec.with_(steps=args.steps, restarts=args.restarts)
    if args.adaptive_classifiers:
        s.adaptive_classifiers = tuple(a.strip().upper() for a in args.adaptive_classifiers.split(",") if a.strip())
    return s


def results_dir(args: argparse.Namespace) -> Path:
    """Where the run's rows go: --results-dir, else the models folder's results tree (`common.results_dir`)."""
    return args.results_dir or common.results_dir(args.models_dir, args.quick)


def previous_view(args: argparse.Namespace, n: int) -> dict:
    """The newest cells on the same n images, which a --columns or --rerender run reuses."""
    if not (args.columns or args.rerender):
        return {}
    found = eval_store.view(args.dataset, results_dir(args), n, args.quick)
    if found is None:
        raise SystemExit(f"--columns reuses the other columns from {results_dir(args)}/{eval_store.job(args.quick)}/"
                         f"{args.dataset}, which holds no run on n={n} (a --columns run must use the same n): run "
                         "without it")  # fmt: skip
    return found


def measure(ev: Evaluation, args: argparse.Namespace) -> None:
    print(f"evaluating {args.dataset} on n={len(ev.x)} ({'quick' if args.quick else 'full'}); generator: "
          f"{ev.G is not None}, encoder: {ev.E is not None}; classifiers: {ev.reg.classifiers(args.dataset)}",
          flush=True)  # fmt: skip
    ev.run_clean()
    if "whitebox" in args.sections:
        ev.run_whitebox()
    if "blackbox" in args.sections:
        ev.run_blackbox()
    if "adaptive" in args.sections and ev.G is not None:
        ev.run_adaptive()
    ev.run_detector()


def run_info(ev: Evaluation, args: argparse.Namespace, out: Path, t0: float, has_fig: bool, fig: Path) -> dict:
    """The run's config: command, machine, commit, date, cost, what it measured."""
    elapsed = time.time() - t0
    reused = (f", plus {ev.cached_seconds / 60:.1f} min of work reused from earlier runs' cache (total "
              f"{(elapsed + ev.cached_seconds) / 60:.1f} min)" if ev.cached_seconds else "")  # fmt: skip
    return {
        "command": command_line(), "machine": machine(), "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": bool(args.quick),
        "duration": f"{elapsed / 60:.1f} min this run{reused}",
        "n": ev.s.n, "projections_run": ev.projections_run, "projections_reused": ev.projections_reused,
        "cached_seconds": round(ev.cached_seconds, 1),
        "figure": str(fig.relative_to(out.parent)) if has_fig else None,
        "page": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
        "columns": sorted(ev.columns, key=list(COLUMNS).index),
        "sections": sorted(args.sections),
        "settings": {k: getattr(ev.s, k) for k in RUN_SETTINGS},
    }  # fmt: skip


def from_tree(reg: Registry, dataset: str, root: Path, quick: bool = False, n: int | None = None
              ) -> tuple[Evaluation, dict] | None:  # fmt: skip
    """The Evaluation holding the newest cell of each kind recorded in the results tree (on `n` images, default the
    newest run's), and the page's doc; None where no run was recorded."""
    doc = eval_store.view(dataset, root, n, quick)
    if doc is None:
        return None
    s = quick_settings() if quick else Settings()
    if not quick and reg.has(f"{dataset}/generator"):
        s.warm = warm_config(reg, dataset)
    s.n = doc["info"]["n"]
    for k, v in doc["info"].get("settings", {}).items():  # the newest run's budgets, as its page states them
        setattr(s, k, tuple(v) if isinstance(v, list) else v)
    ev = Evaluation(reg, dataset, s, columns=set(), previous=doc["results"])
    ev.results = {group: from_json(cells) for group, cells in doc["results"].items()}
    return ev, doc


def redraw(reg: Registry, dataset: str, root: Path, out: Path, quick: bool = False, n: int | None = None
           ) -> tuple[Evaluation, dict] | None:  # fmt: skip
    """Draw the dataset's block of the page `out` from the results tree alone (`from_tree`)."""
    found = from_tree(reg, dataset, root, quick, n)
    if found is not None:
        write_page(out, dataset, render(found[0], found[1]["info"]), quick)
    return found


def run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    reg = Registry(args.models_dir)
    s = settings_for(args, reg)
    out: Path = args.out or ROOT / "docs" / ("results-quick.md" if args.quick else "results.md")
    root = results_dir(args)
    if not args.rerender:
        prev = previous_view(args, s.n)
        holdout = load_holdout(args.dataset, s.n, s.substitute["holdout"]) if "blackbox" in args.sections else None
        cache_dir = args.cache_dir or (None if args.quick or args.no_cache else ROOT / "runs" / args.dataset /
                                       "eval_cache")  # fmt: skip
        ev = Evaluation(reg, args.dataset, s, seed=args.seed, cache_dir=cache_dir, holdout=holdout,
                        columns=args.columns, previous=prev.get("results"))  # fmt: skip
        for group in set(SECTIONS) - args.sections:  # a section not run keeps the previous one's
            ev.results[group] = from_json(prev.get("results", {}).get(group, {}))
        measure(ev, args)
        fig = out.parent / "figures" / f"{out.stem}-{args.dataset}-examples.png"
        has_fig = example_figure(ev, fig) if "rec" in ev.columns else fig.exists()  # the figure shows the rec column
        info = run_info(ev, args, out, t0, has_fig, fig)
        run_dir = results.start_run(eval_store.job(args.quick), args.dataset, info, root)
        groups = args.sections | {"clean", "detector", "cw_l2", "substitutes"}
        results.write_rows(run_dir, eval_store.rows_of(to_json(ev, info)["results"], ev.columns, groups))
        print(f"wrote {run_dir}", flush=True)
    drawn = redraw(reg, args.dataset, root, out, args.quick, s.n)
    assert drawn is not None
    if (args.record if args.record is not None else not args.quick) and not args.rerender:
        from training import report

        report.write_measured(args.models_dir, root, quick=args.quick)
    print(f"wrote {out} in {(time.time() - t0) / 60:.1f} min", flush=True)
    return drawn[1]


# the protocol's knobs: flag → (type, help); unset, the Settings' default (or --quick's) holds
KNOBS: dict[str, tuple[type, str]] = {
    "--n": (int, "first n test images (default 1000 = the slice; up to 9850 needs data/<ds>.npz; quick 24)"),
    "--steps": (int, "Defense-GAN's L (default 200)"),
    "--restarts": (int, "Defense-GAN's R (default 10)"),
    "--adaptive-n": (int, "images for the adaptive rows (default 100)"),
    "--adaptive-classifiers": (str, "comma list (default A,B,C,D; quick A)"),
    "--eot-samples": (int, "EOT draws per step (default 8)"),
    "--pgd-steps": (int, "BPDA/PGD steps (default 40)"),
    "--latent-steps": (int, "latent attack steps (default 200)"),
    "--attacker-steps": (int, "L of the adaptive attacker's own passes through Defense-GAN (default: the defense's)"),
    "--attacker-restarts": (int, "R of those passes (default: the defense's)"),
    "--batch": (int, "images per projection batch (default 16)"),
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=data.dataset_name, required=True, help="mnist, fmnist or any prepared data set")
    p.add_argument("--quick", action="store_true", help="smoke run: few images, reduced L/R/iterations")
    for flag, (kind, help_) in KNOBS.items():
        p.add_argument(flag, type=kind, default=None, help=help_)
    p.add_argument("--models-dir", type=Path, default=common.MODELS_DIR)
    p.add_argument("--out", type=Path, default=None, help="page (default docs/results.md; quick: results-quick.md)")
    p.add_argument("--sections", type=lambda v: set(v.split(",")), default=set(SECTIONS),
                   help="comma list of whitebox, blackbox, adaptive (clean and detector always run)")  # fmt: skip
    p.add_argument("--columns", type=lambda v: {c for c in v.split(",") if c}, default=None,
                   help=f"measure only these columns ({', '.join(COLUMNS)}); the others: the newest recorded cells "
                   "on the same n")  # fmt: skip
    p.add_argument("--rerender", action="store_true", help="measure nothing: redraw the page from the results tree")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=common.env_threads() or 1)
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="projections and attacks cached (default runs/<ds>/eval_cache; quick: none unless given)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk cache")
    p.add_argument(
        "--results-dir",
        type=Path,
        default=None,
        help="the results tree of the run's folder (default results/; quick: runs/results)",
    )
    rec = p.add_mutually_exclusive_group()
    rec.add_argument("--record", dest="record", action="store_true", default=None,
                     help="rebuild models/measured.json, what /v1/models shows (default for full runs)")  # fmt: skip
    rec.add_argument("--no-record", dest="record", action="store_false")
    args = p.parse_args(argv)
    if args.columns and not args.columns <= set(COLUMNS):
        unknown = ", ".join(sorted(args.columns - set(COLUMNS)))
        p.error(f"--columns: unknown {unknown}; choose from {', '.join(COLUMNS)}")
    return args


if __name__ == "__main__":
    run(parse())
