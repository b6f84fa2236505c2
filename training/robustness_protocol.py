"""`training.robustness`'s protocol as data: the threats per dataset, the clean bars, the published figures the page
sets beside ours, which attacks run against which pipeline, the attack budget, the pipelines evaluated and the
rule that picks the measured default."""

from __future__ import annotations

from dataclasses import dataclass

from service.registry import Registry
from service.stats import wilson


class PerDataset(dict):
    """A protocol value per dataset; a dataset without its own (one a user prepared) gets `default`."""

    def __init__(self, values: dict, default: object) -> None:
        super().__init__(values)
        self.default = default

    def __missing__(self, dataset: str) -> object:
        return self.default


# any other dataset: RobustBench's CIFAR-10 threats (L∞ 8/255 the standard one, L2 0.5); no clean bar is published
# for it, so a default may cost at most CLEAN_LOSS of the best bare classifier's clean accuracy (`clean_bar`)
THREATS: dict[str, tuple[tuple[str, float], ...]] = PerDataset({
    "mnist": (("linf", 0.3), ("l2", 2.0)),
    "fmnist": (("linf", 0.1), ("linf", 0.3), ("l2", 1.5)),
}, (("linf", 8 / 255), ("l2", 0.5)))  # fmt: skip


# both threats at once (Maini, Wong & Kolter 2020): an image counts only if every attack of both norms failed on it
UNION: dict[str, tuple[tuple[str, float], ...]] = PerDataset({
    "mnist": (("linf", 0.3), ("l2", 2.0)),
    "fmnist": (("linf", 0.1), ("l2", 1.5)),
}, (("linf", 8 / 255), ("l2", 0.5)))  # fmt: skip


STANDARD: dict[str, tuple[str, float]] = PerDataset({"mnist": ("linf", 0.3), "fmnist": ("linf", 0.1)},
                                                    ("linf", 8 / 255))  # fmt: skip


CLEAN_BAR: dict[str, float | None] = PerDataset({"mnist": 0.98, "fmnist": 0.85}, None)
CLEAN_LOSS = 0.05


def clean_bar(dataset: str, results: list[dict]) -> float:
    """The clean accuracy the default must keep: the dataset's published bar, else the best bare classifier's
    measured clean accuracy less CLEAN_LOSS (a purification that costs more is no default)."""
    bar = CLEAN_BAR[dataset]
    if bar is not None:
        return bar
    bare = [r["clean"]["accuracy"] for r in results if r["defense"] == "none"]
    return max(bare) - CLEAN_LOSS if bare else 1.0


NORMS = {"linf": "Linf", "l2": "L2"}


# Published figures at the standard threat, for the page (clean, robust, model and attack, source)
PUBLISHED = {
    "mnist": [
        ("TRADES (Zhang et al. 2019b)", 0.9948, 0.9276, "AutoAttack standard",
         "AutoAttack README, MNIST L∞ 0.3 table (github.com/fra31/auto-attack)"),
        ("TRADES β=6 on the same SmallCNN, 100 epochs, 40 steps (a third-party reproduction)", 0.9923, 0.9401,
         "AutoAttack standard", "MTandHJ/PyTorch-Robust, TRADES/README.md, MNIST L∞ 0.3 table"),
        ("PGD training (Madry et al. 2018)", 0.9853, 0.8843, "AutoAttack standard",
         "AutoAttack README, MNIST L∞ 0.3 table (github.com/fra31/auto-attack)"),
        ("fast FGSM with random start (Wong et al. 2020)", 0.9850, 0.8288, "AutoAttack standard",
         "AutoAttack README, MNIST L∞ 0.3 table (github.com/fra31/auto-attack)"),
    ],
    "fmnist": [
        ("PGD training, small CNN (conv 16-32, FC 100)", 0.8846, 0.785, "PGD-40 + linear-region attack + MIP "
         "verification on 1,000 test points (an upper bound; no AutoAttack figure found)",
         "Croce, Andriushchenko & Hein, AISTATS 2019, Table 1"),
    ],
}  # fmt: skip


BARE_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


# the training methods whose classifiers are adversarially trained: candidates for a default, attacked on the most
# images, evaluated behind the projection and MagNet ("max": the worst of L∞ and L2 PGD; "msd": multi steepest
# descent; `training.train_robust`)
ROBUST_METHODS = ("pgd", "trades", "max", "msd", "enhanced-inc")


DEFENDED_ATTACKS = ("bpda-apgd-ce", "bpda-apgd-t", "exact-apgd-ce", "latent", "square")


# against "correct or flagged" (the detector rejects what it flags): attacks that also keep the detector under its
# threshold; detector-aware PGD at three weights of the detector penalty (1, 10, 100: weak pulls the image over the
# threshold, strong keeps it from fooling the classifier), the per-image worst case over them
DETECTOR_AWARE = ("detector-aware", "detector-aware-w1", "detector-aware-w100")
DETECT_ATTACKS = (*DETECTOR_AWARE, "latent")


CHEAP = ("none", "magnet")  # no projection: full-size clean accuracy, AutoAttack's own settings


def attacks_for(defense: str, bare: tuple[str, ...] = BARE_ATTACKS, classes: int = 10) -> tuple[str, ...]:
    """The worst-case attacks of a pipeline: AutoAttack on bare classifiers and through MagNet's autoencoder
    (exactly differentiable), the adaptive set behind a projection. With fewer than 4 classes APGD-T is left out
    (its targeted DLR loss reads the 4 highest logits)."""
    out = bare if defense == "none" else BARE_ATTACKS if defense == "magnet" else DEFENDED_ATTACKS
    return out if classes >= 4 else tuple(a for a in out if not a.endswith("apgd-t"))


def detect_attacks_for(defense: str) -> tuple[str, ...]:
    """Against "correct or flagged": detector-aware PGD (and behind a projection, the latent attack)."""
    return DETECTOR_AWARE if defense == "magnet" else DETECT_ATTACKS


def threat_key(norm: str, eps: float) -> str:
    return f"{norm}:{eps:g}"


def union_key(dataset: str) -> str:
    """The union's key beside the threats' own (`linf:0.3+l2:2`)."""
    return "+".join(threat_key(*t) for t in UNION[dataset])


def union_cell(cells: dict, dataset: str) -> dict | None:
    """The union from the per-image flags of its threats' cells, on the images all of them were attacked on (the
    first min n of the slice); None where a cell or its flags are missing."""
    flags = [cells.get(threat_key(*t), {}).get("robust_flags") for t in UNION[dataset]]
    if any(f is None for f in flags):
        return None
    n = min(len(f) for f in flags)
    both = [all(f[i] for f in flags) for i in range(n)]
    k = sum(both)
    return {"accuracy": round(k / n, 4), "ci": [round(v, 4) for v in wilson(k, n)], "n": n, "robust": k,
            "robust_flags": both}  # fmt: skip


@dataclass(frozen=True)
class Budget:
    """How hard the attacks try (the published AutoAttack settings by default)."""

    iters: int = 100
    square_queries: int = 5000
    batch: int = 250
    fab_targets: int = 9  # FAB-T's target classes (standard: 9); fewer where FAB-T's cost is out of reach
    # behind the projection every attack step costs a 25-step projection (≈ 40× a bare step on this CPU)
    defended_iters: int = 50
    defended_targets: int = 3
    defended_square_queries: int = 200
    latent_steps: int = 200


def pipelines(reg: Registry, dataset: str, defended: list[str] | None = None) -> list[tuple[str, str]]:
    """Every classifier bare; behind the warm-start projection the `defended` ones (default: the adversarially
    trained and the enhanced); behind MagNet (where shipped) classifier A, the papers' model, and the
    adversarially trained ones."""
    out = [(c, "none") for c in reg.classifiers(dataset)]
    robust = [
        c
        for c in reg.classifiers(dataset)
        if reg.get(f"{dataset}/{c}").raw.get("training", {}).get("method") in ROBUST_METHODS
    ]
    if reg.has(f"{dataset}/encoder") and reg.has(f"{dataset}/generator"):
        out += [(c, "invert-classify") for c in (defended if defended is not None else robust)]
    if reg.has(f"{dataset}/magnet"):
        out += [(c, "magnet") for c in ["classifier_A", *robust] if reg.has(f"{dataset}/{c}")
                and not c.endswith("_enhanced")]  # fmt: skip
    return out


DEFAULT_MIN_N = 100  # images under the standard threat before a pipeline may be the default


def choose_default(results: list[dict], dataset: str, threat: str | None = None) -> dict | None:
    """Highest worst-case accuracy at `threat` (default: the standard one; or `union_key`) among pipelines meeting
    the clean bar, compared on the images all of them were attacked on (the first min n of the slice: a 200-image
    estimate must not beat a 1,000-image one by sampling luck), then on clean accuracy. The standard threat's default
    rests on at least DEFAULT_MIN_N images where any pipeline has as many: one measured on fewer stays a row."""
    std = threat or threat_key(*STANDARD[dataset])
    bar = clean_bar(dataset, results)
    ok = [r for r in results if r["clean"]["accuracy"] >= bar and std in r["threats"]]
    if threat is None:
        ok = [r for r in ok if r["threats"][std].get("n", 0) >= DEFAULT_MIN_N] or ok
    if not ok:
        return None
    common = min(r["threats"][std].get("n", 0) for r in ok)

    def paired(r: dict) -> float:
        flags = r["threats"][std].get("robust_flags")
        return sum(flags[:common]) / common if flags and common else r["threats"][std]["accuracy"]

    best = max(ok, key=lambda r: (paired(r), r["clean"]["accuracy"]))
    return {"classifier": f"{dataset}/{best['classifier']}", "defense": best["defense"]}
