"""The honest evaluation of the API attacker: black-box attacks sent over HTTP to a real `python -m service` under the
public profile, on loopback, one server per pipeline configuration.

    python -m training.blackbox --dataset mnist                 # the recorded run (--n 100, --queries 10000)
    python -m training.blackbox --dataset mnist --quick         # everything at tiny n and queries (a few minutes)
    python -m training.blackbox --dataset mnist --only s a      # these pipelines again; the others stay on the page
    python -m training.blackbox --dataset shapes                # any dataset that ships classifier A

The threat: a client that only sends HTTP requests and reads answers. The job starts the upstream (KServe's
ModelServer with the dataset's classifier A, `tests/upstreams.py`: a user's non-robust model, FP32 N×C×H×W) and,
per pipeline, `python -m service` with MG_PUBLIC=true and that pipeline fixed in MG_PROFILE__PIPELINES, the clients'
rate and budget limits out of reach (they are not what is measured) and the stateful detector off or on
(MG_CLIENTS__DETECTOR). With the detector on, each attack run (and the benign stream) gets a fresh server, so no run
inherits another's history. Pipelines (`pipelines_for`): A bare (scores; and label-only); where the dataset ships
the models they need (`service.engine.offered_defenses`), A behind Defense-GAN at two costs and behind
invert-and-classify; and the dataset's default pipeline ("s": the registry's `defaults`, the service's own model
answering a caller who names none; for MNIST the robust model S).

Images and threats follow the dataset: its spec (`service.datasets.DatasetSpec`: C×H×W, classes) and its threats
(`training.robustness_protocol.THREATS`, e.g. MNIST's L∞ 0.3 and L2 2.0, shapes' L∞ 8/255 and L2 0.5). Attacks
(`attacks_for`), independent reference implementations driven through `service.attacks.query`:
- Square (torchattacks 3.5.1; every threat) on the log-scores the output policy gives (`top1`: p on the label and
  (1 − p)/(K − 1) elsewhere);
- HopSkipJump (ART; decision-based, on the labels alone; every threat), the attack of the label-only pipeline;
- transfer: a Papernot substitute trained on the API's labels (held-out seed images, Jacobian augmentation), FGSM
  and PGD-40 on it at each L∞ threat;
- adaptive versions: EOT against the random restarts (k copies of each query in one request, which get independent
  random starts, averaged; k× the queries); against the detector, 100 client identities (X-Forwarded-For from a
  trusted proxy) rotated at each 429, the attack ending when all are refused, with and without OARS-style random
  transforms of every query (Feng et al. 2023: shift ≤ 1 px, brightness ± 10%, noise σ 0.03, back into the ball).
Judging: an image's candidates (its first successful row, the attack's output where inside the ball, the last row
sent when the attack was cut short) are resubmitted to the same pipeline with the detector off, 10 times for a
randomized pipeline (worst of 10: correct only if every answer is) and once for a deterministic one. An image is
defended when every answer to them is its label, or when the attacker (all its identities) was stopped before its
first success. A cell's figure is the per-image worst case over its attacks, with a Wilson 95% interval.

Benign cost per pipeline (detector on, as deployed): held-out test images from 200 clients, each re-sending about 30%
of its images (the same again, JPEG quality 75, cropped 1–2 px and resized back, brightened 10%): the fraction of
clients ever refused, accuracy (a refused image counts as an error), images per second.

Images: test images outside the committed slice (test[:1000]) and the last 500 (training monitors them): a seeded
permutation of test[1000:N − 500] (MNIST's: test[1000:9500]); its first 2,000 are the benign stream, the next 150
the substitute's seeds, the rest the attacked images (the first n of them in every cell). Budgets per pipeline cost
and detector (`BUDGETS`), the same for every dataset: the classifiers served bare get the issue's 10,000 queries per
image and n = 100 (HopSkipJump: 100 images behind the detector, which stops it early, 10 without); the projection
pipelines get fewer images and queries, sized to about 40 min of one CPU core (on MNIST); every cell's budget is
shown on the page.
Writes docs/blackbox-<dataset>.json (per-image results) and its page (`page_path`: docs/blackbox.md for MNIST,
docs/blackbox-<dataset>.md for any other); --quick writes under runs/blackbox/ and shares one detector server per
cell (later runs there inherit earlier ones' history: a smoke run, no figures).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from service.attacks.query import (
    AddressBook,
    Client,
    Identities,
    Ledger,
    Oracle,
    OutOfTime,
    Stopped,
    benign_stream,
    candidates,
    hop_skip_jump,
    judge,
    oars,
    square,
    transfer,
)
from service.config import Settings
from service.datasets import MNIST, DatasetSpec
from service.engine import default_classifier, default_defense, offered_defenses
from service.registry import Registry
from service.request import image_cap
from service.stats import wilson
from training import data
from training.common import MODELS_DIR, ROOT, command_line, git_commit
from training.processes import Server, free_port
from training.robustness_protocol import THREATS, threat_key
from training.train_robust import MONITOR

DOCS = ROOT / "docs"
LOGS = ROOT / "runs" / "blackbox"
INSPECT_KEY = "blackbox-inspect"  # the inspect scope's key on these loopback servers (tests: a fixed seed)
BENIGN, SEEDS = 2000, 150
FIRST_PAGE = MNIST.name  # its page is docs/blackbox.md, titled without its name (other files link to it)
UPSTREAM_MODEL = "{}-nchw"  # tests/upstreams.py's name for a dataset's classifier A: FP32 N×C×H×W in [0, 1]
Threats = tuple[tuple[str, float], ...]  # (norm, ε) pairs


def pool_of(test_size: int) -> tuple[int, int]:
    """The test indices the job draws from: after the committed slice (test[:SLICE_SIZE]) and before the last
    MONITOR (training monitors them)."""
    return data.SLICE_SIZE, test_size - MONITOR


POOL = pool_of(10_000)  # a 10,000-image test split's, MNIST's: test[1000:9500] (training.detectors draws from it)


@dataclass(frozen=True)
class Pipeline:
    """One served configuration: its /v2 name, the operator's profile entry, what it costs per image."""

    id: str  # for --only
    key: str  # the page's name
    served: str  # the /v2 model name
    profile: dict  # MG_PROFILE__PIPELINES[served]
    proxied: bool  # forwarded to the upstream (classifier A)
    randomized: bool  # random restarts: EOT and worst-of-10 resubmission apply
    cost: str  # picks the budgets: fast | medium | slow | slower
    detector: tuple[bool, ...] = (False, True)


A_PIPELINES = (  # classifier A behind the proxy: bare, and behind the projections (where the dataset ships them)
    Pipeline("a", "A", "user-model", {"defense": "none", "output": "probabilities"}, True, False, "fast"),
    Pipeline("a-label", "A, label only", "user-model", {"defense": "none", "output": "label"}, True, False, "fast",
             (False,)),
    Pipeline("a-dgan50", "A + Defense-GAN L=50 R=2", "user-model",
             {"defense": "defense-gan", "steps": 50, "restarts": 2, "output": "probabilities"}, True, True, "slow"),
    Pipeline("a-dgan100", "A + Defense-GAN L=100 R=4", "user-model",
             {"defense": "defense-gan", "steps": 100, "restarts": 4, "output": "probabilities"}, True, True, "slower"),
    Pipeline("a-invert", "A + invert-classify", "user-model",
             {"defense": "invert-classify", "output": "probabilities"}, True, False, "medium"),
)  # fmt: skip
PIPELINE_IDS = (*(p.id for p in A_PIPELINES), "s")
# the default pipeline's cost by its defense: as the A pipeline of that defense (Defense-GAN: the server's L=200 R=10)
DEFAULT_COST = {"none": "fast", "magnet": "fast", "invert-classify": "medium", "enhanced-invert-classify": "medium",
                "defense-gan": "slower"}  # fmt: skip


def pipelines_for(reg: Registry, dataset: str) -> list[Pipeline]:
    """The dataset's pipelines: the A pipelines whose defense its shipped models offer, then its default ("s")."""
    offered = offered_defenses(reg, dataset)
    return [p for p in A_PIPELINES if p.profile["defense"] in offered] + [default_pipeline(reg, dataset)]


def default_pipeline(reg: Registry, dataset: str) -> Pipeline:
    """Pipeline "s": what the service answers a caller who names no pipeline (`service.engine`'s default classifier
    and defense for the dataset), with top-1 answers. It is the service's own model, not the proxy, also where the
    default is classifier A; the page names it by architecture and classifier, e.g. "S (classifier_S_…, the default)".
    """
    clf = default_classifier(reg, dataset)
    defense = default_defense(reg, dataset, clf)
    name = clf if defense == "none" else f"{clf} + {defense}"
    return Pipeline("s", f"{reg.get(f'{dataset}/{clf}').arch} ({name}, the default)", f"{dataset}-{clf}",
                    {"output": "top1"}, False, defense == "defense-gan", DEFAULT_COST[defense])  # fmt: skip


@dataclass(frozen=True)
class Budget:
    """How hard one cell's attacks try, and on how many images (the first of the attacked set)."""

    n: int = 100  # images of the runs the detector stops early (detector on, no OARS): the headline
    full_n: int = 100  # images of the runs that go the distance (detector off, or evading it with OARS)
    square: int = 10_000  # Square's queries per image
    hsj_n: int = 100  # images HopSkipJump attacks
    hsj: int = 10_000  # HopSkipJump's queries per image
    eot: int = 4  # EOT copies per query (randomized pipelines)
    seeds: int = SEEDS  # the substitute's seed images
    rounds: int = 6  # substitute training rounds (seeds·2^(rounds−1) labels)
    benign: int = BENIGN  # benign stream images (detector on)


# (cost, detector) → budget; the projection pipelines' sized to about 40 min of one CPU core (per-image cost of a query:
# fast ≈ 0.5 ms in batches, invert-classify ≈ 30 ms, Defense-GAN L=50 R=2 ≈ 100 ms, L=100 R=4 ≈ 400 ms)
BUDGETS = {
    ("fast", False): Budget(n=100, full_n=100, square=10_000, hsj_n=10, hsj=10_000),
    ("fast", True): Budget(n=100, full_n=100, square=10_000, hsj_n=100, hsj=10_000),
    ("medium", False): Budget(n=20, full_n=20, square=100, hsj_n=2, hsj=200, rounds=3),
    ("medium", True): Budget(n=50, full_n=20, square=100, hsj_n=2, hsj=200, rounds=3, benign=1000),
    ("slow", False): Budget(n=6, full_n=6, square=40, hsj_n=1, hsj=100, eot=2, seeds=50, rounds=2),
    ("slow", True): Budget(n=30, full_n=6, square=40, hsj_n=1, hsj=100, eot=2, seeds=50, rounds=2, benign=100),
    ("slower", False): Budget(n=3, full_n=3, square=20, hsj_n=1, hsj=40, eot=2, seeds=20, rounds=1),
    ("slower", True): Budget(n=10, full_n=3, square=20, hsj_n=1, hsj=40, eot=2, seeds=20, rounds=1, benign=50),
}
QUICK = {
    "fast": Budget(n=8, full_n=8, square=60, hsj_n=2, hsj=100, eot=2, seeds=30, rounds=2, benign=100),
    "medium": Budget(n=4, full_n=4, square=20, hsj_n=1, hsj=30, eot=2, seeds=20, rounds=1, benign=20),
    "slow": Budget(n=4, full_n=2, square=8, hsj_n=1, hsj=12, eot=2, seeds=10, rounds=1, benign=10),
    "slower": Budget(n=2, full_n=1, square=4, hsj_n=1, hsj=8, eot=2, seeds=6, rounds=1, benign=6),
}
RUN_LIMIT_S = 1800.0  # a run still going after this stops (recorded as out of time): a safety net, not a budget


@dataclass(frozen=True)
class Attack:
    """One attack run: which attack, at which threat, over how many identities, with OARS transforms or not."""

    name: str  # square | square-eot | hsj | transfer
    norm: str
    eps: float
    identities: int = 1
    oars: bool = False

    @property
    def label(self) -> str:
        extra = " + OARS" if self.oars else ""
        return {"square": "Square", "square-eot": "Square + EOT", "hsj": "HopSkipJump",
                "transfer": "transfer (FGSM, PGD-40)"}[self.name] + extra  # fmt: skip


def attacks_for(p: Pipeline, detector: bool, threats: Threats) -> list[Attack]:
    """The runs of one cell at the dataset's `threats`: every attack once (transfer at each L∞ threat); behind the
    detector also over 100 identities, and Square (and its EOT version) over 100 identities with OARS transforms,
    the strongest evasion here."""
    out: list[Attack] = []
    for norm, eps in threats:
        if p.profile.get("output") == "label":  # labels only: the decision-based attack's cell (Square: one-hot)
            out.append(Attack("hsj", norm, eps))
            continue
        if not detector:
            out += [Attack("square", norm, eps)] + ([Attack("square-eot", norm, eps)] if p.randomized else [])
            out.append(Attack("hsj", norm, eps))
            continue
        out += [Attack("square", norm, eps), Attack("square", norm, eps, 100),
                Attack("square", norm, eps, 100, oars=True)]  # fmt: skip
        out += [Attack("square-eot", norm, eps, 100, oars=True)] if p.randomized else []
        out += [Attack("hsj", norm, eps), Attack("hsj", norm, eps, 100)]
    for eps in [e for norm, e in threats if norm == "linf"]:
        out.append(Attack("transfer", "linf", eps))
        if detector:
            out.append(Attack("transfer", "linf", eps, identities=100))
    return out


def budget_for(p: Pipeline, detector: bool, args: argparse.Namespace) -> Budget:
    b = QUICK[p.cost] if args.quick else BUDGETS[(p.cost, detector)]
    return replace(b, n=min(b.n, args.n), full_n=min(b.full_n, args.n), hsj_n=min(b.hsj_n, args.n),
                   square=min(b.square, args.queries), hsj=min(b.hsj, args.queries),
                   benign=min(b.benign, args.benign))  # fmt: skip


def images_for(a: Attack, b: Budget, detector: bool) -> int:
    """A run's images: HopSkipJump's own number; the headline n where the detector stops the run early; else the
    number the full-length runs can afford."""
    if a.name == "hsj":
        return b.hsj_n
    return b.n if detector and not a.oars and a.name != "transfer" else b.full_n


# -- servers on loopback -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Deployment:
    """What the job's services serve: a dataset (its spec), its models, and the upstream serving its classifier A."""

    spec: DatasetSpec
    models_dir: Path
    upstream: str  # the upstream's base URL

    @property
    def dataset(self) -> str:
        return self.spec.name

    @property
    def rows(self) -> int:
        """Images per request its services take: their cap for the dataset (MG_MAX_BATCH_IMAGES gray 28×28 images'
        worth), the environment they inherit being this one's."""
        return image_cap(Settings(), self.spec)


def start_upstream(onnx: Path, log: Path, dataset: str = MNIST.name) -> Server:
    """tests/upstreams.py's KServe ModelServer serving `onnx`, `dataset`'s classifier A, as UPSTREAM_MODEL."""
    port = free_port()
    args = [sys.executable, "tests/upstreams.py", "kserve", "--port", str(port), "--onnx", str(onnx),
            "--dataset", dataset]  # fmt: skip
    return Server(args, log, {"OMP_NUM_THREADS": "1"}, "/v2/health/ready", port)


def service_env(pipelines: list[Pipeline], detector: bool, site: Deployment) -> dict[str, str]:
    """The environment of one `python -m service` under the public profile serving `pipelines` (each under its own
    name; the job serves one per process), the clients' limits out of reach; the proxied ones forward to the
    upstream's classifier A, purified with the dataset's models."""
    env = {
        "MG_MODELS_DIR": str(site.models_dir), "MG_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "MG_PUBLIC": "true",
        "MG_PROFILE__PIPELINES": json.dumps({p.served: p.profile for p in pipelines}),
        "MG_PROFILE__INSPECT_KEYS": json.dumps([INSPECT_KEY]),
        "MG_CLIENTS__TRUSTED_PROXIES": json.dumps(["127.0.0.1"]), "MG_CLIENTS__DETECTOR": str(detector).lower(),
        "MG_CLIENTS__RATE_PER_S": "1000000", "MG_CLIENTS__BURST": "1000000", "MG_CLIENTS__BUDGET": "1000000000",
        "MG_REQUEST_TIMEOUT_S": "900",
    }  # fmt: skip
    up = {"url": site.upstream, "model": UPSTREAM_MODEL.format(site.dataset), "dataset": site.dataset,
          "timeout_s": 60.0}  # fmt: skip
    proxied = {p.served: up for p in pipelines if p.proxied}
    if proxied:
        env["MG_PROXY__UPSTREAMS"] = json.dumps(proxied)
    return env


def start_service(pipelines: list[Pipeline], detector: bool, site: Deployment, log: Path,
                  warm_up: bool = True) -> Server:  # fmt: skip
    port = free_port()
    env = service_env(pipelines, detector, site) | {"MG_PORT": str(port), "MG_HOST": "127.0.0.1",
                                                    "MG_WARM_UP": str(warm_up).lower()}  # fmt: skip
    return Server([sys.executable, "-m", "service", "--log-level", "warning"], log, env, "/readyz", port)


# -- one attack run, judged ----------------------------------------------------------------------------------------
def run_attack(a: Attack, p: Pipeline, b: Budget, detector: bool, attacker: Client, referee: Client,
               sets: dict[str, np.ndarray], book: AddressBook, seed: int, quick: bool = False,
               classes: int = MNIST.num_classes) -> dict:  # fmt: skip
    """One attack run on the first n images (of any C×H×W; labels among `classes`, the dataset's); per image its
    queries, first success, refusals and verdict."""
    n = images_for(a, b, detector)
    x, y = sets["x"][:n], sets["y"][:n]
    ledger = Ledger(x, y, a.norm, a.eps)
    ids = Identities(book.take(a.identities))
    eot = b.eot if a.name == "square-eot" else 1
    transform = oars(a.norm, a.eps) if a.oars else None
    oracle = Oracle(attacker, ids, None if a.name == "transfer" else ledger, eot, transform, seed, classes,
                    attacker.max_rows)  # fmt: skip
    oracle.deadline = time.monotonic() + RUN_LIMIT_S
    cap = b.hsj if a.name == "hsj" else b.square
    t0, outputs, info, ended = time.time(), {}, {}, "finished"
    try:
        if a.name.startswith("square"):
            outputs["square"] = square(oracle, x, y, a.norm, a.eps, cap, seed)
        elif a.name == "hsj":
            outputs["hsj"] = hop_skip_jump(oracle, x, y, a.norm, a.eps, cap, seed)
        else:
            outputs, info = transfer(oracle, sets["seeds"][: b.seeds], x, y, a.eps, b.rounds, seed)
    except Stopped:
        ended = "stopped"
        if a.name == "transfer":  # stopped before the seeds were labelled: nothing to transfer
            ledger.stopped_at[:] = 0
        left = (ledger.stopped_at < 0) & (ledger.first_success < 0) & (ledger.queries < cap)
        ledger.stopped_at[left] = ledger.queries[left]  # images the stopped attacker never finished
    except OutOfTime:
        ended = "out of time"
    attack_s = time.time() - t0
    stopped = ledger.stopped_before_success()
    repeats = (3 if quick else 10) if p.randomized else 1
    pairs = [(i, r) for i, r in candidates(ledger, outputs, ended == "finished") if not stopped[i]]
    correct = judge(referee, pairs, y, repeats, "2001:db8:ffff::1", referee.max_rows)  # stopped: no verdict needed
    return {"attack": asdict(a), "label": a.label, "n": n, "queries_cap": cap, "eot": eot, "repeats": repeats,
            "ended": ended, "attack_s": round(attack_s, 1), "judge_s": round(time.time() - t0 - attack_s, 1),
            "identities_refused": len(ids.refusals), "refusal": ids.refusals[0] if ids.refusals else None,
            "substitute": info or None, "substitute_queries": oracle.unowned,
            "images": {"queries": ledger.queries.tolist(), "first_success": ledger.first_success.tolist(),
                       "first_refusal": ledger.first_refusal.tolist(), "stopped_at": ledger.stopped_at.tolist(),
                       "correct": correct.astype(int).tolist(), "stopped_before_success": stopped.astype(int).tolist(),
                       "defended": (correct | stopped).astype(int).tolist()}}  # fmt: skip


# -- one pipeline: its servers, its cells --------------------------------------------------------------------------
def evaluate_pipeline(p: Pipeline, args: argparse.Namespace, site: Deployment,
                      sets: dict[str, np.ndarray]) -> list[dict]:  # fmt: skip
    """The pipeline's cells. Detector off: one server for every run, which is also the referee that judges the
    attackers' candidates. Detector on: a fresh server (fresh detector state) for the benign stream and for each
    attack run, so no run inherits another's history (--quick: one server for all)."""
    logs, threats = args.logs / p.id, THREATS[site.dataset]
    off = start_service([p], False, site, logs / "detector-off.log", warm_up=not args.quick)
    referee, cells = client_for(p, off.url, args, site.rows), []
    try:
        for detector in p.detector:
            b = budget_for(p, detector, args)
            print(f"== {p.key}, detector {'on' if detector else 'off'}: n={b.n} (full-length runs {b.full_n}), "
                  f"Square ≤{b.square}, HopSkipJump n={b.hsj_n} ≤{b.hsj}, EOT k={b.eot if p.randomized else '-'}, "
                  f"substitute {b.seeds} seeds × {b.rounds} rounds", flush=True)  # fmt: skip
            cell = {"pipeline": p.key, "served": p.served, "profile": p.profile, "detector": detector,
                    "budget": asdict(b), "runs": [], "benign": None}  # fmt: skip
            with Servers(p, detector, off, site, args, logs) as servers:
                if detector:
                    with servers.fresh() as server:
                        xb, yb = sets["benign_x"][: b.benign], sets["benign_y"][: b.benign]
                        cell["benign"] = benign_stream(server.url, p.served, xb, yb, AddressBook(), args.seed)
                    print(f"   benign: {benign_text(cell['benign'])}", flush=True)
                for a in attacks_for(p, detector, threats):
                    with servers.fresh() as server:
                        attacker = client_for(p, server.url, args, site.rows)
                        r = run_attack(a, p, b, detector, attacker, referee, sets, AddressBook(), args.seed,
                                       args.quick, site.spec.num_classes)  # fmt: skip
                    r["summary"] = summarize(r)
                    cell["runs"].append(r)
                    print_run(r)
            for norm, eps in threats:
                w = worst_case(cell["runs"], norm, eps)
                print(f"   worst case {threat_key(norm, eps)}: every attack {cell_text(w['all'])}; every attack but "
                      f"HopSkipJump {cell_text(w['broad'])}", flush=True)  # fmt: skip
            cells.append(cell)
    finally:
        off.stop()
    return cells


class Servers:
    """The servers of one cell: the detector-off server itself, or detector-on servers started per unit of work
    (one shared by all under --quick)."""

    def __init__(self, p: Pipeline, detector: bool, off: Server, site: Deployment, args: argparse.Namespace,
                 logs: Path) -> None:  # fmt: skip
        self.p, self.detector, self.off, self.site, self.args, self.logs = p, detector, off, site, args, logs
        self.shared: Server | None = None
        self.count = 0

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.shared is not None:
            self.shared.stop()

    @contextlib.contextmanager
    def fresh(self) -> Iterator[Server]:
        if not self.detector:
            yield self.off
            return
        if self.args.quick:
            self.shared = self.shared or self._start()
            yield self.shared
            return
        server = self._start()
        try:
            yield server
        finally:
            server.stop()

    def _start(self) -> Server:
        self.count += 1
        log = self.logs / f"detector-on-{self.count}.log"
        return start_service([self.p], True, self.site, log, warm_up=False)


def benign_text(b: dict) -> str:
    stopped = f"{b['clients_stopped']}/{b['clients']}"
    return (f"{b['images']} images from {b['clients']} clients ({b['resent']} re-sent): clients refused {stopped}, "
            f"accuracy {b['accuracy']:.3f}, {b['images_per_s']:.1f} images/s")  # fmt: skip


def client_for(p: Pipeline, url: str, args: argparse.Namespace, rows: int) -> Client:
    """A public caller sending ≤ `rows` images per request; with --inspect-seed a caller of the inspect scope that
    fixes the pipeline and the seed."""
    if args.inspect_seed is None:
        return Client(url, p.served, max_rows=rows)
    params = {k: v for k, v in p.profile.items() if k in ("defense", "steps", "restarts")}
    return Client(url, p.served, api_key=INSPECT_KEY, params=params | {"seed": args.inspect_seed}, max_rows=rows)


def summarize(r: dict) -> dict:
    """A run's figures: defended images with a Wilson interval, the median query of the first success among the
    images broken, how many were stopped before a success and the median query at which."""
    im, n = r["images"], r["n"]
    k = sum(im["defended"])
    broken = [q for q, s, d in zip(im["first_success"], im["stopped_before_success"], im["defended"], strict=True)
              if q >= 0 and not s and not d]  # fmt: skip
    stops = [q for q, s in zip(im["stopped_at"], im["stopped_before_success"], strict=True) if s]
    return {"n": n, "defended": k, "accuracy": round(k / n, 4), "ci": [round(v, 4) for v in wilson(k, n)],
            "broken_with_success_query": len(broken), "median_first_success": median(broken),
            "stopped": len(stops), "median_stop": median(stops)}  # fmt: skip


def median(values: list[int]) -> float | None:
    return float(np.median(values)) if values else None


def worst_case(runs: list[dict], norm: str, eps: float) -> dict:
    """Per image, defended against every run at this threat (transfer belongs to its L∞ one) on the images all of
    them attacked: `all` over every run (HopSkipJump's few images), `broad` over every run but HopSkipJump."""
    mine = [r for r in runs if (r["attack"]["norm"], r["attack"]["eps"]) == (norm, eps)]
    out = {}
    for key, chosen in (("all", mine), ("broad", [r for r in mine if r["attack"]["name"] != "hsj"] or mine)):
        n = min(r["n"] for r in chosen)
        ok = np.ones(n, bool)
        for r in chosen:
            ok &= np.array(r["images"]["defended"][:n], bool)
        k = int(ok.sum())
        out[key] = {"n": n, "defended": k, "accuracy": round(k / n, 4), "ci": [round(v, 4) for v in wilson(k, n)],
                    "attacks": sorted({r["label"] for r in chosen}),
                    "defended_bits": "".join("1" if v else "0" for v in ok)}  # fmt: skip
    return out


def cell_text(s: dict) -> str:
    return f"{s['accuracy']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] (n={s['n']})"


def print_run(r: dict) -> None:
    s, a = r["summary"], r["attack"]
    q = np.array(r["images"]["queries"])
    print(f"   {r['label']:<28} {threat_key(a['norm'], a['eps']):<9} ids={a['identities']:<3} "
          f"defended {cell_text(s)}  queries/img median {np.median(q):.0f}  1st success median "
          f"{s['median_first_success']}  stopped {s['stopped']}/{s['n']} (median at {s['median_stop']})  "
          f"refused ids {r['identities_refused']}  {r['attack_s']:.0f}+{r['judge_s']:.0f} s", flush=True)  # fmt: skip


# -- images --------------------------------------------------------------------------------------------------------
def image_sets(spec: DatasetSpec, seed: int, n: int) -> dict[str, np.ndarray]:
    """A seeded permutation of the dataset's pool (`pool_of`: outside the committed slice and the last 500 test
    images): the benign stream, the substitute's seeds, then the attacked images, float32 N×C×H×W of `spec`."""
    arr = data.load(spec.name)
    xt, yt = arr["x_test"], arr["y_test"].astype(np.int64)
    lo, hi = pool_of(len(xt))
    if hi - lo < BENIGN + SEEDS + n:
        raise SystemExit(f"{spec.name}: its pool test[{lo}:{hi}] holds {max(hi - lo, 0)} images; the job needs "
                         f"{BENIGN + SEEDS + n} ({BENIGN} benign, {SEEDS} seeds, --n {n} attacked)")  # fmt: skip
    if (shape := data.to_float(xt[:1]).shape[1:]) != spec.shape:
        raise SystemExit(f"{spec.name}: its test images are {list(shape)}, its spec says {list(spec.shape)}")
    order = np.random.default_rng(seed).permutation(np.arange(lo, hi))
    ben, sub, att = order[:BENIGN], order[BENIGN : BENIGN + SEEDS], order[BENIGN + SEEDS : BENIGN + SEEDS + n]
    return {"x": data.to_float(xt[att]), "y": yt[att], "seeds": data.to_float(xt[sub]),
            "benign_x": data.to_float(xt[ben]), "benign_y": yt[ben], "attack_idx": att, "seed_idx": sub,
            "benign_idx": ben, "pool": np.array([lo, hi])}  # fmt: skip


# -- the job -------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.time()
    reg = Registry(args.models_dir, verify=False)  # each service verifies the files it serves
    spec, pipelines = reg.spec(args.dataset), pipelines_for(reg, args.dataset)
    sets = image_sets(spec, args.seed, args.n)
    chosen = [p for p in pipelines if not args.only or p.id in args.only]
    lo, hi = sets["pool"]
    info = {"command": command_line(), "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
            "dataset": args.dataset, "seed": args.seed, "quick": args.quick,
            "images": {"pool": f"test[{lo}:{hi}], permuted with seed {args.seed}",
                       "attacked": sets["attack_idx"].tolist(), "substitute_seeds": sets["seed_idx"].tolist(),
                       "benign": f"the first {args.benign} of the permutation (indices in 'benign_indices')"},
            "benign_indices": sets["benign_idx"][: args.benign].tolist()}  # fmt: skip
    print(f"blackbox: {len(chosen)} pipelines, attacked images test{sets['attack_idx'][:5].tolist()}…, "
          f"logs in {args.logs}", flush=True)  # fmt: skip
    onnx = reg.get(f"{args.dataset}/classifier_A").path(args.models_dir, "onnx")
    upstream = start_upstream(onnx, args.logs / "upstream.log", args.dataset)
    site, cells = Deployment(spec, args.models_dir, upstream.url), []
    try:
        for p in chosen:
            cells += evaluate_pipeline(p, args, site, sets)
            info["minutes"] = round((time.time() - t0) / 60, 1)
            publish(args, info, cells, [p.key for p in chosen], [p.key for p in pipelines])
    finally:
        upstream.stop()
    print(f"blackbox: done in {(time.time() - t0) / 60:.1f} min; wrote {args.out}", flush=True)
    return {"info": info, "cells": cells}


def publish(args: argparse.Namespace, info: dict, cells: list[dict], keys: list[str], order: list[str]) -> None:
    """docs/blackbox-<dataset>.json and its page; with --only the other pipelines' cells (and the runs that measured
    them) stay. `order`: every pipeline's page name, in the page's order."""
    path = args.out / f"blackbox-{args.dataset}.json"
    old = json.loads(path.read_text()) if path.exists() and args.only else None
    doc = merge(old, {"info": info, "cells": cells}, keys, order)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    page_path(args.out, args.dataset).write_text(render(doc))


def page_path(out: Path, dataset: str) -> Path:
    """A dataset's page: blackbox.md for the first (MNIST's), blackbox-<dataset>.md for any other."""
    return out / ("blackbox.md" if dataset == FIRST_PAGE else f"blackbox-{dataset}.md")


def merge(old: dict | None, new: dict, keys: list[str], order: list[str]) -> dict:
    """`new`'s cells in place of `old`'s for the pipelines `keys`, sorted by `order`; `runs` lists each run that
    measured a cell kept (its command, date, commit and minutes). An old cell of a pipeline not in `order` (a former
    default) is dropped."""
    info = new["info"]
    for c in new["cells"]:
        c.setdefault("run", info["command"])
    kept = [c for c in (old or {}).get("cells", []) if c["pipeline"] not in keys and c["pipeline"] in order]
    cells = sorted(kept + new["cells"], key=lambda c: (order.index(c["pipeline"]) if c["pipeline"] in order else 99,
                                                       c["detector"]))  # fmt: skip
    brief = ("command", "date", "commit", "minutes")
    runs = (old or {}).get("runs") or ([{k: old["info"].get(k) for k in brief}] if old else [])
    runs = [r for r in runs if r["command"] != info["command"]] + [{k: info.get(k) for k in brief}]
    used = {c["run"] for c in cells}
    return {"info": info, "runs": [r for r in runs if r["command"] in used], "cells": cells}


# -- the page ------------------------------------------------------------------------------------------------------
NAMES = {"linf": "L∞", "l2": "L2"}


def render(doc: dict) -> str:
    """The page from the JSON: the worst case per pipeline, a table per threat (the threats its runs attacked), the
    benign stream."""
    info, cells = doc["info"], doc["cells"]
    threats = threats_of(cells)
    lines = [
        "# Black-box evaluation through the API" + ("" if info["dataset"] == FIRST_PAGE else f" ({info['dataset']})"),
        "",
        "Generated by `python -m training.blackbox` (module docstring: pipelines, attacks, judging, budgets). The",
        "attacker only sends HTTP requests to a real `python -m service` under the public profile (MG_PUBLIC=true)",
        "on loopback and reads its answers; classifier A sits behind it in a KServe ModelServer. An image is",
        "defended when every candidate the attacker ended with was answered with its true label (worst of 10",
        "resubmissions for a randomized pipeline, one for a deterministic one), or when the attacker and all its",
        "identities were refused (429) before its first success. Figures: defended fraction, Wilson 95% interval,",
        "n images. Queries are counted per image (rows sent, EOT copies included).",
        "",
        "Recorded by:",
        "",
        *runs_lines(doc),
        "",
        f"Images: {info['images']['pool']}; attacked: its images after the first {BENIGN + SEEDS} (the first n "
        f"in every cell; indices in the JSON); substitute seeds: the {SEEDS} before them; benign stream: "
        f"{info['images']['benign']}.",
        "",
        "## Worst case per pipeline",
        "",
        "Per image over the runs of a threat, on the images all of them attacked: *every attack* (HopSkipJump",
        "attacks the fewest) and *every attack but HopSkipJump* (its own rows below give the rest).",
        "",
        "| pipeline | profile | detector | " + " | ".join(f"{threat_text(*t)}: every attack | {threat_text(*t)}: all "
                                                        "but HopSkipJump" for t in threats) + " | budget |",
        "|---|---|---|" + "---|---|" * len(threats) + "---|",
    ]  # fmt: skip
    for c in cells:
        worst = [worst_case(c["runs"], *t) for t in threats]
        lines.append(f"| {c['pipeline']} | {profile_text(c['profile'])} | {'on' if c['detector'] else 'off'} | "
                     + " | ".join(f"{cell_text(w['all'])} | {cell_text(w['broad'])}" for w in worst)
                     + f" | {budget_text(c)} |")  # fmt: skip
    for norm, eps in threats:
        lines += ["", f"## {NAMES[norm]} ε = {eps_text(eps)}", "",
                  "| pipeline | detector | attack | identities | defended | queries per image (cap) | median query "
                  "of the first success (images broken) | stopped before a success (median query) | identities "
                  "refused |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in cells:
            for r in c["runs"]:
                if (r["attack"]["norm"], r["attack"]["eps"]) == (norm, eps):
                    lines.append(run_row(c, r))
    lines += benign_table(cells) + comparison(cells, threats) + notes(cells)
    return "\n".join(lines) + "\n"


def threats_of(cells: list[dict]) -> Threats:
    """The threats the cells' runs attacked, in the order they were first run."""
    return tuple(dict.fromkeys((r["attack"]["norm"], r["attack"]["eps"]) for c in cells for r in c["runs"]))


def eps_text(eps: float) -> str:
    """ε as the page writes it: 0.3, 2; a multiple of 1/255 without a short decimal as such (8/255)."""
    short, k = f"{eps:g}", eps * 255
    return f"{round(k)}/255" if len(short) > 5 and abs(k - round(k)) < 1e-6 else short


def threat_text(norm: str, eps: float) -> str:
    return f"{NAMES[norm]} {eps_text(eps)}"


def runs_lines(doc: dict) -> list[str]:
    """One line per run: its command, date, commit, minutes and the pipelines whose cells it measured."""
    out = []
    for r in doc.get("runs") or [doc["info"]]:
        names = [c["pipeline"] for c in doc["cells"] if c.get("run", doc["info"]["command"]) == r["command"]]
        minutes = f", {r['minutes']} min" if r.get("minutes") is not None else ""
        out.append(f"- `{r['command']}` on {r['date']} at commit {r['commit']}{minutes}: "
                   f"{', '.join(dict.fromkeys(names))}")  # fmt: skip
    return out


def budget_text(c: dict) -> str:
    b = c["budget"]
    n = f"n {b['n']} (runs the detector stops), {b['full_n']} (the others)" if c["detector"] else f"n {b['full_n']}"
    eot = f"; EOT k={b['eot']}" if any(r["eot"] > 1 for r in c["runs"]) else ""
    return (f"{n}; Square ≤ {b['square']:,} queries; HopSkipJump n {b['hsj_n']}, ≤ {b['hsj']:,}{eot}; "
            f"substitute {b['seeds']} seeds × {b['rounds']} rounds")  # fmt: skip


def profile_text(profile: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in profile.items())


def run_row(c: dict, r: dict) -> str:
    s, a, q = r["summary"], r["attack"], np.array(r["images"]["queries"])
    first = "–" if s["median_first_success"] is None else f"{s['median_first_success']:.0f}"
    stop = f"{s['stopped']}/{s['n']}" + ("" if s["median_stop"] is None else f" ({s['median_stop']:.0f})")
    queries = (f"substitute: {r['substitute_queries']:,} labels" if a["name"] == "transfer"
               else f"median {np.median(q):.0f} ({r['queries_cap']:,})")  # fmt: skip
    label = r["label"] + (f", k={r['eot']}" if r["eot"] > 1 else "")
    return (f"| {c['pipeline']} | {'on' if c['detector'] else 'off'} | {label} | {a['identities']} | "
            f"{cell_text(s)} | {queries} | {first} ({s['broken_with_success_query']}) | {stop} | "
            f"{r['identities_refused']} |")  # fmt: skip


def benign_table(cells: list[dict]) -> list[str]:
    rows = [c for c in cells if c.get("benign")]
    if not rows:
        return []
    out = ["", "## Benign stream (detector on, as deployed)", "",
           "Each client sends its images one per request and re-sends about 30% of them (the same again, JPEG 75, "
           "cropped 1–2 px and resized back, or 10% brighter); 8 clients at a time. A refused image counts as an "
           "error.", "",
           "| pipeline | images | clients | requests (re-sent) | clients ever refused | accuracy | images/s |",
           "|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in rows:
        b = c["benign"]
        out.append(f"| {c['pipeline']} | {b['images']} | {b['clients']} | {b['requests']} ({b['resent']}) | "
                   f"{b['stopped_fraction']:.3f} [{b['stopped_ci'][0]:.3f}, {b['stopped_ci'][1]:.3f}] "
                   f"({b['clients_stopped']}/{b['clients']}) | {b['accuracy']:.3f} [{b['accuracy_ci'][0]:.3f}, "
                   f"{b['accuracy_ci'][1]:.3f}] | {b['images_per_s']:.1f} |")  # fmt: skip
    return out


def comparison(cells: list[dict], threats: Threats) -> list[str]:
    """Label-only answers against HopSkipJump beside scores against Square (the same model, detector off)."""
    label = next((c for c in cells if c["pipeline"] == "A, label only" and not c["detector"]), None)
    scores = next((c for c in cells if c["pipeline"] == "A" and not c["detector"]), None)
    if label is None or scores is None:
        return []
    out = ["", "## Label-only answers against scores (classifier A bare, detector off)", ""]
    for norm, eps in threats:
        hsj = next(r["summary"] for r in label["runs"] if r["attack"] == asdict(Attack("hsj", norm, eps)))
        sq = next(r["summary"] for r in scores["runs"] if r["attack"] == asdict(Attack("square", norm, eps)))
        caps = (label["budget"]["hsj"], scores["budget"]["square"])
        out.append(f"- {threat_text(norm, eps)}: label-only under HopSkipJump (≤ {caps[0]:,} queries) "
                   f"{cell_text(hsj)}; scores under Square (≤ {caps[1]:,}) {cell_text(sq)}: "
                   f"{label_verdict(hsj, sq)}")  # fmt: skip
    return out


def label_verdict(label: dict, scores: dict) -> str:
    """Does hiding the scores look like a defense beyond sampling error (the label-only interval above the
    scores' interval)?"""
    if label["ci"][1] < scores["ci"][0]:
        return ("no better than sampling explains: label-only does worse (the decision-based attack breaks more "
                "images than Square does with the rounded scores).")  # fmt: skip
    if label["ci"][0] <= scores["ci"][1]:
        return "no better than sampling explains."
    return ("label-only looks more robust by more than sampling explains: the decision-based attack needs far more "
            "queries per step (it estimates a gradient from labels at the boundary) and had a smaller budget; this "
            "is the attack's weakness at this budget, not evidence that hiding scores defends.")  # fmt: skip


def notes(cells: list[dict]) -> list[str]:
    return ["", "## Reading the tables", "",
            "- *queries per image*: rows the attacker sent that map to the image (each Square row lies within ε of "
            "exactly one original; HopSkipJump attacks one image at a time); EOT sends k copies of each query in "
            "one request. Transfer sends no per-image queries: its cost is the substitute's labels.",
            "- *first success*: the first query inside the threat ball answered with a wrong label; the median is "
            "over the images the run broke. *Stopped before a success*: the attacker (all its identities) was "
            "refused before that image's first success (or before it finished); the median query is that image's "
            "count at the stop.",
            "- HopSkipJump minimizes the distance without ε and stops at the first success inside the ball; it runs "
            "on the first images of the cell only (its budget column). With one identity it attacks image after "
            "image, so once stopped the images after it were never attacked (stopped at query 0).",
            "- Detector off, the slow Defense-GAN pipelines get fewer images and queries (their budget column): "
            "those figures are upper bounds of what a patient attacker keeps.",
            "- Detector on, a figure holds against the evasions tried here. Where the OARS runs show no identity "
            "refused, the detector did not see them: the gap to the detector-off figure is then what the transforms "
            "cost the attack, and the detector-off figure bounds what a gentler evasion could keep."]  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="a dataset that ships classifier_A (models/manifest.json)")
    p.add_argument("--n", type=int, default=100, help="attacked images per cell (a cell's budget may use fewer)")
    p.add_argument("--queries", type=int, default=10_000, help="the most queries per image of any attack")
    p.add_argument("--benign", type=int, default=BENIGN, help="images of the benign stream (a cell may use fewer)")
    p.add_argument("--quick", action="store_true", help="everything at tiny n and queries; writes under runs/")
    p.add_argument("--only", nargs="*", choices=PIPELINE_IDS,
                   help="these pipelines only (their cells replace theirs on the page, the others stay)")  # fmt: skip
    p.add_argument("--inspect-seed", type=int, help="attack as the inspect scope with this fixed seed (tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    p.add_argument("--out", type=Path, help="where the JSON and the page go (default docs/; --quick: runs/blackbox)")
    p.add_argument("--logs", type=Path, default=LOGS / "logs", help="the servers' logs")
    p.add_argument("--rerender", action="store_true", help="only redraw the page from the JSON")
    a = p.parse_args(argv)
    a.out = a.out or (LOGS / "quick" if a.quick else DOCS)
    check_choices(p, a)
    return a


def check_choices(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """--dataset must ship classifier A (the upstream's ONNX model) and --only name pipelines its models offer."""
    reg = Registry(a.models_dir, verify=False)
    shipped = sorted(art.dataset for art in reg.artifacts.values()
                     if art.key == f"{art.dataset}/classifier_A" and "onnx" in art.files)  # fmt: skip
    if a.dataset not in shipped:
        p.error(f"--dataset {a.dataset}: {a.models_dir / 'manifest.json'} ships no {a.dataset}/classifier_A with its "
                f"ONNX model; datasets that do: {', '.join(shipped)}")  # fmt: skip
    offered = [q.id for q in pipelines_for(reg, a.dataset)]
    if missing := sorted(set(a.only or ()) - set(offered)):
        p.error(f"--only {' '.join(missing)}: not offered for {a.dataset}; its models make {', '.join(offered)}")


def rerender(args: argparse.Namespace) -> None:
    doc = json.loads((args.out / f"blackbox-{args.dataset}.json").read_text())
    page_path(args.out, args.dataset).write_text(render(doc))


if __name__ == "__main__":
    a = parse()
    if a.rerender:
        rerender(a)
    else:
        run(a)
