"""Robustness evaluation: regenerate docs/results.md (Defense-GAN Tables 1 and 4, detector AUC, adaptive attacks).

    python -m training.evaluate --dataset mnist --n 1000            # the full tables (hours on CPU, see docs)
    python -m training.evaluate --dataset mnist --quick             # smoke test: a few dozen images, reduced L/R
    python -m training.evaluate --dataset mnist --n 100 --columns magnet   # one column; the others from the JSON
    python -m training.evaluate --dataset mnist --n 100 --rerender  # redraw the page from its JSON, measure nothing

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
Headline figures go into models/manifest.json metrics (`eval_clean_accuracy`, `eval_fixed_step_min`,
`evaluation`). `eval_fixed_step_min` is the lowest accuracy over these paper-protocol and fixed-step attacks
(FGSM, RAND+FGSM, BPDA+EOT PGD-40, latent): an upper bound on robustness, not a robustness figure — the figures
to trust are `training.robustness`'s (AutoAttack-grade, per-image worst case: `metrics.robustness`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import training.common as common
from service.attacks import Defended, Reformed, cw_defense_gan, eot, fgsm, latent, pgd, rand_fgsm, train_substitute
from service.purify import ProjectionConfig, project, roc_auc
from service.registry import Registry
from training import data
from training.common import command_line, git_commit, record_metrics, warm_config
from training.eval_generator import wilson

ROOT = Path(__file__).resolve().parent.parent
CLASSIFIERS = ("A", "B", "C", "D")
PAIRS = (("A", "B"), ("A", "E"), ("B", "B"), ("B", "E"), ("C", "B"), ("C", "E"), ("D", "B"), ("D", "E"))
EPS = 0.3
HOLDOUT = 150  # the substitute's seed images: the last test images, never evaluated
SECTIONS = ("whitebox", "blackbox", "adaptive")  # --sections (clean and detector always run)
# column id → (header, service defense name used in the manifest)
COLUMNS: dict[str, tuple[str, str]] = {
    "none": ("No defense", "none"),
    "rec": ("Defense-GAN-Orig", "defense-gan"),
    "rectrained": ("Defense-GAN-Rec", "defense-gan"),
    "magnet": ("MagNet", "magnet"),
    "warm": ("Encoder warm start", "invert-classify"),
    "enhanced": ("Enhanced INC", "enhanced-invert-classify"),
    "adv0.3": ("Adv. tr. ε=0.3", "none"),
    "adv0.15": ("Adv. tr. ε=0.15", "none"),
}
# Defense-GAN (Samangouei et al. 2018) Tables 1 and 4, transcribed in the team's shared/PAPER_TABLES.md: per
# (dataset, attack, classifier[/substitute]) the paper's figure per column ("clean": no attack, "none": no defense,
# "rec": Defense-GAN-Rec, "orig": Defense-GAN-Orig, "magnet": MagNet, "adv0.3"/"adv0.15": adversarial training).
_T1 = ("clean", "none", "rec", "orig", "magnet", "adv0.3", "adv0.15")
_T4 = ("clean", "none", "rec", "magnet", "adv0.3")
PAPER: dict[tuple[str, str, str], dict[str, float]] = {
    **{("mnist", "substitute", pair): dict(zip(_T1, row, strict=True)) for pair, row in {
        "A/B": (0.9970, 0.6343, 0.9312, 0.9282, 0.6937, 0.9654, 0.6223),
        "A/E": (0.9970, 0.5432, 0.9139, 0.9221, 0.6710, 0.9668, 0.9327),
        "B/B": (0.9618, 0.2816, 0.9057, 0.9105, 0.5687, 0.2092, 0.3441),
        "B/E": (0.9618, 0.2128, 0.8841, 0.8892, 0.4627, 0.1120, 0.3354),
        "C/B": (0.9959, 0.6648, 0.9357, 0.9322, 0.7571, 0.9834, 0.9208),
        "C/E": (0.9959, 0.8050, 0.9223, 0.9182, 0.6760, 0.9843, 0.9755),
        "D/B": (0.9920, 0.4641, 0.9272, 0.9323, 0.6817, 0.7667, 0.8514),
        "D/E": (0.9920, 0.3931, 0.9164, 0.9155, 0.6073, 0.7676, 0.7129)}.items()},
    **{(ds, attack, arch): dict(zip(_T4, row, strict=True)) for (ds, attack), rows in {
        ("mnist", "fgsm"): {"A": (0.997, 0.217, 0.988, 0.191, 0.651), "B": (0.962, 0.022, 0.956, 0.082, 0.060),
                            "C": (0.996, 0.331, 0.989, 0.163, 0.786), "D": (0.992, 0.038, 0.980, 0.094, 0.732)},
        ("mnist", "rand-fgsm"): {"A": (0.997, 0.179, 0.988, 0.171, 0.774), "B": (0.962, 0.017, 0.944, 0.091, 0.138),
                                 "C": (0.996, 0.103, 0.985, 0.151, 0.907), "D": (0.992, 0.050, 0.980, 0.115, 0.539)},
        ("mnist", "cw"): {"A": (0.997, 0.141, 0.989, 0.038, 0.077), "B": (0.962, 0.032, 0.916, 0.034, 0.280),
                          "C": (0.996, 0.126, 0.989, 0.025, 0.031), "D": (0.992, 0.032, 0.983, 0.021, 0.010)},
        ("fmnist", "fgsm"): {"A": (0.934, 0.102, 0.879, 0.089, 0.797), "B": (0.747, 0.102, 0.629, 0.168, 0.136),
                             "C": (0.933, 0.139, 0.896, 0.110, 0.804), "D": (0.892, 0.082, 0.875, 0.099, 0.698)},
        ("fmnist", "rand-fgsm"): {"A": (0.934, 0.102, 0.888, 0.096, 0.447), "B": (0.747, 0.131, 0.661, 0.161, 0.119),
                                  "C": (0.933, 0.105, 0.893, 0.112, 0.699), "D": (0.892, 0.091, 0.862, 0.104, 0.626)},
        ("fmnist", "cw"): {"A": (0.934, 0.076, 0.896, 0.060, 0.157), "B": (0.747, 0.172, 0.656, 0.131, 0.118),
                           "C": (0.933, 0.063, 0.896, 0.084, 0.107), "D": (0.892, 0.090, 0.875, 0.069, 0.149)},
    }.items() for arch, row in rows.items()},
}  # fmt: skip
# Why one cell of another column differs (measured; the page named)
WHY_CELL: dict[tuple[str, str, str, str], str] = {
    ("mnist", "fgsm", "A", "adv0.3"): "our FGSM-trained A masks its gradient: white-box FGSM fools it on 2.0% of "
    "1,000 images, FGSM transferred from the standard A on 44.3% (docs/advgan.md)",
    ("mnist", "fgsm", "C", "adv0.3"): "our FGSM-trained C masks its gradient: white-box FGSM fools it on 1.0% of "
    "1,000 images, FGSM transferred from the standard A on 26.7% (docs/advgan.md)",
}


def full_test_why(ev: Evaluation, arch: str, paper: float) -> str:
    """Why a No-attack cell differs: the bare classifier's accuracy on the whole test set (its manifest entry), which
    tells a real difference from sampling error on the first n images."""
    key = f"{ev.ds}/classifier_{arch}"
    m = ev.reg.get(key).metrics if ev.reg.has(key) else {}
    if "clean_test_accuracy" not in m:
        return ""
    full, n = m["clean_test_accuracy"], m.get("test_images", 10000)
    if abs(full - paper) <= 0.02:
        return f"sampling error: our {arch} scores {full:.4f} on all {n:,} test images (manifest), within 2 points"
    return f"our {arch} scores {full:.4f} on all {n:,} test images (manifest): the two trained classifiers differ"


def transfer_why(ev: Evaluation, pair: str) -> str:
    """Why a Table 1 Defense-GAN cell is far from the paper's: whether our substitute's FGSM transfers no more
    strongly than the paper's (then the gap is the projection's) or more (then the pair does not compare)."""
    none = (ev.results["blackbox"].get(pair) or {}).get("none")
    if not (isinstance(none, dict) and "cell" in none):
        return ""
    cell, paper = none["cell"], PAPER[(ev.ds, "substitute", pair)]["none"]
    ours, iters = cell.acc, ev.reg.get(f"{ev.ds}/generator").raw.get("training", {}).get("iterations", "?")
    told = f"(No defense: ours {ours:.2f}, paper {paper:.2f})"
    if ours >= paper - 0.02 or cell.ci[0] <= paper <= cell.ci[1]:  # as strong at most, or not told apart
        return (
            f"our substitute's FGSM fools the bare classifier no more than the paper's, or not told apart {told}, "
            f"so the gap is the projection's: the paper's generator (200k WGAN-GP iterations) removes transferred "
            f"FGSM noise that ours ({iters} CPU iterations) keeps (docs/evaluation.md)"
        )
    return f"our substitute's FGSM fools the bare classifier more than the paper's {told}: the defenses do not compare"


def zero_gradient_why(r: dict, arch: str) -> str:
    """Why a Table 4 Defense-GAN cell is far from the paper's: the official code attacks through a reconstruction
    that passes no gradient, so its figure is a clean-reconstruction accuracy; ours on clean images beside it."""
    row = r["clean"].get(arch) or {}
    clean = next((v for c in ("rectrained", "rec") if isinstance(v := row.get(c), dict) and "cell" in v), None)
    ours = f"; ours on clean images through the same projection: {clean['cell'].fmt()}" if clean else ""
    return (
        "the paper's attack ran through a reconstruction with zero gradient (official repo issue #14), so its "
        f"images are the clean ones and its figure a clean-reconstruction accuracy (docs/generator.md){ours}"
    )


# -- bookkeeping ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """k correct out of n, with its Wilson 95% interval."""

    k: int
    n: int

    @property
    def acc(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def ci(self) -> tuple[float, float]:
        return wilson(self.k, self.n)

    def fmt(self) -> str:
        lo, hi = self.ci
        return f"{self.acc:.3f} [{lo:.3f}, {hi:.3f}]"

    def as_json(self) -> dict:
        lo, hi = self.ci
        return {"k": self.k, "n": self.n, "acc": round(self.acc, 4), "ci95": [round(lo, 4), round(hi, 4)]}


def auc_ci(auc: float, n_neg: int, n_pos: int, z: float = 1.96) -> tuple[float, float]:
    """Hanley–McNeil (1982) 95% interval of a ROC AUC from n_neg negatives and n_pos positives."""
    if n_neg == 0 or n_pos == 0:
        return (0.0, 1.0)
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    h = z * math.sqrt(max(var, 0.0))
    return (max(0.0, auc - h), min(1.0, auc + h))


def digest(x: torch.Tensor) -> str:
    return hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


# -- settings ---------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Everything that sets the cost and the protocol; --quick shrinks it."""

    n: int = 1000
    adaptive_n: int = 100
    rec: ProjectionConfig = field(default_factory=ProjectionConfig)
    warm: ProjectionConfig = field(default_factory=lambda: ProjectionConfig(init="encoder", steps=25, restarts=1))
    cw: dict = field(default_factory=dict)  # overrides of the Defense-GAN CW preset
    substitute: dict = field(default_factory=lambda: {"rounds": 6, "epochs": 10, "holdout": HOLDOUT})
    pgd_steps: int = 40
    pgd_alpha: float = 0.01
    eot_samples: int = 8
    latent_steps: int = 200
    latent_check: int = 50
    # projection L, R the adaptive attacker runs in its own passes through Defense-GAN (None: the defense's);
    # the warm start is cheap, so its attacker always runs the defense's own L, R
    attacker_steps: int | None = None
    attacker_restarts: int | None = None
    adaptive_classifiers: tuple[str, ...] = CLASSIFIERS
    batch: int = 16


def quick_settings() -> Settings:
    return Settings(
        n=24, adaptive_n=6, rec=ProjectionConfig(steps=10, restarts=2),
        warm=ProjectionConfig(init="encoder", steps=5, restarts=1), cw={"steps": 10},
        substitute={"rounds": 2, "epochs": 2, "holdout": 20}, pgd_steps=3, pgd_alpha=0.1, eot_samples=2,
        latent_steps=4, latent_check=2, adaptive_classifiers=("A",), batch=24,
    )  # fmt: skip


# -- the evaluator ----------------------------------------------------------------------------------------------
class Evaluation:
    """Holds the models, the images, the caches and the results of one run."""

    def __init__(self, reg: Registry, dataset: str, s: Settings, seed: int = 0, cache_dir: Path | None = None,
                 holdout: torch.Tensor | None = None, columns: set[str] | None = None,
                 previous: dict | None = None) -> None:  # fmt: skip
        self.reg, self.ds, self.s, self.seed = reg, dataset, s, seed
        # the columns this run measures; the others are the previous run's (results JSON), or "not measured"
        self.columns, self.previous = set(COLUMNS if columns is None else columns), previous or {}
        self.cache_dir = cache_dir
        xs, ys = data.load_slice(dataset)
        if s.n > len(xs):  # the slice is the first 1,000 test images; beyond it, the test set minus the 150 seeds
            a = data.load(dataset)
            s.n = min(s.n, len(a["x_test"]) - HOLDOUT)
            xs, ys = a["x_test"], a["y_test"]
        self.x = torch.from_numpy(data.to_float(xs[: s.n]))
        self.y = torch.from_numpy(ys[: s.n].astype(np.int64))
        self.holdout = holdout
        self.G = reg.generator(dataset) if reg.has(f"{dataset}/generator") else None
        self.E = reg.encoder(dataset)
        self.M = reg.magnet(dataset) if reg.has(f"{dataset}/magnet") else None
        self.M_thresholds = reg.magnet_thresholds(dataset) if self.M is not None else (0.0, 0.0)
        self.proj_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.adv_cache: dict[tuple, torch.Tensor] = {}
        self.cached_seconds = 0.0  # compute time of the cache entries this run reused
        self.results: dict = {"clean": {}, "whitebox": {}, "blackbox": {}, "adaptive": {}, "detector": {},
                              "cw_l2": {}, "substitutes": dict(self.previous.get("substitutes", {}))}  # fmt: skip
        self.projections_run = 0
        self.projections_reused = 0

    # -- models ---------------------------------------------------------------------------------------------------
    def key(self, arch: str, col: str) -> str | None:
        """The classifier a column uses for row `arch`, or None when it is not shipped."""
        name = {"adv0.3": f"classifier_{arch}_adv0.3", "adv0.15": f"classifier_{arch}_adv0.15",
                "enhanced": f"classifier_{arch}_enhanced", "rectrained": f"classifier_{arch}_rec"
                }.get(col, f"classifier_{arch}")  # fmt: skip
        return f"{self.ds}/{name}" if self.reg.has(f"{self.ds}/{name}") else None

    def missing(self) -> list[str]:
        """Models a column needs that the registry lacks."""
        names = {"none": "classifier_{}", "adv0.3": "classifier_{}_adv0.3", "adv0.15": "classifier_{}_adv0.15",
                 "enhanced": "classifier_{}_enhanced", "rectrained": "classifier_{}_rec"}  # fmt: skip
        out = [f"{self.ds}/{n.format(a)}" for a in CLASSIFIERS for c, n in names.items() if self.key(a, c) is None]
        out += [f"{self.ds}/{k}" for k in ("generator", "encoder") if not self.reg.has(f"{self.ds}/{k}")]
        return out

    def projection(self, col: str) -> ProjectionConfig | None:
        """The projection a column puts in front of its classifier (None: no projection)."""
        if col in ("rec", "rectrained"):
            return self.s.rec if self.G is not None else None
        if col in ("warm", "enhanced"):
            if self.G is None:
                return None
            return self.s.warm if self.E is not None else (self.s.rec if col == "enhanced" else None)
        return None

    def unavailable(self, arch: str, col: str) -> str | None:
        """Why a column cannot be measured for this row, or None."""
        if self.key(arch, col) is None:
            return "not shipped"
        if col in ("rec", "rectrained", "warm", "enhanced") and self.G is None:
            return "no generator"
        if col == "warm" and self.E is None:
            return "no encoder"
        if col == "magnet" and self.M is None:
            return "no MagNet"
        return None

    def reused(self, path: tuple[str, ...], arch: str, col: str) -> object:
        """The previous run's cell at results[path][col] (for a column this run does not measure); "not measured"
        where it has none, or only a reason that no longer holds (a model shipped since)."""
        node: object = self.previous
        for k in path:
            node = node.get(k) if isinstance(node, dict) else None
        v = node.get(col) if isinstance(node, dict) else None
        if v is None or (isinstance(v, str) and v != "n/a" and self.unavailable(arch, col) is None):
            return "not measured"
        return from_json(v)

    # -- projection with cache -----------------------------------------------------------------------------------
    def cached(self, kind: str, key: tuple, compute: Callable[[], tuple[dict[str, torch.Tensor], dict[str, str]]]
               ) -> tuple[dict[str, torch.Tensor], dict[str, str], bool]:  # fmt: skip
        """compute() → (tensors, metadata) once per key, kept on disk under --cache-dir with the seconds it took;
        returns them and whether they were reused. A reuse adds its seconds to `cached_seconds`, so the page can
        state the whole run's compute time."""
        f = self.cache_dir / f"{kind}-{hashlib.sha1(repr(key).encode()).hexdigest()[:20]}.safetensors" \
            if self.cache_dir else None  # fmt: skip
        if f is not None and f.exists():
            with safe_open(str(f), "pt") as h:
                meta = dict(h.metadata() or {})
                tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            self.cached_seconds += float(meta.get("seconds", 0))
            return tensors, meta, True
        t0 = time.time()
        tensors, meta = compute()
        meta = {**meta, "seconds": f"{time.time() - t0:.1f}"}
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(f), metadata=meta)
        return tensors, meta, False

    def project(self, x: torch.Tensor, cfg: ProjectionConfig, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(G(z*), MSE) of x under the defense's projection (seed + 1000), cached in memory and on disk."""
        assert self.G is not None
        G = self.G
        seed = self.seed + 1000
        k = (self.ds, digest(x), cfg.steps, cfg.restarts, cfg.init, cfg.lr, seed, *self.purifier_shas(cfg))
        if k in self.proj_cache:
            self.projections_reused += 1
            return self.proj_cache[k]

        def compute() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
            t0, imgs, mses = time.time(), [], []
            for i in range(0, len(x), self.s.batch):
                p = project(x[i : i + self.s.batch], G, cfg, encoder=self.E if cfg.init == "encoder" else None,
                            seed=seed)  # fmt: skip
                imgs.append(p.images)
                mses.append(p.mse)
                if len(x) > self.s.batch and (i // self.s.batch) % 8 == 7:
                    print(f"      projecting {what}: {i + len(p.images)}/{len(x)} ({time.time() - t0:.0f}s)",
                          flush=True)  # fmt: skip
            return {"images": torch.cat(imgs), "mse": torch.cat(mses)}, {}

        t, _, reused = self.cached("proj", k, compute)
        if reused:
            self.projections_reused += 1
        else:
            self.projections_run += 1
        self.proj_cache[k] = (t["images"], t["mse"])
        return self.proj_cache[k]

    @torch.no_grad()
    def correct(self, clf: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image correctness (bool, N) of clf's argmax."""
        return torch.cat([clf(x[i : i + 500]).argmax(1) == y[i : i + 500] for i in range(0, len(x), 500)])

    def measure(self, arch: str, col: str, adv: torch.Tensor, y: torch.Tensor, label: str) -> dict:
        """Accuracy of column `col` of row `arch` on `adv` (projected first where the column projects)."""
        t0 = time.time()
        clf = self.reg.module(self.key(arch, col))  # type: ignore[arg-type]
        cfg = self.projection(col)
        out: dict = {}
        flagged = None
        if cfg is not None:
            images, mse = self.project(adv, cfg, f"{label} {COLUMNS[col][0]}")
            out["mse"] = mse
            det = self.reg.detector(self.ds, cfg.init)
            flagged = mse > det.threshold if det is not None else None
        elif col == "magnet":  # MagNet's reformer, and either of its detectors over its threshold
            pipeline = self.magnet_pipeline(clf)
            with torch.no_grad():
                images = torch.cat([pipeline.purify(adv[i : i + 500]) for i in range(0, len(adv), 500)])
                flagged = pipeline.excess(adv, images) > 0
            out["mse"] = (adv - images).pow(2).flatten(1).mean(1)
        else:
            images = adv
        correct = self.correct(clf, images, y)
        cell = Cell(int(correct.sum()), len(y))
        out["cell"], out["correct"] = cell, correct
        if flagged is not None:  # the column's detector at its calibrated threshold: flagged, and correct-or-flagged
            out["flagged"] = Cell(int(flagged.sum()), len(y))
            out["defended"] = Cell(int((correct | flagged).sum()), len(y))
        print(f"    {label:<34} {COLUMNS[col][0]:<20} acc {cell.k:>4}/{cell.n:<4} = {cell.fmt()}  "
              f"({time.time() - t0:.1f}s)", flush=True)  # fmt: skip
        return out

    def magnet_pipeline(self, clf: nn.Module) -> Reformed:
        assert self.M is not None
        return Reformed(clf, self.M, self.M_thresholds)

    def magnet_pgd(self, model_key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD through classifier ∘ MagNet's reformer (its exact gradient), cached on disk."""
        model = self.magnet_pipeline(self.reg.module(model_key))
        gen = torch.Generator().manual_seed(self.seed)
        params = ("magnet-pgd", self.model_sha(model_key), self.model_sha(f"{self.ds}/magnet"), self.s.pgd_steps,
                  self.s.pgd_alpha, self.seed, digest(x), digest(y))  # fmt: skip

        def compute() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
            return {"adv": pgd(model, x, y, eps=EPS, alpha=self.s.pgd_alpha, steps=self.s.pgd_steps, generator=gen)}, {}

        return self.cached("whitebox", params, compute)[0]["adv"]

    # -- attacks --------------------------------------------------------------------------------------------------
    def attack_model_key(self, arch: str, col: str) -> str:
        """The classifier an oblivious attack differentiates for this column (its own bare classifier)."""
        return self.key(arch, col) or ""

    def purifier_shas(self, cfg: ProjectionConfig) -> tuple[str, ...]:
        """The weights a projection with `cfg` runs (generator, and encoder for a warm start): part of every cache
        key of a projection or of an attack through one, so a retrained generator is never served stale results."""
        shas = (self.model_sha(f"{self.ds}/generator"),)
        return shas + (self.model_sha(f"{self.ds}/encoder"),) if cfg.init == "encoder" else shas

    def model_sha(self, model_key: str) -> str:
        return self.reg.get(model_key).files["weights"]["sha256"][:16]

    def whitebox_adv(self, attack: str, model_key: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = (attack, model_key, len(x))
        if k in self.adv_cache:
            return self.adv_cache[k]
        m = self.reg.module(model_key)
        gen = torch.Generator().manual_seed(self.seed)

        def compute() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
            if attack == "fgsm":
                adv = fgsm(m, x, y, eps=EPS)
            elif attack == "rand-fgsm":
                adv = rand_fgsm(m, x, y, eps=EPS, alpha=0.05, generator=gen)
            elif attack == "cw":
                adv = torch.cat([cw_defense_gan(m, x[i : i + 250], y[i : i + 250], **self.s.cw)
                                 for i in range(0, len(x), 250)])  # fmt: skip
            elif attack == "pgd":
                adv = pgd(m, x, y, eps=EPS, alpha=self.s.pgd_alpha, steps=self.s.pgd_steps, generator=gen)
            else:
                raise ValueError(attack)
            return {"adv": adv}, {}

        params = (attack, self.model_sha(model_key), sorted(self.s.cw.items()), self.s.pgd_steps, self.s.pgd_alpha,
                  self.seed, digest(x), digest(y))  # fmt: skip
        self.adv_cache[k] = self.cached("whitebox", params, compute)[0]["adv"]
        return self.adv_cache[k]

    def substitute_adv(self, oracle_key: str, sub_arch: str) -> torch.Tensor:
        """FGSM on a substitute of `sub_arch` trained by querying `oracle_key` (Papernot et al.), cached on disk."""
        k = ("substitute", oracle_key, sub_arch)
        if k in self.adv_cache:
            return self.adv_cache[k]
        assert self.holdout is not None
        holdout, p = self.holdout, self.s.substitute

        def compute() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
            sub = train_substitute(self.reg.module(oracle_key), holdout, arch=sub_arch, rounds=p["rounds"],
                                   epochs=p["epochs"], seed=self.seed)  # fmt: skip
            stats = {"oracle_queries": sub.oracle_queries, "training_points": sub.training_points,
                     "agreement": round(sub.agreement, 4)}  # fmt: skip
            return {"adv": fgsm(sub.model, self.x, self.y, eps=EPS)}, {"stats": json.dumps(stats)}

        params = ("substitute", self.model_sha(oracle_key), sub_arch, sorted(p.items()), self.seed, digest(holdout),
                  digest(self.x), digest(self.y))  # fmt: skip
        tensors, meta, _ = self.cached("substitute", params, compute)
        stats = {**json.loads(meta["stats"]), "seconds": float(meta["seconds"])}
        self.results["substitutes"][f"{oracle_key}/{sub_arch}"] = stats
        print(f"    substitute {sub_arch} of {oracle_key}: {stats['training_points']} points, "
              f"{stats['oracle_queries']} queries, agreement {stats['agreement']:.3f} ({stats['seconds']:.1f}s)",
              flush=True)  # fmt: skip
        self.adv_cache[k] = tensors["adv"]
        return self.adv_cache[k]

    # -- sections -------------------------------------------------------------------------------------------------
    def run_clean(self) -> None:
        print("== clean accuracy (no attack)", flush=True)
        for arch in CLASSIFIERS:
            row: dict = {}
            for col in COLUMNS:
                if col not in self.columns:
                    row[col] = self.reused(("clean", arch), arch, col)
                    continue
                why = self.unavailable(arch, col)
                row[col] = why or self.measure(arch, col, self.x, self.y, f"clean {arch}")
            self.results["clean"][arch] = row

    def run_whitebox(self) -> None:
        for attack in ("fgsm", "rand-fgsm", "cw"):
            print(f"== white-box {ATTACK_NAMES[attack]} (oblivious)", flush=True)
            for arch in CLASSIFIERS:
                row: dict = {}
                for col in COLUMNS:
                    why = self.unavailable(arch, col)
                    if why or col not in self.columns:
                        row[col] = why or self.reused(("whitebox", attack, arch), arch, col)
                        continue
                    t0 = time.time()
                    adv = self.whitebox_adv(attack, self.attack_model_key(arch, col), self.x, self.y)
                    row[col] = self.measure(arch, col, adv, self.y, f"{ATTACK_NAMES[attack]} {arch}")
                    if attack == "cw":
                        l2 = (adv - self.x).flatten(1).norm(dim=1)
                        row[col]["mean_l2"] = float(l2.mean())
                    row[col]["attack_seconds"] = round(time.time() - t0, 1)
                self.results["whitebox"].setdefault(attack, {})[arch] = row

    def run_blackbox(self) -> None:
        if self.holdout is None:
            print("== black-box: no held-out images, skipped", flush=True)
            return
        print(f"== black-box substitute FGSM ε={EPS} (Papernot et al.; {len(self.holdout)} held-out seeds)")
        for arch, sub in PAIRS:
            row: dict = {}
            for col in COLUMNS:
                why = self.unavailable(arch, col)
                if why or col not in self.columns:
                    row[col] = why or self.reused(("blackbox", f"{arch}/{sub}"), arch, col)
                    continue
                adv = self.substitute_adv(self.attack_model_key(arch, col), sub)
                row[col] = self.measure(arch, col, adv, self.y, f"substitute {arch}/{sub}")
            self.results["blackbox"][f"{arch}/{sub}"] = row

    def attacker_pipeline(self, arch: str, col: str) -> Defended:
        cfg = self.projection(col)
        assert cfg is not None and self.G is not None
        if cfg.init != "encoder":  # the cheaper attacker projection replaces only the random-restart one
            cfg = cfg.with_(steps=self.s.attacker_steps, restarts=self.s.attacker_restarts)
        return Defended(self.reg.module(self.key(arch, col)), self.G, cfg,  # type: ignore[arg-type]
                        encoder=self.E if cfg.init == "encoder" else None, seed=self.seed)  # fmt: skip

    def adaptive_adv(self, attack: str, arch: str, col: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The adaptive attack's images, in chunks of `batch` images, each chunk cached on disk (resumable)."""
        key = self.attack_model_key(arch, col)
        if col == "magnet":  # MagNet is differentiable end to end: PGD with the same budget, exact gradients
            return self.magnet_pgd(key, x, y)
        if self.projection(col) is None:  # no projection to attack through: PGD with the same budget
            return self.whitebox_adv("pgd", key, x, y)
        model = self.attacker_pipeline(arch, col)
        deterministic = model.cfg.init == "encoder" and model.cfg.restarts == 1
        samples = 1 if deterministic else self.s.eot_samples
        params = (attack, self.model_sha(key), model.cfg, *self.purifier_shas(model.cfg), self.s.pgd_steps,
                  self.s.pgd_alpha, samples, self.s.latent_steps, self.s.latent_check, self.seed)  # fmt: skip
        chunks, t0 = [], time.time()
        for i in range(0, len(x), self.s.batch):
            xb, yb = x[i : i + self.s.batch], y[i : i + self.s.batch]

            def compute(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
                if attack == "eot":
                    return {"adv": eot(model, xb, yb, eps=EPS, alpha=self.s.pgd_alpha, steps=self.s.pgd_steps,
                                       samples=samples, seed=self.seed)}, {}  # fmt: skip
                return {"adv": latent(model, xb, yb, eps=EPS, steps=self.s.latent_steps,
                                      check_every=self.s.latent_check)}, {}  # fmt: skip

            chunks.append(self.cached("adv", (params, digest(xb)), compute)[0]["adv"])
            if len(x) > self.s.batch:
                print(f"      {ATTACK_NAMES[attack]} {arch} {COLUMNS[col][0]}: {i + len(xb)}/{len(x)} "
                      f"({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
        return torch.cat(chunks)

    def run_adaptive(self) -> None:
        n = min(self.s.adaptive_n, len(self.x))
        x, y = self.x[:n], self.y[:n]
        for attack in ("eot", "latent"):
            print(f"== adaptive {ATTACK_NAMES[attack]} (n={n})", flush=True)
            for arch in self.s.adaptive_classifiers:
                row: dict = {}
                for col in COLUMNS:
                    why = self.unavailable(arch, col)
                    if why or col not in self.columns:
                        row[col] = why or self.reused(("adaptive", attack, arch), arch, col)
                        continue
                    t0 = time.time()
                    if self.projection(col) is None and attack == "latent":
                        row[col] = "n/a"
                        continue
                    adv = self.adaptive_adv(attack, arch, col, x, y)
                    row[col] = self.measure(arch, col, adv, y, f"{ATTACK_NAMES[attack]} {arch}")
                    row[col]["attack_seconds"] = round(time.time() - t0, 1)
                    self.adv_cache[("adaptive", attack, arch, col)] = adv
                self.results["adaptive"].setdefault(attack, {})[arch] = row

    def run_detector(self) -> None:
        """ROC AUC of the reconstruction MSE, clean (negatives) vs attacked (positives), per attack and column."""
        print("== detector ROC AUC", flush=True)
        for col in ("rec", "warm", "magnet"):
            if col not in self.columns and col in self.previous.get("detector", {}):
                self.results["detector"][col] = self.previous["detector"][col]
                continue
            clean = self.results["clean"]
            for arch in CLASSIFIERS:
                neg = clean.get(arch, {}).get(col)
                if not isinstance(neg, dict) or "mse" not in neg:
                    continue
                for group, attacks in (("whitebox", ("fgsm", "rand-fgsm", "cw")), ("blackbox", None),
                                       ("adaptive", ("eot", "latent"))):  # fmt: skip
                    src = self.results[group]
                    rows = ({f"{arch}/{s}": src.get(f"{arch}/{s}") for s in "BE"} if attacks is None
                            else {a: src.get(a, {}).get(arch) for a in attacks})  # fmt: skip
                    for name, row in rows.items():
                        pos = row.get(col) if row else None
                        if not isinstance(pos, dict) or "mse" not in pos:
                            continue
                        nneg = neg["mse"][: len(pos["mse"])]
                        auc = roc_auc(nneg, pos["mse"])
                        label = name if attacks is None else f"{ATTACK_NAMES[name]} {arch}"
                        ci = auc_ci(auc, len(nneg), len(pos["mse"]))
                        self.results["detector"].setdefault(col, {})[label] = {
                            "auc": round(auc, 4), "ci95": [round(v, 4) for v in ci],
                            "n_clean": len(nneg), "n_attacked": len(pos["mse"])}  # fmt: skip
                        print(f"    {COLUMNS[col][0]:<20} {label:<24} AUC {auc:.3f}", flush=True)


ATTACK_NAMES = {"fgsm": f"FGSM ε={EPS}", "rand-fgsm": f"RAND+FGSM ε={EPS} α=0.05", "cw": "CW-L2",
                "eot": f"BPDA+EOT ε={EPS}", "latent": f"Latent ε={EPS}", "pgd": f"PGD ε={EPS}"}  # fmt: skip


# -- rendering --------------------------------------------------------------------------------------------------
def cell_text(v: object) -> str:
    if isinstance(v, dict) and "cell" in v:
        return v["cell"].fmt()
    return str(v) if v else "–"


def row_n(row: dict) -> str:
    ns = {v["cell"].n for v in row.values() if isinstance(v, dict) and "cell" in v}
    return "/".join(str(n) for n in sorted(ns)) or "–"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def reuse_lines(info: dict) -> list[str]:
    """Which columns (and sections) came from which earlier run: each cell is the newest run's that measured it."""
    seen, out = {(c, g) for c in info.get("columns", COLUMNS) for g in info.get("sections", SECTIONS)}, []
    for r in info.get("reused", []):
        named = r.get("columns", [c for c in COLUMNS if c != "rectrained"])  # a run naming none predates rectrained
        new = {(c, g) for c in named for g in r.get("sections", SECTIONS)} - seen
        seen |= new
        cols = [c for c in COLUMNS if any(c == nc for nc, _ in new)]
        if cols:
            groups = sorted({g for _, g in new})
            where = "" if set(groups) == set(SECTIONS) else f" ({', '.join(groups)} rows)"
            out.append(f"- columns {', '.join(COLUMNS[c][0] for c in cols)}{where} from the earlier run "
                       f"`{r['command']}` (commit `{r['commit'][:12]}`, {r['date']})")  # fmt: skip
    return out


def render(ev: Evaluation, info: dict) -> str:
    """The dataset's section of the results page (Markdown)."""
    r, ds, s = ev.results, ev.ds, ev.s
    cols = list(COLUMNS)
    quick = (
        " — QUICK SMOKE RUN (reduced n, L, R and iterations; not comparable with the papers)" if info["quick"] else ""
    )
    out = [f"## {ds}{quick}", ""]
    out += [f"- command: `{info['command']}`", f"- machine: {info['machine']}", f"- duration: {info['duration']}",
            f"- git commit: `{info['commit']}`", f"- date: {info['date']}",
            *reuse_lines(info),
            f"- images: the first n test images (n ≤ 1000: the committed slice models/{ds}/test_slice.npz); "
            "adaptive rows on the "
            f"first {min(s.adaptive_n, s.n)}",
            f"- Defense-GAN-Orig and -Rec: L={s.rec.steps}, R={s.rec.restarts} ({s.rec.optimizer}, lr {s.rec.lr}); "
            "the Rec classifiers are trained on reconstructions of training images (their manifest entries say "
            f"how); encoder warm "
            f"start: L={s.warm.steps}, R={s.warm.restarts}; Enhanced INC projects with "
            f"{'the warm start' if ev.E is not None else 'L, R as Defense-GAN'}",
            f"- projections computed {ev.projections_run}, reused from the cache {ev.projections_reused}",
            f"- not shipped (cells say so): {', '.join(ev.missing()) or 'nothing'}",
            "- every accuracy: value [Wilson 95% interval]; n per row", ""]  # fmt: skip
    if info.get("figure"):
        out += [f"![clean, FGSM and their Defense-GAN reconstructions (L, R as above)]({info['figure']})", ""]
    head = ["Classifier", "n"] + [COLUMNS[c][0] for c in cols]
    if r["clean"]:
        out += ["### Clean accuracy (no attack)", ""]
        out += table(head, [[a, row_n(row)] + [cell_text(row.get(c)) for c in cols] for a, row in r["clean"].items()])
        out += [""]

    def no_attack(arch: str, n: int | None = None) -> str:
        """The bare classifier's clean accuracy, on the first n images when a row has fewer."""
        v = r["clean"].get(arch, {}).get("none")
        if isinstance(v, dict) and n is not None and n < v["cell"].n:
            if "correct" not in v:  # a reused cell from a run that kept no per-image results
                return f"{cell_text(v)} (n={v['cell'].n})"
            return Cell(int(v["correct"][:n].sum()), n).fmt()
        return cell_text(v)

    def measured(row: dict) -> bool:
        return any(isinstance(v, dict) and "cell" in v for v in row.values())

    def first_n(row: dict) -> int | None:
        ns = [v["cell"].n for v in row.values() if isinstance(v, dict) and "cell" in v]
        return min(ns) if ns else None

    if r["whitebox"] or r["adaptive"]:
        out += [f"### White-box L∞ ε={EPS}: oblivious attacks (Defense-GAN Table 4) and adaptive attacks", "",
                "Oblivious: the attack is computed on the column's bare classifier, then the column's defense runs. "
                "Adaptive: BPDA+EOT differentiates through the projection (straight-through) averaged over "
                f"{s.eot_samples} random-restart draws ({s.pgd_steps} steps, α={s.pgd_alpha}; one draw where the "
                "projection is deterministic); columns without a projection get PGD with the same budget. Latent: "
                f"the overpowered attack ({s.latent_steps} steps). The attacker's own projection through "
                f"Defense-GAN: L={s.attacker_steps or s.rec.steps}, R={s.attacker_restarts or s.rec.restarts}"
                " (the reported accuracy is always the real defense's); through the warm start: the defense's own.",
                ""]  # fmt: skip
        rows = []
        for arch in CLASSIFIERS:
            for group, attack in (("whitebox", "fgsm"), ("whitebox", "rand-fgsm"), ("adaptive", "eot"),
                                  ("adaptive", "latent")):  # fmt: skip
                row = r[group].get(attack, {}).get(arch)
                if row is None or not measured(row):
                    continue
                kind = "oblivious" if group == "whitebox" else "**adaptive**"
                rows.append([f"{arch}", f"{ATTACK_NAMES[attack]} ({kind})", row_n(row), no_attack(arch, first_n(row))]
                            + [cell_text(row.get(c)) for c in cols])  # fmt: skip
        out += table(["Classifier", "Attack", "n", "No attack"] + [COLUMNS[c][0] for c in cols], rows) + [""]
    if "cw" in r["whitebox"]:
        out += ["### White-box CW-L2 (oblivious; Defense-GAN's cleverhans preset: 1 search step, "
                f"{s.cw.get('steps', 100)} iterations, lr 10, c=100)", ""]  # fmt: skip
        rows = []
        for arch, row in r["whitebox"]["cw"].items():
            if not measured(row):
                continue
            l2 = row.get("none", {}).get("mean_l2") if isinstance(row.get("none"), dict) else None
            rows.append([arch, row_n(row), no_attack(arch)] + [cell_text(row.get(c)) for c in cols]
                        + [f"{l2:.2f}" if l2 is not None else "–"])  # fmt: skip
        out += table(["Classifier", "n", "No attack"] + [COLUMNS[c][0] for c in cols] + ["mean L2 (no def.)"], rows)
        out += [""]
    if r["blackbox"]:
        p = s.substitute
        out += [f"### Black-box substitute FGSM ε={EPS} (Defense-GAN Table 1)", "",
                f"Substitute trained from {p['holdout']} held-out test images with {p['rounds']} rounds of Jacobian "
                f"augmentation (λ=0.1), {p['epochs']} epochs per round, querying the column's bare classifier for "
                "labels only; FGSM on the substitute, transferred.", ""]  # fmt: skip
        rows = [[pair, row_n(row), no_attack(pair[0])] + [cell_text(row.get(c)) for c in cols]
                for pair, row in r["blackbox"].items() if measured(row)]  # fmt: skip
        out += table(["Classifier/substitute", "n", "No attack"] + [COLUMNS[c][0] for c in cols], rows) + [""]
    if r["detector"]:
        out += ["### MSE detector: ROC AUC per attack (clean vs attacked reconstruction MSE)", "",
                "Value [Hanley–McNeil 95% interval]; n clean / n attacked.", ""]  # fmt: skip
        rows = [[COLUMNS[col][0], label, f"{v['auc']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]",
                 f"{v['n_clean']}/{v['n_attacked']}"]
                for col, d in r["detector"].items() for label, v in d.items()]  # fmt: skip
        out += table(["Projection", "Attack", "ROC AUC", "n"], rows) + [""]
    proj_cols = [c for c in cols if c in ("rec", "rectrained", "warm", "enhanced", "magnet")]
    rows = []
    for group, attack in (("clean", None), ("whitebox", "fgsm"), ("whitebox", "rand-fgsm"), ("whitebox", "cw"),
                          ("adaptive", "eot"), ("adaptive", "latent")):  # fmt: skip
        for arch in CLASSIFIERS:
            row = r["clean"].get(arch) if attack is None else r[group].get(attack, {}).get(arch)
            docs = [v if isinstance(v := (row or {}).get(c), dict) and "defended" in v else None for c in proj_cols]
            if not any(docs):
                continue
            name = "clean (flagged = false positives)" if attack is None else ATTACK_NAMES[attack]
            cells = [f"{v['flagged'].acc:.2f} / {v['defended'].fmt()}" if v else "–" for v in docs]
            rows.append([arch, name + (" (**adaptive**)" if group == "adaptive" else ""), row_n(row), *cells])
    if rows:
        out += ["### Detect or correct: the service's detector at its calibrated threshold", "",
                "Per cell: the fraction flagged by the reconstruction-MSE detector (threshold recorded on the "
                "generator's manifest entry, calibrated for a 5% false-positive rate on held-out clean images) / "
                "the fraction **correct or flagged** [Wilson 95%] — what a caller that rejects flagged inputs gets. "
                "The latent attack is the one built to stay on the manifold, i.e. under the detector.", ""]  # fmt: skip
        out += table(["Classifier", "Attack", "n"] + [COLUMNS[c][0] for c in proj_cols], rows) + [""]
    out += paper_comparison(ev)
    return "\n".join(out)


# our column measured against each paper column: the paper's Orig is the projection before the classifier trained
# on original images (our "rec"), its Rec the projection before one trained on reconstructions (our "rectrained")
OURS_FOR = {"clean": "none", "none": "none", "rec": "rectrained", "orig": "rec", "magnet": "magnet",
            "adv0.3": "adv0.3", "adv0.15": "adv0.15"}  # fmt: skip
ORIG_STANDS_IN = "ours: Defense-GAN-Orig's figure (Rec not measured in this cell)"
PAPER_NAMES = {"clean": "No attack", "none": "No defense", "rec": "Defense-GAN-Rec", "orig": "Defense-GAN-Orig",
               "magnet": "MagNet", "adv0.3": "Adv. tr. ε=0.3", "adv0.15": "Adv. tr. ε=0.15"}  # fmt: skip


def why_differs(ev: Evaluation, cell: tuple[str, str, str, str], paper: float, ours: Cell) -> str:
    """The measured reason a cell (dataset, attack, classifier[/substitute], paper column) is not within 2 points of
    the paper's, "" when it is, else "not investigated"."""
    ds, attack, who, col = cell
    if abs(ours.acc - paper) <= 0.02:
        return ""
    arch = who.split("/")[0]
    why = ""
    if col in ("rec", "orig"):
        why = transfer_why(ev, who) if attack == "substitute" else zero_gradient_why(ev.results, arch)
    why = full_test_why(ev, arch, paper) if col == "clean" else why
    why = why or WHY_CELL.get(cell, "")
    if not why and ours.ci[0] <= paper <= ours.ci[1]:
        why = f"inside our 95% interval (n={ours.n}): not told apart from sampling error at this n"
    return why or "not investigated"


def paper_comparison(ev: Evaluation) -> list[str]:
    """Every transcribed cell of Defense-GAN Tables 1 and 4 beside ours, within 2 points or not, and why not where
    it was investigated."""
    r, rows = ev.results, []
    for (ds, attack, who), ref in PAPER.items():
        if ds != ev.ds:
            continue
        arch = who.split("/")[0]
        src = (r["blackbox"].get(who) if attack == "substitute" else r["whitebox"].get(attack, {}).get(arch)) or {}
        for col, paper in ref.items():
            v = (r["clean"].get(arch) or {}).get("none") if col == "clean" else src.get(OURS_FOR[col])
            stand_in = col == "rec" and not (isinstance(v, dict) and "cell" in v)
            v = src.get("rec") if stand_in else v  # Orig's figure, marked, where Rec was not measured
            ours = v["cell"] if isinstance(v, dict) and "cell" in v else None
            close = "–" if ours is None else "yes" if abs(ours.acc - paper) <= 0.02 else "no"
            inside = "–" if ours is None else "yes" if ours.ci[0] <= paper <= ours.ci[1] else "no"
            why = why_differs(ev, (ds, attack, who, col), paper, ours) if ours else ""
            why = "; ".join(w for w in (ORIG_STANDS_IN if stand_in and ours else "", why) if w)
            shown = ours.fmt() + (" (Orig)" if stand_in else "") if ours else (v if isinstance(v, str) else
                                                                                 "not measured")  # fmt: skip
            rows.append([ATTACK_NAMES.get(attack, "substitute FGSM"), who, PAPER_NAMES[col], f"{paper:.4g}", shown,
                         close, inside, why])  # fmt: skip
    if not rows:
        return []
    return ["### The paper's figures beside ours (Defense-GAN Tables 1 and 4)", "",
            "Defense-GAN-Orig is the projection before the classifier trained on original images; Defense-GAN-Rec "
            "the same projection before classifier_<X>_rec, trained on reconstructions of training images. Where "
            "the Rec column was not measured, Orig's figure stands in, marked (Orig). n and interval as in the "
            "tables above.", "",
            *table(["Attack", "Classifier", "column", "paper", "ours", "within 2 points", "paper inside our interval",
                    "why they differ"], rows),
            ""]  # fmt: skip


def with_intro(text: str, quick: bool = False) -> str:
    """The page's text with its current introduction in front of the first dataset block."""
    title = "# The papers' protocol: Defense-GAN Tables 1 and 4" + (" (QUICK SMOKE RUN)" if quick else "")
    intro = (f"{title}\n\nGenerated by `python -m training.evaluate`; do not edit by hand (each dataset's block is "
             "rewritten by its run). See training/evaluate.py for the protocol.\n\n"
             "These are the papers' attacks: oblivious FGSM, RAND+FGSM and CW, black-box substitutes, and fixed-step "
             "adaptive attacks (BPDA+EOT PGD-40, latent). Their lowest figure per pipeline is an upper bound on its "
             "robustness, not a robustness figure: fixed-step PGD overstated every pipeline. The AutoAttack-grade, "
             "per-image worst-case figures are in [robustness.md](robustness.md) "
             "(`python -m training.robustness`).\n")  # fmt: skip
    first = text.find("<!-- results:")
    return intro + ("\n" + text[first:] if first >= 0 else "")


def write_page(path: Path, dataset: str, section: str, quick: bool) -> None:
    """Replace this dataset's block in the results page, keeping the other datasets' blocks."""
    start, end = f"<!-- results:{dataset}:start -->", f"<!-- results:{dataset}:end -->"
    text = with_intro(path.read_text() if path.exists() else "", quick)
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def to_json(ev: Evaluation, info: dict) -> dict:
    def conv(v: object) -> object:
        if isinstance(v, Cell):
            return v.as_json()
        if isinstance(v, torch.Tensor):
            return None
        if isinstance(v, dict):  # per-image tensors dropped, but for which images were correct (as 0s and 1s)
            return {k: "".join("1" if c else "0" for c in x.tolist()) if k == "correct" else conv(x)
                    for k, x in v.items() if k == "correct" or not isinstance(x, torch.Tensor)}  # fmt: skip
        return v

    return {"info": info, "results": conv(ev.results)}


def from_json(v: object) -> object:
    """`to_json`'s cells back to `Cell`s (a reused column's cells; the per-image tensors are not kept)."""
    if isinstance(v, dict) and {"k", "n"} <= v.keys():
        return Cell(int(v["k"]), int(v["n"]))
    if isinstance(v, dict):
        return {k: torch.tensor([c == "1" for c in x]) if k == "correct" else from_json(x) for k, x in v.items()}
    return v


def previous_results(path: Path, n: int, quick: bool) -> dict:
    """The results of the run that wrote `path` (its columns are reused by a `--columns` run), checked to be on the
    same n images."""
    if not path.exists():
        raise SystemExit(f"--columns reuses the other columns from {path}, which does not exist: run without it")
    doc = json.loads(path.read_text())
    if doc["info"]["n"] != n or bool(doc["info"].get("quick")) != quick:
        raise SystemExit(f"{path} was measured on n={doc['info']['n']}{' (quick)' if doc['info'].get('quick') else ''}"
                         f"; a --columns run must use the same n")  # fmt: skip
    return doc


# -- manifest -----------------------------------------------------------------------------------------------------
def headline(ev: Evaluation, info: dict) -> dict[str, dict]:
    """Per classifier key: clean and robust accuracy per service defense, for models/manifest.json."""
    out: dict[str, dict] = {}
    linf = [("whitebox", "fgsm"), ("whitebox", "rand-fgsm"), ("adaptive", "eot"), ("adaptive", "latent")]
    linf_attacks = {attack for _, attack in linf}
    for arch in CLASSIFIERS:
        for col, (_, defense) in COLUMNS.items():
            key = ev.key(arch, col)
            clean = ev.results["clean"].get(arch, {}).get(col)
            if key is None or not isinstance(clean, dict) or col not in ev.columns:  # reused: its run recorded it
                continue
            m = out.setdefault(key, {"eval_clean_accuracy": {}, "eval_fixed_step_min": {}, "evaluation": {}})
            m["eval_clean_accuracy"][defense] = round(clean["cell"].acc, 4)
            detail = m["evaluation"].setdefault(defense, {"clean": clean["cell"].as_json()})
            cells = {attack: v for group, attack in [*linf, ("whitebox", "cw")]
                     if isinstance(v := ev.results[group].get(attack, {}).get(arch, {}).get(col), dict)
                     and "cell" in v}  # fmt: skip
            for attack, v in cells.items():
                detail[attack] = v["cell"].as_json()
                if "defended" in v:  # correct-or-flagged by the detector
                    detail[attack]["correct_or_flagged"] = v["defended"].as_json()
            scored = [(v["cell"].acc, a) for a, v in cells.items() if a in linf_attacks]
            if scored:
                acc, attack = min(scored, key=lambda t: t[0])  # the first of equals, in `linf` order
                # the adaptive "eot" row is PGD-40 where the column has no projection to attack through
                name = "pgd" if attack == "eot" and ev.projection(col) is None else attack
                m["eval_fixed_step_min"][defense] = {"linf_eps": EPS, "accuracy": round(acc, 4),
                                                      "worst_attack": name, "n": detail[attack]["n"]}  # fmt: skip
                doc = [(v["defended"].acc, a) for a, v in cells.items() if a in linf_attacks and "defended" in v]
                if doc:
                    doc_acc, doc_attack = min(doc, key=lambda t: t[0])
                    m["eval_fixed_step_min"][defense] |= {"correct_or_flagged": round(doc_acc, 4),
                                                           "correct_or_flagged_worst_attack": doc_attack}  # fmt: skip
    for m in out.values():
        m["evaluation"] = {**m["evaluation"], "n": ev.s.n, "quick": info["quick"], "commit": info["commit"],
                           "date": info["date"], "command": info["command"], "page": info["page"]}  # fmt: skip
    return out


def record(ev: Evaluation, info: dict, models_dir: Path) -> None:
    """The headline figures into each classifier's entry. A `--columns` run adds its defenses beside the recorded
    ones (each with the run that measured it) instead of replacing them."""
    partial = ev.columns != set(COLUMNS)
    recorded = json.loads((models_dir / "manifest.json").read_text())["artifacts"] if partial else {}
    for key, metrics in headline(ev, info).items():
        if partial:
            metrics = merged_headline(recorded[key].get("metrics", {}), metrics)
        record_metrics(key, metrics, models_dir)
    if ev.G is not None and ev.results["detector"]:
        record_metrics(f"{ev.ds}/generator", {"eval_detector_auc": ev.results["detector"]}, models_dir)
    print(f"recorded headline metrics in {models_dir / 'manifest.json'}", flush=True)


def merged_headline(old: dict, new: dict) -> dict:
    """`new`'s per-defense figures beside `old`'s; the defenses measured by `new` carry its run (`run`), the
    evaluation's own run fields stay those of the run that measured the rest."""
    run = {k: new["evaluation"][k] for k in ("command", "commit", "date", "page") if k in new["evaluation"]}
    measured = {d: v | {"run": run} for d, v in new["evaluation"].items() if isinstance(v, dict)}
    return {"eval_clean_accuracy": old.get("eval_clean_accuracy", {}) | new["eval_clean_accuracy"],
            "eval_fixed_step_min": old.get("eval_fixed_step_min", {}) | new["eval_fixed_step_min"],
            "evaluation": (old.get("evaluation") or {k: v for k, v in new["evaluation"].items()
                                                       if not isinstance(v, dict)}) | measured}  # fmt: skip


# -- main ---------------------------------------------------------------------------------------------------------
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
    """The substitute's seed images: the last `size` test images (outside the slice), else the slice's tail."""
    try:
        x = data.load(dataset)["x_test"][-size:]
    except data.DataError:
        xs, _ = data.load_slice(dataset)
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


def run(args: argparse.Namespace) -> dict:
    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    reg = Registry(args.models_dir)
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
    holdout = load_holdout(args.dataset, s.n, s.substitute["holdout"]) if "blackbox" in args.sections else None
    cache_dir = args.cache_dir or (None if args.quick or args.no_cache else ROOT / "runs" / args.dataset / "eval_cache")
    out: Path = args.out or ROOT / "docs" / ("results-quick.md" if args.quick else "results.md")
    reuse = args.columns or args.rerender
    prev = previous_results(out.with_name(f"{out.stem}-{args.dataset}.json"), s.n, args.quick) if reuse else {}
    ev = Evaluation(reg, args.dataset, s, seed=args.seed, cache_dir=cache_dir, holdout=holdout,
                    columns=set() if args.rerender else args.columns, previous=prev.get("results"))  # fmt: skip
    for group in set(SECTIONS) - args.sections:  # a section not run keeps the previous one's
        ev.results[group] = from_json(prev.get("results", {}).get(group, {}))
    print(
        f"evaluating {args.dataset} on n={len(ev.x)} ({'quick' if args.quick else 'full'}); generator: "
        f"{ev.G is not None}, encoder: {ev.E is not None}; classifiers: {reg.classifiers(args.dataset)}",
        flush=True,
    )
    ev.run_clean()
    if "whitebox" in args.sections:
        ev.run_whitebox()
    if "blackbox" in args.sections:
        ev.run_blackbox()
    if "adaptive" in args.sections and ev.G is not None:
        ev.run_adaptive()
    ev.run_detector()
    fig = out.parent / "figures" / f"{out.stem}-{args.dataset}-examples.png"
    has_fig = example_figure(ev, fig) if "rec" in ev.columns else fig.exists()  # the figure shows the rec column
    info = {
        "command": command_line(), "machine": machine(), "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": bool(args.quick),
        "duration": f"{(time.time() - t0) / 60:.1f} min this run"
                    + (f", plus {ev.cached_seconds / 60:.1f} min of work reused from earlier runs' cache (total "
                       f"{(time.time() - t0 + ev.cached_seconds) / 60:.1f} min)" if ev.cached_seconds else ""),
        "n": s.n, "projections_run": ev.projections_run, "projections_reused": ev.projections_reused,
        "cached_seconds": round(ev.cached_seconds, 1),
        "figure": str(fig.relative_to(out.parent)) if has_fig else None,
        "page": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
        "columns": sorted(ev.columns, key=list(COLUMNS).index),
        "sections": sorted(args.sections),
    }  # fmt: skip
    if args.rerender:  # nothing measured: the page is the previous run's, drawn by this code
        info = prev["info"]
    elif prev:  # the reused columns' run, and the run before it where that one reused columns too
        keep = ("command", "commit", "date", "columns", "sections")
        info["reused"] = [{k: prev["info"][k] for k in keep if k in prev["info"]},
                          *prev["info"].get("reused", [])]  # fmt: skip
    write_page(out, args.dataset, render(ev, info), args.quick)
    doc = to_json(ev, info)
    out.with_name(f"{out.stem}-{args.dataset}.json").write_text(json.dumps(doc, indent=1) + "\n")
    if (args.record if args.record is not None else not args.quick) and not args.rerender:
        record(ev, info, args.models_dir)
    print(f"wrote {out} in {info['duration']}", flush=True)
    return doc


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=data.DATASETS, required=True)
    p.add_argument(
        "--n",
        type=int,
        default=None,
        help="first n test images (default 1000 = the slice; up to 9850 needs data/<ds>.npz; quick 24)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: few images, reduced L/R/iterations")
    p.add_argument("--models-dir", type=Path, default=common.MODELS_DIR)
    p.add_argument("--out", type=Path, default=None, help="results page (default docs/results.md, quick: "
                   "docs/results-quick.md)")  # fmt: skip
    p.add_argument(
        "--sections",
        type=lambda v: set(v.split(",")),
        default=set(SECTIONS),
        help="comma list of whitebox, blackbox, adaptive (clean and detector always run)",
    )
    p.add_argument(
        "--columns",
        type=lambda v: {c for c in v.split(",") if c},
        default=None,
        help=f"measure only these columns ({', '.join(COLUMNS)}); the others are the previous run's, read from the "
        "page's JSON (same n)",
    )
    p.add_argument("--rerender", action="store_true", help="measure nothing: redraw the page from its JSON")
    p.add_argument("--steps", type=int, default=None, help="Defense-GAN's L (default 200)")
    p.add_argument("--restarts", type=int, default=None, help="Defense-GAN's R (default 10)")
    p.add_argument("--adaptive-n", type=int, default=None, help="images for the adaptive rows (default 100)")
    p.add_argument("--adaptive-classifiers", default=None, help="comma list (default A,B,C,D; quick A)")
    p.add_argument("--eot-samples", type=int, default=None, help="EOT draws per step (default 8)")
    p.add_argument("--pgd-steps", type=int, default=None, help="BPDA/PGD steps (default 40)")
    p.add_argument("--latent-steps", type=int, default=None, help="latent attack steps (default 200)")
    p.add_argument("--attacker-steps", type=int, default=None, help="L of the adaptive attacker's own passes "
                   "through Defense-GAN (default: the defense's)")  # fmt: skip
    p.add_argument("--attacker-restarts", type=int, default=None, help="R of those passes (default: the defense's)")
    p.add_argument("--batch", type=int, default=None, help="images per projection batch (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=common.env_threads() or 1)
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache of projections and attacks (default runs/<ds>/eval_cache; quick: none unless given)",
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk cache")
    rec = p.add_mutually_exclusive_group()
    rec.add_argument("--record", dest="record", action="store_true", default=None,
                     help="write headline metrics to the manifest (default for full runs)")  # fmt: skip
    rec.add_argument("--no-record", dest="record", action="store_false")
    args = p.parse_args(argv)
    if args.columns and not args.columns <= set(COLUMNS):
        p.error(
            f"--columns: unknown {', '.join(sorted(args.columns - set(COLUMNS)))}; choose from {', '.join(COLUMNS)}"
        )
    return args


if __name__ == "__main__":
    run(parse())
