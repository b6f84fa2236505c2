"""The papers' protocol as data: the classifiers, columns, attacks and budgets of `training.evaluate`, the cell
bookkeeping (counts with Wilson intervals), the settings a run costs, and Defense-GAN's Tables 1 and 4
(defense_gan_tables.json)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from service.purify import ProjectionConfig
from service.stats import wilson

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
# Defense-GAN (Samangouei et al. 2018) Tables 1 and 4, as data: per (dataset, attack, classifier[/substitute]) the
# paper's figure per column ("clean": no attack, "none": no defense, "rec": Defense-GAN-Rec, "orig": Defense-GAN-Orig,
# "magnet": MagNet, "adv0.3"/"adv0.15": adversarial training)
TABLES = Path(__file__).with_name("defense_gan_tables.json")
COLUMN_NAMES = ("clean", "none", "rec", "orig", "magnet", "adv0.3", "adv0.15")
PAPER: dict[tuple[str, str, str], dict[str, float]] = {
    (c["dataset"], c["attack"], c["classifier"]): {k: v for k, v in c.items() if k in COLUMN_NAMES}
    for c in json.loads(TABLES.read_text())["cells"]
}
ATTACK_NAMES = {"fgsm": f"FGSM ε={EPS}", "rand-fgsm": f"RAND+FGSM ε={EPS} α=0.05", "cw": "CW-L2",
                "eot": f"BPDA+EOT ε={EPS}", "latent": f"Latent ε={EPS}", "pgd": f"PGD ε={EPS}"}  # fmt: skip


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


def to_json(ev: Any, info: dict) -> dict:
    """A run's cells (`ev.results`) as JSON: counts with intervals, per-image correctness as 0s and 1s."""

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
