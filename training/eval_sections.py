"""The sections of `training.evaluate`'s tables: clean, white-box, black-box, adaptive, and the detector's ROC AUC,
each filling `Evaluation.results` as it measures."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from service.attacks import Defended, eot, latent
from service.purify import roc_auc
from training.eval_core import Measurements
from training.eval_protocol import ATTACK_NAMES, CLASSIFIERS, COLUMNS, EPS, PAIRS, auc_ci, digest


class Evaluation(Measurements):
    """Holds the models, the images, the caches and the results of one run."""

    def row(self, arch: str, key: tuple, cell: Callable[[str], object]) -> dict:
        """One table row: per column why it is unavailable, else the previous run's cell where this run leaves the
        column out (`key` names it), else `cell(col)` measured now."""
        out: dict = {}
        for col in COLUMNS:
            why = self.unavailable(arch, col)
            skip = why or col not in self.columns
            out[col] = (why or self.reused(key, arch, col)) if skip else cell(col)
        return out

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
                row = self.row(
                    arch, ("whitebox", attack, arch), lambda col, a=attack, c=arch: self.whitebox_cell(a, c, col)
                )
                self.results["whitebox"].setdefault(attack, {})[arch] = row

    def whitebox_cell(self, attack: str, arch: str, col: str) -> dict:
        t0 = time.time()
        adv = self.whitebox_adv(attack, self.attack_model_key(arch, col), self.x, self.y)
        out = self.measure(arch, col, adv, self.y, f"{ATTACK_NAMES[attack]} {arch}")
        if attack == "cw":
            out["mean_l2"] = float((adv - self.x).flatten(1).norm(dim=1).mean())
        out["attack_seconds"] = round(time.time() - t0, 1)
        return out

    def run_blackbox(self) -> None:
        if self.holdout is None:
            print("== black-box: no held-out images, skipped", flush=True)
            return
        print(f"== black-box substitute FGSM ε={EPS} (Papernot et al.; {len(self.holdout)} held-out seeds)")
        for arch, sub in PAIRS:

            def cell(col: str, arch: str = arch, sub: str = sub) -> dict:
                adv = self.substitute_adv(self.attack_model_key(arch, col), sub)
                return self.measure(arch, col, adv, self.y, f"substitute {arch}/{sub}")

            self.results["blackbox"][f"{arch}/{sub}"] = self.row(arch, ("blackbox", f"{arch}/{sub}"), cell)

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
                row = self.row(arch, ("adaptive", attack, arch),
                               lambda col, a=attack, c=arch: self.adaptive_cell(a, c, col, x, y))  # fmt: skip
                self.results["adaptive"].setdefault(attack, {})[arch] = row

    def adaptive_cell(self, attack: str, arch: str, col: str, x: torch.Tensor, y: torch.Tensor) -> dict | str:
        if self.projection(col) is None and attack == "latent":
            return "n/a"
        t0 = time.time()
        adv = self.adaptive_adv(attack, arch, col, x, y)
        out = self.measure(arch, col, adv, y, f"{ATTACK_NAMES[attack]} {arch}")
        out["attack_seconds"] = round(time.time() - t0, 1)
        self.adv_cache[("adaptive", attack, arch, col)] = adv
        return out

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
