"""The attacks of `training.robustness`: one pipeline (classifier, and the projection or MagNet in front of it) and
each attack against it, the per-image worst case over an ordered list of attacks (cached per cell under
runs/robustness/), clean accuracy, and Carlini et al.'s sanity checks."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.attacks import Defended, Reformed, Unrolled, detector_aware, latent, pgd, pgd_l2
from service.registry import Registry
from service.stats import wilson
from training import data
from training.common import ROOT, eval_slice, warm_config
from training.robustness_protocol import BARE_ATTACKS, CHEAP, NORMS, Budget

log = logging.getLogger("robustness")
Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

CACHE = ROOT / "runs" / "robustness"


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


class Pipeline:
    """classifier ∘ (projection), with the modules each attack needs, on `device`; images in and out stay on the
    CPU (each call moves its batch)."""

    device = torch.device("cpu")
    classes = 10  # the classifier's classes (MNIST's here; `__init__` sets the dataset's)

    def __init__(self, reg: Registry, dataset: str, classifier: str, defense: str,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        self.dataset, self.classifier, self.defense, self.device = dataset, classifier, defense, torch.device(device)
        self.classes = reg.spec(dataset).num_classes  # the targeted attacks aim at the other classes, at most
        clf = reg.classifier(dataset, classifier, self.device)
        self.weights_sha = reg.get(f"{dataset}/{classifier}").files["weights"]["sha256"]
        self.ort = OrtForward(reg, dataset, classifier) if defense == "none" else None
        self.bpda = self.exact = self.threshold = self.reformed = self.detector = self.magnet_detector = None
        if defense == "none":
            self.forward: nn.Module = clf
        elif defense == "magnet":
            self.magnet_detector = reg.magnet_detector(dataset)
            thresholds = (self.magnet_detector.threshold_i, self.magnet_detector.threshold_ii)
            self.forward = self.reformed = Reformed(clf, reg.magnet(dataset, self.device), thresholds)
            self.threshold = thresholds[0]
            self.weights_sha += reg.get(f"{dataset}/magnet").files["weights"]["sha256"][:16]
        else:
            gen, enc = reg.generator(dataset, self.device), reg.encoder(dataset, self.device)
            warm = warm_config(reg, dataset)  # the warm start the service serves (L=25, R=1 as recorded)
            self.bpda = Defended(clf, gen, warm, encoder=enc, seed=0)
            self.exact = Unrolled(clf, gen, warm, encoder=enc, seed=0)
            self.forward = self.bpda  # forward: the real projection (straight-through backward)
            self.detector = reg.detector(dataset, warm.init, warm.steps, warm.restarts)
            self.threshold = self.detector.threshold if self.detector else None
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
        """The detector's verdict on x (`Registry.verdict`: reconstruction MSE over the threshold calibrated for the
        warm start's L and R; `MagNetDetector`: either of MagNet's detectors)."""
        if self.reformed is not None:
            magnet = self.reformed.magnet
            return torch.cat([self.magnet_detector.flag(*magnet.scores(x[i : i + batch].to(self.device))).cpu()
                              for i in range(0, len(x), batch)])  # fmt: skip
        assert self.bpda is not None and self.detector is not None
        recon = torch.cat([self.bpda.purify(x[i : i + batch].to(self.device)).cpu() for i in range(0, len(x), batch)])
        return self.detector.flag((recon - x).pow(2).flatten(1).mean(1))

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
            targets = min(b.fab_targets if name == "fab-t" else 9, self.classes - 1)
            return make_reference(model, norm, eps, name, seed, b.iters, targets, b.square_queries, b.batch, dev)
        if name == "square":
            return make_reference(self.forward, norm, eps, name, seed, 0, 0, b.defended_square_queries, b.batch, dev)
        if name.startswith(("bpda-", "exact-")):
            kind, _, attack = name.partition("-")
            model = self.bpda if kind == "bpda" else self.exact
            targets = min(b.defended_targets, self.classes - 1)
            return make_reference(model, norm, eps, attack, seed, b.defended_iters, targets, 0, b.batch, dev)
        if name == "latent":
            if norm != "linf":
                return lambda x, y: x  # the latent attack is L∞ only: nothing to add under L2
            return self.on_device(lambda x, y: latent(self.bpda, x, y, eps=eps, steps=budget.latent_steps))
        if name.startswith("detector-aware"):  # "detector-aware-w<weight>"; plain: detector_aware's own weight
            target, weight = self.reformed or self.bpda, name.partition("-w")[2]
            assert target is not None and self.threshold is not None
            kw = {"weight": float(weight)} if weight else {}
            return self.on_device(lambda x, y: detector_aware(target, x, y, self.threshold, eps=eps, alpha=eps / 10,
                                                              steps=budget.defended_iters * 2, norm=norm,
                                                              seed=seed, **kw))  # fmt: skip
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
        xs, ys = eval_slice(dataset)
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


class OrtForward:
    """A bare classifier's forward pass through ONNX Runtime (2–3× eager torch on CPU): Square's queries only."""

    def __init__(self, reg: Registry, dataset: str, classifier: str) -> None:
        from service.classify import OnnxClassifier

        key = f"{dataset}/{classifier}"
        self.session = OnnxClassifier(reg.read(key, "onnx"), reg.read(key, "weights"), threads=torch.get_num_threads())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.logits(x.detach().cpu().numpy())).to(x.device)
