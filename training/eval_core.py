"""The measuring half of `training.evaluate`: the models of a run, its projection and attack caches (in memory and
on disk), and one cell's measurement (`Measurements.measure`). The sections that fill the tables are
`training.eval_sections`."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from service.attacks import Reformed, cw_defense_gan, fgsm, pgd, rand_fgsm, train_substitute
from service.purify import ProjectionConfig, project
from service.registry import Registry
from training import data
from training.common import eval_slice
from training.eval_protocol import CLASSIFIERS, COLUMNS, EPS, HOLDOUT, Cell, Settings, digest, from_json


class Measurements:
    """Holds the models, the images, the caches and the results of one run."""

    def __init__(self, reg: Registry, dataset: str, s: Settings, seed: int = 0, cache_dir: Path | None = None,
                 holdout: torch.Tensor | None = None, columns: set[str] | None = None,
                 previous: dict | None = None) -> None:  # fmt: skip
        self.reg, self.ds, self.s, self.seed = reg, dataset, s, seed
        # the columns this run measures; the others are the previous run's (results JSON), or "not measured"
        self.columns, self.previous = set(COLUMNS if columns is None else columns), previous or {}
        self.cache_dir = cache_dir
        xs, ys = eval_slice(dataset)
        if s.n > len(xs):  # the slice is the first 1,000 test images; beyond it, the test set minus the 150 seeds
            a = data.load(dataset)
            s.n = min(s.n, max(len(xs), len(a["x_test"]) - HOLDOUT))
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
            flagged = self.reg.verdict(self.ds, cfg, mse)[1]  # the threshold calibrated at cfg's start, L and R
        elif col == "magnet":  # MagNet's reformer, and either of its detectors over its threshold
            assert self.M is not None
            with torch.no_grad():
                images = torch.cat([self.M(adv[i : i + 500]) for i in range(0, len(adv), 500)])
                flagged = self.reg.magnet_detector(self.ds).flag(*self.M.scores(adv, images))
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
