"""Stateful query-attack detectors side by side on the same recorded query streams: Blacklight (the service's,
`service.guard`, its shipped settings) and Chen, Carlini & Wagner's similarity detector (`training.similarity`,
k = 50, calibrated to flag 0.1 % of benign queries, on raw pixels and on the project's GAN encoder).

    python -m training.detectors --dataset mnist            # → docs/detectors.md, docs/detectors-<dataset>.json
    python -m training.detectors --dataset shapes --n 50    # → docs/detectors-shapes.md (any other dataset: its own)

The streams: torchattacks' Square (L∞ 0.3 and L2 2.0, at most `--queries` per image, plain and with OARS's random
transforms of every query) against classifier A in this process, one recorded stream per held-out image (the
blackbox evaluation's attacked images), and the blackbox evaluation's benign stream (2,000 held-out images among
200 clients, and among 20, about 30 % re-sent as the same image, JPEG, cropped or brighter). Each stream is then
replayed into a fresh detector per cell, its queries spread round-robin over 1 or 100 identities of its own (each
image from fresh identities: the attacker's best case); a refused query is re-sent by the next identity not yet
refused, as an attacker rotating identities would. An image is defended
when every identity was refused before the attack's first query that fooled the model. The replay cannot follow
an attacker that adapts to refusals beyond rotating; `training.blackbox` measures that through the real service.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from service.attacks.query import LastIterateSquare, benign_plans, oars
from service.config import ClientSettings
from service.guard import BlacklightConfig, GuardCore, Throttled
from service.guard.streams import resend
from service.registry import Registry
from service.stats import wilson
from training import data
from training.blackbox import BENIGN, POOL, SEEDS
from training.common import MODELS_DIR, ROOT, command_line, git_commit
from training.robustness_protocol import THREATS as DATASET_THREATS
from training.similarity import SimilarityDetector, pixels

THREATS = (("linf", 0.3), ("l2", 2.0))  # MNIST's, Fashion-MNIST's too; another data set: training.robustness's
IDENTITIES = (1, 100)
CALIBRATION = 1000  # benign images for Chen's threshold: the pool's last, outside every stream


class Recorder(nn.Module):
    """The attacked model as the attacker sees it for one image: each query (after the attacker's own transform)
    kept in order with whether the model was fooled by it."""

    def __init__(self, model: nn.Module, x0: np.ndarray, y: int, transform: Callable | None, seed: int) -> None:
        super().__init__()
        self.model, self.x0, self.y, self.transform = model, x0, y, transform
        self.rng = np.random.default_rng(seed)
        self.queries: list[np.ndarray] = []
        self.fooled: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().numpy().astype(np.float32)
        if self.transform is not None:
            rows = self.transform(rows, np.repeat(self.x0, len(rows), axis=0), self.rng)
        with torch.no_grad():
            logits = self.model(torch.from_numpy(rows))
        self.queries += list(rows)
        self.fooled += (logits.argmax(1) != self.y).tolist()
        return logits


def record(model: nn.Module, x: np.ndarray, y: np.ndarray, norm: str, eps: float, queries: int,
           transformed: bool) -> list[tuple[np.ndarray, int | None]]:  # fmt: skip
    """Per image: (its queries N×C×H×W, the index of the first that fooled the model or None)."""
    streams = []
    for i in range(len(x)):
        rec = Recorder(model, x[i : i + 1], int(y[i]), oars(norm, eps) if transformed else None, seed=i)
        atk = LastIterateSquare(rec, norm="Linf" if norm == "linf" else "L2", eps=eps, n_queries=queries - 1, seed=i)
        atk(torch.from_numpy(x[i : i + 1]), torch.from_numpy(y[i : i + 1]))
        first = next((q for q, f in enumerate(rec.fooled) if f), None)
        streams.append((np.stack(rec.queries), first))
    return streams


class Blacklight:
    """The service's detector (its shipped settings, or K = `matches`), limits out of reach."""

    def __init__(self, matches: int | None = None) -> None:
        cfg = BlacklightConfig() if matches is None else BlacklightConfig(matches=matches)
        self.core = GuardCore(ClientSettings(rate_per_s=1e12, burst=10**12, budget=10**15), config=cfg)

    def refuses(self, client: str, x: np.ndarray) -> bool:
        try:
            self.core.check(client, x[None])
        except Throttled as e:
            return e.reason == "detected"
        return False


class Chen:
    """Chen et al.'s detector; a flagged client is refused from then on (its buffer restarts, as in the paper)."""

    def __init__(self, template: SimilarityDetector) -> None:
        self.det = SimilarityDetector(template.embed, template.threshold, template.k, template.buffer)
        self.banned: set[str] = set()

    def refuses(self, client: str, x: np.ndarray) -> bool:
        if client in self.banned:
            return True
        if self.det.observe(client, x):
            self.banned.add(client)
            return True
        return False


Factory = Callable[[], "Blacklight | Chen"]  # a detector with a fresh state per call


@dataclass
class Replay:
    """One attack stream replayed: answered queries, identities refused, whether all were before the success."""

    stopped_at: int | None  # query index at which the last identity was refused (None: never)
    first_refusal: int | None
    refused: int


def replay(det: Blacklight | Chen, tag: str, stream: np.ndarray, first: int | None, identities: int) -> Replay:
    """Send the stream's queries round-robin over `identities`; a refused query goes again by the next one alive.
    Stops at the first query that fooled the model (the attacker has what it came for) or when none is alive."""
    alive, turn, first_refusal = list(range(identities)), 0, None
    end = len(stream) if first is None else first + 1
    for q in range(end):
        while alive:
            who = alive[turn % len(alive)]
            if not det.refuses(f"{tag}/{who}", stream[q]):
                turn += 1
                break
            alive.remove(who)
            first_refusal = q if first_refusal is None else first_refusal
        if not alive:
            return Replay(q, first_refusal, identities)
    return Replay(None, first_refusal, identities - len(alive))


def benign_flagged(make: Factory, x: np.ndarray, clients: int, seed: int) -> dict:
    """The benign stream's clients (interleaved round-robin, as concurrent clients arrive), and how many were ever
    refused."""
    plans = benign_plans(len(x), clients, 0.3, seed)
    rng, det, flagged = np.random.default_rng(seed + 1), make(), set()
    for step in range(max(len(p) for p in plans)):
        for k, plan in enumerate(plans):
            if step < len(plan):
                i, kind = plan[step]
                img = data.to_float(x[i : i + 1])[0]
                img = img if kind == "original" else resend(img, kind, rng)
                if det.refuses(f"benign/{k}", img):
                    flagged.add(k)
    n, f = len(plans), len(flagged)
    return {"clients": n, "queries": sum(len(p) for p in plans), "flagged": f, "fraction": round(f / n, 4),
            "ci": [round(v, 4) for v in wilson(f, n)]}  # fmt: skip


def cost_us(make: Factory, x: np.ndarray) -> float:
    """Microseconds per query of one detector, 1 image per call, two clients of len(x) / 2 queries each (Chen's
    k-NN search grows with a client's buffer: past k queries it searches them all)."""
    det = make()
    t = time.perf_counter()
    for i in range(len(x)):
        det.refuses(f"cost/{2 * i // len(x)}", x[i])
    return round((time.perf_counter() - t) * 1e6 / len(x), 1)


def detectors(reg: Registry, dataset: str, calibration: np.ndarray, matches: list[int],
              chen: bool = True) -> dict[str, tuple[str, Factory]]:  # fmt: skip
    """Each detector's (description, factory of a fresh state): Blacklight as shipped and at each K of `matches`;
    with `chen`, Chen et al.'s on pixels and on the encoder, their thresholds calibrated once."""
    shipped = BlacklightConfig().matches
    made: dict[str, tuple[str, Factory]] = {
        "blacklight" if k == shipped else f"blacklight-k{k}": (
            f"Blacklight (service.guard), K = {k} matched queries", lambda k=k: Blacklight(k))
        for k in [shipped, *(k for k in matches if k != shipped)]
    }  # fmt: skip
    if not chen:
        return made
    embeds: dict[str, Callable] = {"chen-pixels": pixels}
    enc = reg.encoder(dataset)
    if enc is not None:
        embeds["chen-encoder"] = lambda v: enc(torch.from_numpy(np.asarray(v, dtype=np.float32))).detach().numpy()
    for key, embed in embeds.items():
        template = SimilarityDetector.calibrate(embed, calibration, fpr=0.001, k=50)
        label = f"Chen et al., {'raw pixels' if key == 'chen-pixels' else 'GAN encoder'} (k 50, threshold " \
                f"{template.threshold:.3f})"  # fmt: skip
        made[key] = (label, lambda t=template: Chen(t))
    return made


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    logging.getLogger("service.guard").setLevel(logging.ERROR)  # one warning per detected identity otherwise
    t0 = time.time()
    arr = data.load(args.dataset)
    if len(arr["x_test"]) < POOL[1]:
        raise SystemExit(f"{args.dataset}: {len(arr['x_test'])} test images; the streams draw from test{list(POOL)}")
    order = np.random.default_rng(args.seed).permutation(np.arange(*POOL))
    att = order[BENIGN + SEEDS : BENIGN + SEEDS + args.n]
    xt, yt = arr["x_test"], arr["y_test"].astype(np.int64)
    x, y = data.to_float(xt[att]), yt[att]
    reg = Registry(args.models_dir)
    model = reg.module(f"{args.dataset}/classifier_A").eval()
    described = detectors(reg, args.dataset, data.to_float(xt[order[-CALIBRATION:]]), args.matches, not args.no_chen)
    names = {key: name for key, (name, _) in described.items()}
    made = {key: make for key, (_, make) in described.items()}
    cells = []
    threats = THREATS if args.dataset in ("mnist", "fmnist") else DATASET_THREATS[args.dataset]
    for (norm, eps), transformed in [(t, o) for t in threats for o in (False, True)]:
        streams = record(model, x, y, norm, eps, args.queries, transformed)
        broken = [f for _, f in streams if f is not None]
        attack = f"Square{' + OARS' if transformed else ''}"
        print(f"{attack} {norm} {eps:g}: {len(broken)}/{len(x)} images fooled, median query "
              f"{np.median(broken) if broken else '–'}", flush=True)  # fmt: skip
        for ids in IDENTITIES:
            for key, make in made.items():
                det = make()
                rs = [replay(det, f"img{i}", s, f, ids) for i, (s, f) in enumerate(streams)]
                cells.append(cell(key, attack, norm, eps, ids, streams, rs))
                print(f"  {ids:3d} identities, {key}: defended {cells[-1]['defended']}", flush=True)
    benign_x = xt[order[:BENIGN]]
    benign = {key: {str(c): benign_flagged(make, benign_x, c, args.seed) for c in (200, 20)}
              for key, make in made.items()}  # fmt: skip
    costs = {key: cost_us(make, data.to_float(benign_x[:400])) for key, make in made.items()}
    info = {"command": command_line(), "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
            "dataset": args.dataset, "n": args.n, "queries": args.queries, "seed": args.seed,
            "attacked": att.tolist(), "minutes": round((time.time() - t0) / 60, 1)}  # fmt: skip
    return {"info": info, "detectors": names, "cells": cells, "benign": benign, "cost_us": costs}


def cell(key: str, attack: str, norm: str, eps: float, ids: int,
         streams: list[tuple[np.ndarray, int | None]], rs: list[Replay]) -> dict:  # fmt: skip
    """One (detector, attack, threat, identities) figure: defended fraction with Wilson interval and n."""
    n = len(rs)
    stopped = [r for r, (_, f) in zip(rs, streams, strict=True) if r.stopped_at is not None]
    defended = sum(f is None or r.stopped_at is not None for r, (_, f) in zip(rs, streams, strict=True))
    firsts = [r.first_refusal for r in rs if r.first_refusal is not None]
    return {"detector": key, "attack": attack, "norm": norm, "eps": eps, "identities": ids, "n": n,
            "defended": round(defended / n, 4), "ci": [round(v, 4) for v in wilson(defended, n)],
            "stopped": len(stopped), "median_first_refusal": float(np.median(firsts)) if firsts else None,
            "mean_identities_refused": round(float(np.mean([r.refused for r in rs])), 1),
            "undefended_fooled": sum(f is not None for _, f in streams)}  # fmt: skip


def render(doc: dict) -> str:
    info = doc["info"]
    lines = ["# Stateful detectors compared on the same query streams", "",
             f"Generated by `{info['command']}` on {info['date']} at commit {info['commit']} ({info['minutes']} min);",
             "the module docstring of `training.detectors` says how the streams are made and replayed. Figures:",
             "images defended (the model never fooled, or every identity refused before the first query that fooled",
             f"it), Wilson 95% interval, n = {info['n']} held-out images; Square at most {info['queries']:,} queries",
             "per image against classifier A.", "", "Detectors:", ""]  # fmt: skip
    lines += [f"- `{k}`: {v}; {doc['cost_us'][k]:.0f} µs per query here" for k, v in doc["detectors"].items()]
    lines += ["", "| attack | threat | identities | fooled without a detector | "
              + " | ".join(f"`{k}`" for k in doc["detectors"]) + " |",
              "|---|---|---|---|" + "---|" * len(doc["detectors"])]  # fmt: skip
    groups: dict[tuple, dict[str, dict]] = {}
    for c in doc["cells"]:
        groups.setdefault((c["attack"], c["norm"], c["eps"], c["identities"]), {})[c["detector"]] = c
    for (attack, norm, eps, ids), row in groups.items():
        any_c = next(iter(row.values()))
        figs = [fig(row[k]) if k in row else "–" for k in doc["detectors"]]
        lines.append(f"| {attack} | {'L∞' if norm == 'linf' else 'L2'} {eps:g} | {ids} | "
                     f"{any_c['undefended_fooled']}/{any_c['n']} | " + " | ".join(figs) + " |")  # fmt: skip
    lines += ["", "Benign clients ever refused (the blackbox evaluation's benign stream):", "",
              "| clients (queries) | " + " | ".join(f"`{k}`" for k in doc["detectors"]) + " |",
              "|---|" + "---|" * len(doc["detectors"])]  # fmt: skip
    for c in ("200", "20"):
        b = {k: doc["benign"][k][c] for k in doc["detectors"]}
        q = next(iter(b.values()))["queries"]
        lines.append(
            f"| {c} ({q:,}) | "
            + " | ".join(f"{v['flagged']}/{v['clients']} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" for v in b.values())
            + " |"
        )
    return "\n".join(lines) + "\n"


def fig(c: dict) -> str:
    first = "–" if c["median_first_refusal"] is None else f"{c['median_first_refusal']:g}"
    return (
        f"{c['defended']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]; stopped {c['stopped']}, first refusal at "
        f"query {first}"
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=data.dataset_name, default="mnist", help="mnist, fmnist or a prepared data set")
    p.add_argument("--n", type=int, default=100, help="attacked images per threat")
    p.add_argument("--queries", type=int, default=1000, help="Square's queries per image")
    p.add_argument("--matches", type=int, nargs="*", default=[5, 3], help="Blacklight's K to compare with the shipped")
    p.add_argument("--no-chen", action="store_true", help="Blacklight only (a confirmation run on other images)")
    p.add_argument("--seed", type=int, default=0, help="the image pool's permutation (the blackbox evaluation's: 0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models-dir", type=type(MODELS_DIR), default=MODELS_DIR)
    p.add_argument("--out", type=type(ROOT), default=ROOT / "docs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    doc = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.seed == 0 else f"-seed{args.seed}"
    (args.out / f"detectors-{args.dataset}{suffix}.json").write_text(json.dumps(doc, indent=1) + "\n")
    page = "detectors" if args.dataset == "mnist" else f"detectors-{args.dataset}"  # MNIST's page came first
    (args.out / f"{page}{suffix}.md").write_text(render(doc))
    print(render(doc), flush=True)


if __name__ == "__main__":
    main()
