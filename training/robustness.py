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
Threats: MNIST L∞ 0.3 and L2 2.0; Fashion-MNIST L∞ 0.1, L∞ 0.3 and L2 1.5.
Images: the first n of the committed 1,000-image slice — n = 1,000 for the adversarially trained classifiers at the
standard threat (the enhanced ones too: the default is chosen among them on the same images), 200 at their other
threats, 100 for the classifiers trained without attacks, 100
(standard threat) and 30 (others) behind the projection, where every attack step costs a 25-step projection
(`--n`, `--n-other`, `--n-baseline`, `--defended-n`, `--defended-n-other`). Behind the projection
the gradient attacks run 50 iterations (APGD-T: 3 targets) and Square 200 queries, the CPU's limit; the bare
cells use the published settings. Clean accuracy: the full 10,000 test images (bare) or the first `--clean-n`
(projected). Per-image results are cached under runs/robustness/ (a rerun, or a second process, reuses them).

Writes docs/robustness-<dataset>.json, regenerates docs/robustness.md, records each pipeline's figures in its
classifier's manifest entry (`metrics.robustness`) and sets the manifest's `defaults[<dataset>]`: the pipeline with
the highest worst-case accuracy at the standard threat (MNIST L∞ 0.3, Fashion-MNIST L∞ 0.1) among those whose
clean accuracy meets the bar (0.98 / 0.85).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.attacks import Defended, Reformed, Unrolled, detector_aware, latent, pgd, pgd_l2
from service.purify import ProjectionConfig
from service.registry import Registry
from training import data
from training.common import (
    MODELS_DIR,
    ROOT,
    add_device_option,
    command_line,
    edit_json,
    edit_manifest,
    git_commit,
    setup,
)
from training.eval_generator import wilson

THREATS: dict[str, tuple[tuple[str, float], ...]] = {
    "mnist": (("linf", 0.3), ("l2", 2.0)),
    "fmnist": (("linf", 0.1), ("linf", 0.3), ("l2", 1.5)),
}
STANDARD = {"mnist": ("linf", 0.3), "fmnist": ("linf", 0.1)}
CLEAN_BAR = {"mnist": 0.98, "fmnist": 0.85}
NORMS = {"linf": "Linf", "l2": "L2"}
# Published figures at the standard threat, for the page (clean, robust, model and attack, source)
PUBLISHED = {
    "mnist": [
        ("TRADES (Zhang et al. 2019b)", 0.9948, 0.9276, "AutoAttack standard",
         "AutoAttack README, MNIST L∞ 0.3 table (github.com/fra31/auto-attack)"),
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
DEFENDED_ATTACKS = ("bpda-apgd-ce", "bpda-apgd-t", "exact-apgd-ce", "latent", "square")
# against "correct or flagged" (the detector rejects what it flags): attacks that also keep the MSE under threshold
DETECT_ATTACKS = ("detector-aware", "latent")
CHEAP = ("none", "magnet")  # no projection: full-size clean accuracy, AutoAttack's own settings


def attacks_for(defense: str, bare: tuple[str, ...] = BARE_ATTACKS) -> tuple[str, ...]:
    """The worst-case attacks of a pipeline: AutoAttack on bare classifiers and through MagNet's autoencoder
    (exactly differentiable), the adaptive set behind a projection."""
    return bare if defense == "none" else BARE_ATTACKS if defense == "magnet" else DEFENDED_ATTACKS


def detect_attacks_for(defense: str) -> tuple[str, ...]:
    """Against "correct or flagged": detector-aware PGD (and behind a projection, the latent attack)."""
    return ("detector-aware",) if defense == "magnet" else DETECT_ATTACKS


WARM = ProjectionConfig(steps=25, restarts=1, init="encoder")
CACHE = ROOT / "runs" / "robustness"
DOCS = ROOT / "docs"
log = logging.getLogger("robustness")


def threat_key(norm: str, eps: float) -> str:
    return f"{norm}:{eps:g}"


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


def make_reference(model: Callable, norm: str, eps: float, attack: str, seed: int, iters: int, targets: int,
                   queries: int, batch: int, device: torch.device | str = "cpu"
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:  # fmt: skip
    """One AutoAttack component, configured as the standard version does (pyautoattack, the authors' code):
    one restart, `iters` iterations, `targets` target classes (standard: 100 and 9), Square with `queries`.
    It computes on `device` (the model's) and returns the adversarial images where the inputs were."""
    from pyautoattack import AutoAttack

    aa = AutoAttack(model, attacks=[attack], version="custom", norm=NORMS[norm], eps=eps, seed=seed,
                    device=str(device))  # fmt: skip
    aa.logger.setLevel(logging.ERROR)  # its "dynamic defense" warning is why the projection gets BPDA/exact/latent
    aa.apgd.n_restarts, aa.apgd.n_iter = 1, iters
    aa.apgd_targeted.n_restarts, aa.apgd_targeted.n_iter, aa.apgd_targeted.n_target_classes = 1, iters, targets
    aa.fab.n_restarts, aa.fab.n_iter, aa.fab.n_target_classes = 1, iters, targets
    aa.square.n_queries = queries

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return aa.run_standard_evaluation(x, y, batch_size=batch)[0]

    return run


Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Pipeline:
    """classifier ∘ (projection), with the modules each attack needs, on `device`; images in and out stay on the
    CPU (each call moves its batch)."""

    device = torch.device("cpu")

    def __init__(self, reg: Registry, dataset: str, classifier: str, defense: str,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        self.dataset, self.classifier, self.defense, self.device = dataset, classifier, defense, torch.device(device)
        clf = reg.classifier(dataset, classifier, self.device)
        self.weights_sha = reg.get(f"{dataset}/{classifier}").files["weights"]["sha256"]
        self.ort = OrtForward(reg, dataset, classifier) if defense == "none" else None
        self.bpda = self.exact = self.threshold = self.reformed = None
        if defense == "none":
            self.forward: nn.Module = clf
        elif defense == "magnet":
            thresholds = reg.magnet_thresholds(dataset)
            self.forward = self.reformed = Reformed(clf, reg.magnet(dataset, self.device), thresholds)
            self.threshold = thresholds[0]
            self.weights_sha += reg.get(f"{dataset}/magnet").files["weights"]["sha256"][:16]
        else:
            gen, enc = reg.generator(dataset, self.device), reg.encoder(dataset, self.device)
            self.bpda = Defended(clf, gen, WARM, encoder=enc, seed=0)
            self.exact = Unrolled(clf, gen, WARM, encoder=enc, seed=0)
            self.forward = self.bpda  # forward: the real projection (straight-through backward)
            det = reg.detector(dataset, WARM.init)
            self.threshold = det.threshold if det else None
            self.weights_sha += reg.get(f"{dataset}/generator").files["weights"]["sha256"][:16]
            self.weights_sha += reg.get(f"{dataset}/encoder").files["weights"]["sha256"][:16]

    @property
    def name(self) -> str:
        return f"{self.classifier}+{self.defense}"

    @torch.no_grad()
    def correct(self, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> torch.Tensor:
        return torch.cat([self.forward(x[i : i + batch].to(self.device)).argmax(1).cpu() == y[i : i + batch]
                          for i in range(0, len(x), batch)])  # fmt: skip

    @torch.no_grad()
    def flagged(self, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
        """The detector's verdict on x (reconstruction MSE over its calibrated threshold; MagNet: either detector)."""
        if self.reformed is not None:
            return torch.cat([self.reformed.excess(x[i : i + batch].to(self.device)).cpu() > 0
                              for i in range(0, len(x), batch)])  # fmt: skip
        assert self.bpda is not None and self.threshold is not None
        recon = torch.cat([self.bpda.purify(x[i : i + batch].to(self.device)).cpu() for i in range(0, len(x), batch)])
        return (recon - x).pow(2).flatten(1).mean(1) > self.threshold

    def judge(self, name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Per image: did the pipeline defend it? "correct", or "correct-or-flagged" (the detector counts)."""
        if name == "correct":
            return self.correct
        return lambda x, y: self.correct(x, y) | self.flagged(x)

    def on_device(self, fn: Attack) -> Attack:
        """An attack of ours (tensors on the model's device) as one taking and returning CPU tensors."""
        return lambda x, y: fn(x.to(self.device), y.to(self.device)).cpu()

    def attack(self, name: str, norm: str, eps: float, seed: int, budget: Budget) -> Attack:
        """The attack `name` against this pipeline, as x, y ↦ x_adv (CPU tensors; it computes on the device)."""
        b, dev = budget, self.device
        if self.defense in ("none", "magnet") and name in BARE_ATTACKS:  # MagNet: exact gradients through the AE
            model = self.ort if name == "square" and self.ort else self.forward  # Square only queries: ONNX Runtime
            targets = b.fab_targets if name == "fab-t" else 9
            return make_reference(model, norm, eps, name, seed, b.iters, targets, b.square_queries, b.batch, dev)
        if name == "square":
            return make_reference(self.forward, norm, eps, name, seed, 0, 0, b.defended_square_queries, b.batch, dev)
        if name.startswith(("bpda-", "exact-")):
            kind, _, attack = name.partition("-")
            model = self.bpda if kind == "bpda" else self.exact
            return make_reference(model, norm, eps, attack, seed, b.defended_iters, b.defended_targets, 0, b.batch,
                                  dev)  # fmt: skip
        if name == "latent":
            if norm != "linf":
                return lambda x, y: x  # the latent attack is L∞ only: nothing to add under L2
            return self.on_device(lambda x, y: latent(self.bpda, x, y, eps=eps, steps=budget.latent_steps))
        if name == "detector-aware":
            target = self.reformed or self.bpda
            assert target is not None and self.threshold is not None
            return self.on_device(lambda x, y: detector_aware(target, x, y, self.threshold, eps=eps, alpha=eps / 10,
                                                              steps=budget.defended_iters * 2, norm=norm,
                                                              seed=seed))  # fmt: skip
        if name == "pgd-ours":  # the service's own PGD, cross-checked against APGD-CE
            fn = pgd if norm == "linf" else pgd_l2
            return self.on_device(lambda x, y: fn(self.forward, x, y, eps=eps, alpha=eps / 10, steps=budget.iters))
        raise ValueError(f"unknown attack {name!r}")


def within(adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Per image: adv is a valid attack (in [0, 1] and inside the ε-ball, with float slack)."""
    d = (adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    return (size <= eps * (1 + 1e-5) + 1e-6) & (adv.flatten(1).amin(1) >= 0) & (adv.flatten(1).amax(1) <= 1)


def _cache_path(p: Pipeline, norm: str, eps: float, attacks: tuple[str, ...], n: int, seed: int,
                budget: Budget, judge: str, images: str) -> Path:  # fmt: skip
    """The cache file of one cell; `images` names the image set when it is not the slice's first n."""
    # the budget's fields, FAB-T's targets only where FAB-T ran and they are not the standard 9 (a later field:
    # the cells cached before it keep their keys)
    b = {k: v for k, v in budget.__dict__.items() if k != "fab_targets"}
    if "fab-t" in attacks and budget.fab_targets != 9:
        b["fab_targets"] = budget.fab_targets
    # the device only where it is not the CPU (GPU kernels round differently; the CPU cells keep their keys)
    key = json.dumps([p.dataset, p.name, p.weights_sha, norm, eps, attacks, n, seed, b]
                     + ([judge] if judge != "correct" else []) + ([images] if images else [])
                     + ([p.device.type] if p.device.type != "cpu" else []))  # fmt: skip
    return CACHE / f"{p.dataset}-{p.name}-{norm}{eps:g}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def worst_case(p: Pipeline, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, attacks: tuple[str, ...],
               seed: int, budget: Budget, judge: str = "correct", images: str = "") -> dict:  # fmt: skip
    """Run `attacks` in order, each on the images still robust; per-image robust flags after each attack.
    `judge`: what counts as defended ("correct", or "correct-or-flagged" where the detector rejects)."""
    ok = p.judge(judge)
    robust = ok(x, y)
    out: dict = {"n": len(x), "clean_correct": int(robust.sum()), "after": {}, "seconds": {}}
    for i, name in enumerate(attacks):
        path = _cache_path(p, norm, eps, attacks[: i + 1], len(x), seed, budget, judge, images)
        if path.exists():
            cached = json.loads(path.read_text())
            robust = torch.tensor(cached["robust"], dtype=torch.bool)
            out["after"][name], out["seconds"][name] = int(robust.sum()), cached["seconds"]
            continue
        t0, idx = time.time(), robust.nonzero().flatten()
        if len(idx):
            adv = p.attack(name, norm, eps, seed, budget)(x[idx], y[idx])
            still = ok(adv, y[idx]) | ~within(adv, x[idx], norm, eps)  # an out-of-budget "attack" fails
            robust = robust.clone()
            robust[idx] = still
        secs = round(time.time() - t0, 1)
        out["after"][name], out["seconds"][name] = int(robust.sum()), secs
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"robust": robust.tolist(), "seconds": secs}))
        log.info("%s %s ε=%g after %s: %d/%d robust (%.0f s)", p.name, norm, eps, name, int(robust.sum()), len(x),
                 secs)  # fmt: skip
    k = int(robust.sum())
    out |= {"robust": k, "accuracy": round(k / len(x), 4), "ci": [round(v, 4) for v in wilson(k, len(x))],
            "robust_flags": robust.tolist()}  # fmt: skip
    return out


def clean_accuracy(p: Pipeline, dataset: str, n: int, reg: Registry | None = None) -> dict:
    """Clean accuracy on the first n of the full test set (the 10,000 when the dataset cache exists). A bare
    classifier's full-test-set accuracy is the one its training job measured and recorded (the same weights,
    the same images), when `reg` is given and the record covers n images."""
    rec = reg.get(f"{dataset}/{p.classifier}").metrics if reg is not None and p.defense == "none" else {}
    if rec.get("clean_test_accuracy") is not None and rec.get("test_images") == n:
        k = round(rec["clean_test_accuracy"] * n)
        return {"accuracy": round(k / n, 4), "n": n, "ci": [round(v, 4) for v in wilson(k, n)]}
    try:
        arr = data.load(dataset)
        xs, ys = arr["x_test"][:n], arr["y_test"][:n]
    except data.DataError:
        xs, ys = data.load_slice(dataset)
        xs, ys = xs[:n], ys[:n]
    x, y = torch.from_numpy(data.to_float(xs)), torch.from_numpy(ys.astype(np.int64))
    k = int(p.correct(x, y).sum())
    return {"accuracy": round(k / len(x), 4), "n": len(x), "ci": [round(v, 4) for v in wilson(k, len(x))]}


def sanity(p: Pipeline, x: torch.Tensor, y: torch.Tensor, norm: str, eps: float, seed: int, budget: Budget) -> dict:
    """Carlini et al.'s checks on one pipeline: accuracy falls to 0 as ε grows, more iterations never raise it,
    and black-box (Square) never beats white-box (APGD-CE) by much."""

    def acc(attack: str, e: float, b: Budget) -> float:
        if e == 0:
            return float(p.correct(x, y).float().mean())
        adv = p.attack(attack, norm, e, seed, b)(x, y)
        return float((p.correct(adv, y) & within(adv, x, norm, e)).float().mean())

    grad = "apgd-ce" if p.defense in CHEAP else "bpda-apgd-ce"
    few = Budget(iters=10, defended_iters=10, batch=budget.batch)
    factors = (0.0, 0.5, 1.0, 1.5, 2.0, 3.5)
    sweep = {f"{eps * f:g}": round(acc(grad, eps * f, budget), 4) for f in factors}
    steps = {"10": round(acc(grad, eps, few), 4), "full": round(acc(grad, eps, budget), 4)}
    white, black = steps["full"], acc("square", eps, budget)
    vals = list(sweep.values())
    checks = {
        "accuracy falls as ε grows": all(b <= a + 0.01 for a, b in zip(vals, vals[1:], strict=False)),
        "accuracy reaches ≤ 0.05 at 3.5·ε": vals[-1] <= 0.05,
        "more iterations do not raise accuracy": steps["full"] <= steps["10"] + 0.01,
        "black-box does not beat white-box by > 0.05": black >= white - 0.05,
    }
    return {"n": len(x), "attack": grad, "eps_sweep_apgd_ce": sweep, "iterations_apgd_ce": steps,
            "white_box_apgd_ce": round(white, 4),
            "black_box_square": round(black, 4), "checks": checks}  # fmt: skip


def pipelines(reg: Registry, dataset: str, defended: list[str] | None = None) -> list[tuple[str, str]]:
    """Every classifier bare; behind the warm-start projection the `defended` ones (default: the adversarially
    trained and the enhanced); behind MagNet (where shipped) classifier A, the papers' model, and the
    adversarially trained ones."""
    out = [(c, "none") for c in reg.classifiers(dataset)]
    robust = [
        c
        for c in reg.classifiers(dataset)
        if reg.get(f"{dataset}/{c}").raw.get("training", {}).get("method") in ("pgd", "trades", "enhanced-inc")
    ]
    if reg.has(f"{dataset}/encoder") and reg.has(f"{dataset}/generator"):
        out += [(c, "invert-classify") for c in (defended if defended is not None else robust)]
    if reg.has(f"{dataset}/magnet"):
        out += [(c, "magnet") for c in ["classifier_A", *robust] if reg.has(f"{dataset}/{c}")
                and not c.endswith("_enhanced")]  # fmt: skip
    return out


def choose_default(results: list[dict], dataset: str) -> dict | None:
    """Highest worst-case accuracy at the standard threat among pipelines meeting the clean bar, compared on the
    images all of them were attacked on (the first min n of the slice: a 200-image estimate must not beat a
    1,000-image one by sampling luck), then on clean accuracy."""
    std = threat_key(*STANDARD[dataset])
    ok = [r for r in results if r["clean"]["accuracy"] >= CLEAN_BAR[dataset] and std in r["threats"]]
    if not ok:
        return None
    common = min(r["threats"][std].get("n", 0) for r in ok)

    def paired(r: dict) -> float:
        flags = r["threats"][std].get("robust_flags")
        return sum(flags[:common]) / common if flags and common else r["threats"][std]["accuracy"]

    best = max(ok, key=lambda r: (paired(r), r["clean"]["accuracy"]))
    return {"classifier": f"{dataset}/{best['classifier']}", "defense": best["defense"]}


class OrtForward:
    """A bare classifier's forward pass through ONNX Runtime (2–3× eager torch on CPU): Square's queries only."""

    def __init__(self, reg: Registry, dataset: str, classifier: str) -> None:
        from service.classify import OnnxClassifier

        key = f"{dataset}/{classifier}"
        self.session = OnnxClassifier(reg.read(key, "onnx"), reg.read(key, "weights"), threads=torch.get_num_threads())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.logits(x.detach().cpu().numpy())).to(x.device)


def evaluate_pipeline(reg: Registry, dataset: str, classifier: str, defense: str, x: torch.Tensor,
                      y: torch.Tensor, args: argparse.Namespace, budget: Budget) -> dict:  # fmt: skip
    """Clean accuracy and the per-image worst case under every threat of the dataset."""
    p = Pipeline(reg, dataset, classifier, defense, args.device)
    method = reg.get(f"{dataset}/{classifier}").raw.get("training", {}).get("method", "standard")
    robust_trained = method in ("pgd", "trades", "enhanced-inc")
    attacks = attacks_for(defense, tuple(args.bare_attacks))
    clean = clean_accuracy(p, dataset, 10000 if defense in CHEAP else args.clean_n, reg)
    candidate = robust_trained and clean["accuracy"] >= CLEAN_BAR[dataset]  # could be the default
    threats = {}
    for norm, eps in THREATS[dataset]:
        if defense == "magnet":
            n = args.n_baseline
        elif defense != "none":
            n = args.defended_n if (norm, eps) == STANDARD[dataset] else args.defended_n_other
        elif not candidate:
            n = args.n_baseline
        elif (norm, eps) == STANDARD[dataset]:
            n = args.n
        else:
            n = args.n_other
        n = min(n, len(x))
        threats[threat_key(norm, eps)] = worst_case(p, x[:n], y[:n], norm, eps, attacks, args.seed, budget)
    out = {"classifier": classifier, "defense": defense, "method": method, "clean": clean, "attacks": attacks,
           "threats": threats}  # fmt: skip
    if defense != "none" and p.threshold is not None:
        norm, eps = STANDARD[dataset]
        n = min(args.defended_n, len(x))
        detect = detect_attacks_for(defense)
        cell = worst_case(p, x[:n], y[:n], norm, eps, detect, args.seed, budget, "correct-or-flagged")
        out["detect_or_correct"] = {threat_key(norm, eps): cell, "threshold": p.threshold, "attacks": detect}
    return out


def record(results: list[dict], default: dict | None, dataset: str, info: dict, models_dir: Path) -> None:
    """Each pipeline's figures into its classifier's manifest entry; the dataset's default pipeline."""
    with edit_manifest(models_dir) as man:
        for r in results:
            entry = man["artifacts"][f"{dataset}/{r['classifier']}"]
            rob = entry.setdefault("metrics", {}).setdefault("robustness", {})
            rob[r["defense"]] = {
                "clean": r["clean"],
                **{t: {k: v[k] for k in ("accuracy", "ci", "n")} | {"attacks": list(r["attacks"])}
                   for t, v in r["threats"].items()},
                "evaluation": info,
            }  # fmt: skip
            if "detect_or_correct" in r:
                d = r["detect_or_correct"]
                rob[r["defense"]]["detect_or_correct"] = {
                    t: {k: c[k] for k in ("accuracy", "ci", "n")} | {"attacks": list(d["attacks"])}
                    for t, c in d.items() if t not in ("threshold", "attacks")
                } | {"threshold": d["threshold"]}  # fmt: skip
        if default is not None:
            man.setdefault("defaults", {})[dataset] = {**default, "threat": threat_key(*STANDARD[dataset]),
                                                        "command": info["command"]}  # fmt: skip


def _cell(t: dict | None) -> str:
    if t is None:
        return "–"
    return f"{t['accuracy']:.3f} [{t['ci'][0]:.3f}, {t['ci'][1]:.3f}] (n={t['n']})"


def _runs(doc: dict) -> list[dict]:
    """The distinct runs that measured the page's rows, oldest first."""
    runs: list[dict] = []
    for info in [r.get("evaluation", doc["info"]) for r in doc["results"]]:
        if info not in runs:
            runs.append(info)
    return sorted(runs, key=lambda i: i["date"]) or [doc["info"]]


def _runs_lines(runs: list[dict]) -> list[str]:
    """Where the rows were measured: one sentence, or a numbered list that the table's `run` column points into."""
    said = [f"{i['date']} on {i['machine']}, `{i['command']}`, commit {i['commit']}" for i in runs]
    if len(said) == 1:
        return [f"Recorded {said[0]}."]
    return ["Rows recorded by these runs (a run with `--only` replaces its pipelines' rows and keeps the others):",
            "", *[f"{k}. {line}" for k, line in enumerate(said, 1)]]  # fmt: skip


def render(docs: Path = DOCS) -> str:
    """docs/robustness.md from every docs/robustness-<dataset>.json present."""
    lines = [
        "# Measured robustness (AutoAttack-grade, per-image worst case)",
        "",
        "Generated by `python -m training.robustness` (module docstring: the attacks, their order and settings).",
        "Each cell: accuracy under the per-image worst case of every attack listed for the pipeline, Wilson 95%",
        "interval, n images (the first n of the committed slice). Clean: the 10,000 test images (bare), the first",
        "2,000 (behind the projection). An image counts",
        "as robust only if every attack failed on it. Bare pipelines: AutoAttack standard (APGD-CE, APGD-T, FAB-T,",
        "Square 5,000) from the authors' `pyautoattack`. Behind the warm-start projection: BPDA-APGD-CE/T,",
        "APGD-CE through the exactly differentiated 25-step projection, the latent attack (L∞), Square. Through",
        "MagNet's autoencoder reformer (exactly differentiable): AutoAttack standard, as on a bare classifier.",
        "",
    ]
    for path in sorted(docs.glob("robustness-*.json")):
        doc = json.loads(path.read_text())
        ds, threats = doc["dataset"], [threat_key(*t) for t in doc["threats"]]
        runs = _runs(doc)
        lines += [f"## {ds}", "", *_runs_lines(runs), ""]
        pub = PUBLISHED.get(ds, [])
        if pub:
            lines += [f"Published at {threat_key(*STANDARD[ds])}, for comparison:", "",
                      "| model | clean | robust | attack | source |", "|---|---|---|---|---|",
                      *[f"| {m} | {c:.4f} | {r:.4f} | {a} | {src} |" for m, c, r, a, src in pub], ""]  # fmt: skip
        bare = next((r["attacks"] for r in doc["results"] if r["defense"] == "none"), [])
        lines += [f"Attacks on bare classifiers in this run: {', '.join(bare)} (the command's flags set FAB-T's "
                  "target classes; AutoAttack standard: all four, 9 targets).", ""]  # fmt: skip
        d = doc.get("default")
        lines += [f"**Served by default**: `{d['classifier']}` with defense `{d['defense']}`." if d else
                  "**No pipeline meets the clean bar**: the service keeps its configured default.", ""]  # fmt: skip
        head = ["classifier", "training", "defense", "clean", *threats] + (["run"] if len(runs) > 1 else [])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in doc["results"]:
            clean = r["clean"]
            row = [r["classifier"], r["method"], r["defense"], f"{clean['accuracy']:.4f} (n={clean['n']})",
                   *[_cell(r["threats"].get(t)) for t in threats]]  # fmt: skip
            row += [str(runs.index(r.get("evaluation", doc["info"])) + 1)] if len(runs) > 1 else []
            lines.append("| " + " | ".join(row) + " |")
        dets = [r for r in doc["results"] if "detect_or_correct" in r]
        if dets:
            lines += ["", "Correct or flagged (the detector's rejections count as defended) at "
                      f"{threat_key(*STANDARD[ds])}, under attacks that also keep the detectors under their "
                      "thresholds (detector-aware PGD: BPDA through a projection, exact through MagNet; the latent "
                      "attack):", "",
                      "| classifier | defense | threshold | attacks | worst case | plain worst case |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            for r in dets:
                d, std_ = r["detect_or_correct"], threat_key(*STANDARD[ds])
                names = ", ".join(d.get("attacks", DETECT_ATTACKS))
                lines.append(f"| {r['classifier']} | {r['defense']} | {d['threshold']:.4f} | {names} | "
                             f"{_cell(d.get(std_))} | {_cell(r['threats'].get(std_))} |")  # fmt: skip
        lines += ["", "Per attack (robust images left after each, in order) for the standard threat:", ""]
        std = threat_key(*STANDARD[ds])
        for r in doc["results"]:
            t = r["threats"].get(std)
            if t:
                steps = ", ".join(f"{a} {k}" for a, k in t["after"].items())
                lines.append(f"- {r['classifier']} + {r['defense']}: clean {t['clean_correct']}/{t['n']} → {steps}")
        if doc.get("sanity"):
            s = doc["sanity"]
            lines += ["", f"Sanity checks (Carlini et al. 2019) on `{s['pipeline']}`, n={s['n']}, "
                      f"{s['threat']}:", "", f"- APGD-CE accuracy by ε: {s['eps_sweep_apgd_ce']}",
                      f"- APGD-CE by iterations: {s['iterations_apgd_ce']}",
                      f"- white-box APGD-CE {s['white_box_apgd_ce']}, black-box Square {s['black_box_square']}",
                      *[f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in s["checks"].items()]]  # fmt: skip
        if doc.get("holdout"):
            h = doc["holdout"]
            lines += ["", f"Held out (test images {h['test_indices'][0]}–{h['test_indices'][1] - 1}, outside the "
                      f"slice; same attacks, another seed): `{h['pipeline']}` at {h['threat']}: "
                      f"{_cell(h)}; clean {h['clean_correct']}/{h['n']}."]  # fmt: skip
        if doc.get("cross_check"):
            c = doc["cross_check"]
            lines += ["", f"Own attack vs reference on `{c['pipeline']}` ({c['threat']}, same {c['n']} images): "
                      f"the service's PGD-{c['iters']} {c['ours']:.3f}, pyautoattack APGD-CE {c['reference']:.3f} "
                      f"(difference {c['ours'] - c['reference']:+.3f})."]  # fmt: skip
        lines.append("")
    text = "\n".join(lines)
    (docs / "robustness.md").write_text(text)
    return text


def strip_flags(r: dict) -> dict:
    """A result without its per-image flags (kept in the cache, not on the page)."""

    def cells(d: dict) -> dict:
        return {t: {k: v for k, v in c.items() if k != "robust_flags"} if isinstance(c, dict) else c
                for t, c in d.items()}  # fmt: skip

    out = {**r, "threats": cells(r["threats"])}
    if "detect_or_correct" in r:
        out["detect_or_correct"] = cells(r["detect_or_correct"])
    return out


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
    xs, ys = data.load_slice(args.dataset)
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
    default = choose_default(merge(previous_rows(args.dataset) if partial else [], results, order), args.dataset)
    checks: dict = {}
    if default and not args.no_sanity:
        checks |= sanity_and_cross_check(reg, args, default, x, y, budget)
    if default and args.holdout:
        checks["holdout"] = holdout(reg, args, default, budget)
    if args.quick:
        rows = merge([], results, order)
        return page_doc(args.dataset, info, rows, choose_default(rows, args.dataset), checks)
    return publish(args, reg, results, partial, info, checks)


def page_doc(dataset: str, info: dict, rows: list[dict], default: dict | None, checks: dict) -> dict:
    """docs/robustness-<dataset>.json's content."""
    return {"dataset": dataset, "threats": THREATS[dataset], "info": info,
            "results": [pack_flags(r, dataset) for r in rows], "default": default, **checks}  # fmt: skip


def publish(args: argparse.Namespace, reg: Registry, results: list[dict], partial: bool, info: dict,
            checks: dict) -> dict:  # fmt: skip
    """Write the page's JSON (a partial run's rows in place of theirs, merged under a lock so that runs side by
    side keep each other's rows), the page, and the manifest's figures and default. The previous sanity and
    held-out checks stay where this run made none for the same default."""
    path = DOCS / f"robustness-{args.dataset}.json"
    with edit_json(path) as doc:
        old = rows_of(doc, args.dataset)
        rows = merge(old if partial else [], results, pipelines(reg, args.dataset, None))
        default = choose_default(rows, args.dataset)
        kept = {k: doc[k] for k in ("sanity", "cross_check", "holdout") if k in doc and doc.get("default") == default
                and doc[k].get("pipeline") == _pipeline_name(default)}  # fmt: skip
        new = page_doc(args.dataset, info, rows, default, kept | checks)
        doc.clear()
        doc.update(new)
    render(DOCS)
    record(results, default, args.dataset, info, args.models_dir)
    return new


def _pipeline_name(default: dict | None) -> str:
    """A default's pipeline as `Pipeline.name` spells it."""
    return f"{default['classifier'].split('/', 1)[1]}+{default['defense']}" if default else ""


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


def previous_rows(dataset: str, docs: Path | None = None) -> list[dict]:
    """The rows of the dataset's recorded evaluation (each with the run that measured it)."""
    path = (docs or DOCS) / f"robustness-{dataset}.json"
    if not path.exists():
        return []
    return rows_of(json.loads(path.read_text()), dataset)


def rows_of(doc: dict, dataset: str) -> list[dict]:
    """A page JSON's rows with their per-image flags, each naming the run that measured it."""
    return [{"evaluation": doc["info"]} | unpack_flags(r, dataset) for r in doc.get("results", [])]


def merge(old: list[dict], new: list[dict], order: list[tuple[str, str]]) -> list[dict]:
    """`old` with the rows of `new` in place of those for the same pipeline, in `order` (pipelines no longer
    served are dropped)."""
    by = {(r["classifier"], r["defense"]): r for r in old} | {(r["classifier"], r["defense"]): r for r in new}
    return [by[k] for k in order if k in by]


def pack_flags(r: dict, dataset: str) -> dict:
    """A result for the page's JSON: per-image flags only at the standard threat (what `choose_default` pairs
    on), as a string of 0s and 1s."""
    std = threat_key(*STANDARD[dataset])
    out = strip_flags(r)
    flags = r["threats"].get(std, {}).get("robust_flags")
    if flags is not None:
        out["threats"][std] = out["threats"][std] | {"robust_bits": "".join("1" if f else "0" for f in flags)}
    return out


def unpack_flags(r: dict, dataset: str) -> dict:
    """`pack_flags` undone."""
    std = threat_key(*STANDARD[dataset])
    cell = r["threats"].get(std)
    if not cell or "robust_bits" not in cell:
        return r
    flags = [c == "1" for c in cell["robust_bits"]]
    return r | {"threats": r["threats"] | {std: {k: v for k, v in cell.items() if k != "robust_bits"}
                                           | {"robust_flags": flags}}}  # fmt: skip


def holdout(reg: Registry, args: argparse.Namespace, default: dict, budget: Budget) -> dict:
    """The default pipeline at the standard threat on held-out test images outside the committed slice
    (test indices 5,000 onwards), same attacks: a check that the slice was not what the figures fit."""
    arr = data.load(args.dataset)
    lo, hi = 5000, 5000 + args.holdout
    x = torch.from_numpy(data.to_float(arr["x_test"][lo:hi]))
    y = torch.from_numpy(arr["y_test"][lo:hi].astype(np.int64))
    p = Pipeline(reg, args.dataset, default["classifier"].split("/", 1)[1], default["defense"], args.device)
    norm, eps = STANDARD[args.dataset]
    attacks = attacks_for(p.defense)
    cell = worst_case(p, x, y, norm, eps, attacks, args.seed + 1, budget, images=f"test[{lo}:{hi}]")
    return {"pipeline": p.name, "threat": threat_key(norm, eps), "test_indices": [lo, hi],
            **{k: v for k, v in cell.items() if k != "robust_flags"}}  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=data.DATASETS, required=True)
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
    return p.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run(parse())
