"""One audit, start to end: clean accuracy, the attacks per threat and ε, judged, for the target bare and behind
each guarded pipeline; the guard's gain and its cost in latency and throughput; what was not run and why.

    doc = run_audit(spec, sample, host, meter, progress)    # the report's JSON (service.audit.report renders it)

Images are the target's dataset's (N×C×H×W, its classes: `TargetInfo.spec`); the sample must be of it.

What runs (`attack_names`): Square (torchattacks; score-based) when the target returns scores, HopSkipJump (ART;
decision-based) when it returns labels only (or when asked for), and transfer from a Papernot substitute trained
on the variant's own labels (Jacobian augmentation from held-out seed images), each through
`service.attacks.query` as `training.blackbox` runs them. An image is defended when every candidate the attack ended
with (its first success, its output inside the ball, its last row when cut short) is answered with its true label
(`repeats` times for a randomized pipeline). The total budget (`max_queries`: rows the attacks and substitutes send)
is split before anything runs (`fit_budget`): if the plan needs more, every cap shrinks by the same factor.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from service.attacks.query import (
    Identities,
    Ledger,
    Oracle,
    Stopped,
    candidates,
    hop_skip_jump,
    judge,
    square,
    train_on_answers,
    transfer_from,
)
from service.audit.data import Sample
from service.audit.spec import AuditSpec, budget_of, variants
from service.audit.target import Host, Meter, TargetClient, resolve_target
from service.stats import wilson

LABELS = {"square": "Square", "hsj": "HopSkipJump", "transfer": "transfer"}
MIN_CAP = 10  # an attack whose per-image cap the budget shrinks below this is not run


@dataclass
class Progress:
    """What GET /v1/audits/{id} and the progress bar show while the audit runs."""

    total: int = 1
    done: int = 0
    step: str = "queued"
    partial: list[dict] = field(default_factory=list)

    def advance(self, step: str) -> None:
        self.done, self.step = min(self.done + 1, self.total), step


@dataclass
class Plan:
    """The attacks to run; per variant its images, caps per image and substitute rounds after the budget."""

    attacks: list[str]
    budgets: dict[str, dict[str, int]]
    not_run: list[dict]
    scale: float = 1.0


def attack_names(spec: AuditSpec, scores: bool, seeds: int, not_run: list[dict]) -> list[str]:
    """The attacks to run, and (into `not_run`) the ones left out and why."""
    asked = spec.attacks
    names = list(asked) if asked is not None else (["square"] if scores else ["hsj"]) + ["transfer"]
    if not scores and "square" in names:
        names.remove("square")
    if not scores:
        not_run.append({"what": "Square (score-based)", "why": "the target returns labels only, no scores to climb; "
                        "the decision-based HopSkipJump runs on its labels instead"})  # fmt: skip
        names = names if "hsj" in names else [*names, "hsj"]
    elif asked is None:
        not_run.append({"what": "HopSkipJump (decision-based)", "why": "the target returns scores, so the "
                        "score-based Square runs; ask for it with attacks: [..., 'hsj']"})  # fmt: skip
    if "transfer" in names and seeds == 0:
        names.remove("transfer")
        not_run.append({"what": "transfer", "why": "no held-out seed images for the substitute (seeds = 0, or the "
                        "sample has no images after the n attacked)"})  # fmt: skip
    missing = _missing_libraries(names)
    for name, why in missing.items():
        names.remove(name)
        not_run.append({"what": LABELS[name], "why": why})
    return [n for n in ("square", "hsj", "transfer") if n in names]


def _missing_libraries(names: list[str]) -> dict[str, str]:
    out = {}
    if "hsj" in names:
        try:
            import art  # noqa: F401
        except ImportError:
            out["hsj"] = "needs adversarial-robustness-toolbox (pip install '.[audit]')"
    return out


def fit_budget(spec: AuditSpec, names: list[str], seeds: int, points: int) -> Plan:
    """Per variant caps and substitute rounds that fit `max_queries`: as asked when they fit, else every cap scaled
    by the same factor (the substitute's rounds by its power of two); what no longer fits is not run."""
    budgets = {v.key: budget_of(spec, v) for v in variants(spec)}
    attacks = {"square": ("n", "square"), "hsj": ("hsj_n", "hsj")}

    def need(b: dict[str, int]) -> tuple[int, int]:
        att = points * sum(b[k] * b[q] for a, (k, q) in attacks.items() if a in names)
        return att, seeds * 2 ** (b["rounds"] - 1) if "transfer" in names else 0

    total = sum(sum(need(b)) for b in budgets.values())
    plan = Plan(list(names), budgets, [])
    budget = int(spec.max_queries or 0)
    if total <= budget:
        return plan
    plan.scale = budget / total
    drop = int(math.floor(math.log2(plan.scale)))  # rounds halve the labels each
    for key, b in budgets.items():
        b["square"], b["hsj"] = int(b["square"] * plan.scale), int(b["hsj"] * plan.scale)
        b["rounds"] = b["rounds"] + drop
        for name, (_, q) in attacks.items():
            if name in names and b[q] < MIN_CAP:
                plan.not_run.append({"what": f"{LABELS[name]} ({key})", "why": f"budget spent: {budget:,} queries "
                                     f"leave fewer than {MIN_CAP} per image"})  # fmt: skip
        if "transfer" in names and b["rounds"] < 1:
            plan.not_run.append({"what": f"transfer ({key})", "why": "the budget cannot label the substitute's seeds"})
    return plan


def summarize(images: dict, n: int) -> dict:
    """Defended images with a Wilson interval; the query of the first success among the broken ones."""
    k = int(sum(images["correct"]))
    first = [q for q, ok in zip(images["first_success"], images["correct"], strict=True) if q >= 0 and not ok]
    q = np.array(images["queries"])
    return {"n": n, "defended": k, "accuracy": round(k / n, 4), "ci": [round(v, 4) for v in wilson(k, n)],
            "broken_with_success_query": len(first), "first_success": sorted(first),
            "median_first_success": float(np.median(first)) if first else None,
            "median_queries": float(np.median(q)) if len(q) else 0.0}  # fmt: skip


def oracle_of(client: TargetClient, ledger: Ledger | None, seed: int) -> Oracle:
    """The attacker's view of the variant: one identity, no EOT, answers among the target dataset's classes (the
    client splits its requests to the server's caps itself)."""
    return Oracle(client, Identities(["audit"]), ledger, 1, None, seed, client.info.spec.num_classes)


def attack_run(name: str, client: TargetClient, x: np.ndarray, y: np.ndarray, norm: str, eps: float,
               b: dict[str, int], spec: AuditSpec, sub: object | None = None) -> dict:  # fmt: skip
    """One attack on the variant's first images, judged: per image its queries, first success and verdict."""
    n, cap = (b["hsj_n"], b["hsj"]) if name == "hsj" else (b["n"], b["square"])
    x, y = x[:n], y[:n]
    ledger = Ledger(x, y, norm, eps)
    oracle = oracle_of(client, None if name == "transfer" else ledger, spec.seed)
    meter, t0, ended = client.meter, time.time(), "finished"
    meter.phase = "attack"
    try:
        if name == "square":
            outputs = {"square": square(oracle, x, y, norm, eps, cap, spec.seed)}
        elif name == "hsj":
            outputs = {"hsj": hop_skip_jump(oracle, x, y, norm, eps, cap, spec.seed)}
        else:
            outputs = transfer_from(sub, x, y, norm, eps, spec.seed)  # type: ignore[arg-type]
    except Stopped as exc:
        ended, outputs = f"stopped: {exc}", {}
    finally:
        meter.phase = "judge"
    attack_s = time.time() - t0
    repeats = spec.repeats if client.variant.randomized else 1
    correct = judge(client, candidates(ledger, outputs, ended == "finished"), y, repeats, "audit")
    images = {"queries": ledger.queries.tolist(), "first_success": ledger.first_success.tolist(),
              "correct": correct.astype(int).tolist()}  # fmt: skip
    return {"variant": client.variant.key, "attack": name, "label": LABELS[name], "norm": norm, "eps": eps,
            "n": n, "queries_cap": cap if name != "transfer" else None, "repeats": repeats, "ended": ended,
            "attack_s": round(attack_s, 1), "judge_s": round(time.time() - t0 - attack_s, 1), "images": images,
            "summary": summarize(images, n)}  # fmt: skip


def clean_pass(client: TargetClient, x: np.ndarray, y: np.ndarray) -> dict:
    """Accuracy on the unperturbed images (one pass in batches) and its throughput."""
    client.meter.phase = "clean"
    t0 = time.perf_counter()
    labels = client.infer(x).labels
    secs = time.perf_counter() - t0
    k, n = int((labels == y).sum()), len(y)
    return {"n": n, "correct": k, "accuracy": round(k / n, 4), "ci": [round(v, 4) for v in wilson(k, n)],
            "images_per_s": round(n / secs, 1) if secs > 0 else None, "scores": bool(client.scores)}  # fmt: skip


def timing(client: TargetClient, x: np.ndarray, k: int) -> dict:
    """Single-image requests, one after another: latency median and 90th percentile (ms)."""
    client.meter.phase = "timing"
    ms = []
    for i in range(min(k, len(x))):
        t0 = time.perf_counter()
        client.infer(x[i : i + 1])
        ms.append((time.perf_counter() - t0) * 1e3)
    return {"requests": len(ms), "latency_ms_median": round(float(np.median(ms)), 2),
            "latency_ms_p90": round(float(np.percentile(ms, 90)), 2)}  # fmt: skip


def worst_case(runs: list[dict], limit: int | None = None) -> dict:
    """Per image, defended against every run of one variant, threat and ε (on the images all of them attacked,
    at most `limit`); the worst attack is the run with the lowest robust accuracy."""
    n = min([r["n"] for r in runs] + ([limit] if limit else []))
    ok = np.ones(n, bool)
    for r in runs:
        ok &= np.array(r["images"]["correct"][:n], bool)
    k = int(ok.sum())
    worst = min(runs, key=lambda r: (r["summary"]["accuracy"], -r["n"]))
    return {"n": n, "defended": k, "accuracy": round(k / n, 4), "ci": [round(v, 4) for v in wilson(k, n)],
            "worst_attack": worst["label"], "worst_attack_accuracy": worst["summary"]["accuracy"],
            "attacks": [r["label"] for r in runs]}  # fmt: skip


def comparisons(doc: dict) -> None:
    """The worst case per variant and point; per pipeline the guard's gain over the bare target and its cost."""
    points = list(dict.fromkeys((r["norm"], r["eps"]) for r in doc["runs"]))

    def runs_of(v: str, norm: str, eps: float) -> list[dict]:
        return [r for r in doc["runs"] if r["variant"] == v and (r["norm"], r["eps"]) == (norm, eps)]

    doc["worst"] = [{"variant": v, "norm": norm, "eps": eps, **worst_case(runs_of(v, norm, eps))}
                    for norm, eps in points for v in doc["variants"] if runs_of(v, norm, eps)]  # fmt: skip
    by = {(w["variant"], w["norm"], w["eps"]): w for w in doc["worst"]}
    doc["gain"], doc["cost"] = [], []
    bare_t, bare_c = doc["timing"].get("bare"), doc["clean"].get("bare")
    for v in doc["variants"][1:]:
        for norm, eps in points:
            g, bare = by.get((v, norm, eps)), runs_of("bare", norm, eps)
            if g and bare:
                b = worst_case(bare, g["n"])  # on the images the pipeline's runs attacked
                doc["gain"].append({"pipeline": v, "norm": norm, "eps": eps, "n": g["n"], "bare": b["accuracy"],
                                    "guarded": g["accuracy"], "gain": round(g["accuracy"] - b["accuracy"], 4),
                                    "separated": g["ci"][0] > b["ci"][1] or b["ci"][0] > g["ci"][1]})  # fmt: skip
        t, c = doc["timing"].get(v), doc["clean"].get(v)
        if t and bare_t and c and bare_c:
            doc["cost"].append({"pipeline": v, "latency_ms": t["latency_ms_median"],
                                "bare_latency_ms": bare_t["latency_ms_median"],
                                "latency_x": round(t["latency_ms_median"] / bare_t["latency_ms_median"], 1),
                                "images_per_s": c["images_per_s"], "bare_images_per_s": bare_c["images_per_s"],
                                "clean_accuracy": c["accuracy"],
                                "bare_clean_accuracy": bare_c["accuracy"]})  # fmt: skip


def new_doc(spec: AuditSpec, sample: Sample, started: str) -> dict:
    """The report's skeleton, filled in place as the audit goes (a cancelled audit keeps what it has)."""
    return {"info": {"started": started, "spec": spec.model_dump(), "sample": sample.source,
                     "classes": sample.classes, "images": {"attacked": f"the sample's first {spec.n}"}},
            "target": None, "variants": [v.key for v in variants(spec)], "clean": {}, "timing": {}, "runs": [],
            "substitutes": {}, "not_run": [], "worst": [], "gain": [], "cost": [], "queries": {}}  # fmt: skip


def run_audit(spec: AuditSpec, sample: Sample, host: Host, meter: Meter, progress: Progress, doc: dict) -> dict:
    """The whole audit into `doc` (see the module docstring); `Cancelled` propagates, `doc` keeps what was done."""
    progress.step = "reading the target's metadata"
    info = resolve_target(spec.target, host, spec.input)
    doc["target"] = info.public()
    x, y, seeds = sample.split(spec.n, spec.seeds)
    doc["info"]["images"]["seeds"] = f"the sample's last {len(seeds)} after the attacked ones"
    vs = variants(spec)
    clients = {v.key: TargetClient(host, info, v, meter) for v in vs}
    progress.total = len(vs) + 1
    for v in vs:
        progress.step = f"{v.key}: clean accuracy"
        doc["clean"][v.key] = clean_pass(clients[v.key], x, y)
        progress.advance(f"{v.key}: clean accuracy done")
    points = [(t.norm, e) for t in spec.threats for e in t.eps]
    names = attack_names(spec, bool(clients["bare"].scores), len(seeds), doc["not_run"])
    plan = fit_budget(spec, names, len(seeds), len(points))
    doc["not_run"] += plan.not_run
    doc["plan"] = {"attacks": plan.attacks, "budgets": plan.budgets, "scale": round(plan.scale, 4)}
    per_variant = ("transfer" in plan.attacks) + len(points) * len(plan.attacks)
    progress.total = progress.done + len(vs) * per_variant + 1
    for v in vs:
        run_variant(clients[v.key], plan, spec, (x, y, seeds), points, doc, progress)
    progress.step = "timing single-image requests"
    for v in vs:
        doc["timing"][v.key] = timing(clients[v.key], x, spec.timing_images)
    progress.advance("timing done")
    comparisons(doc)
    seconds = {k: {p: round(s, 1) for p, s in d.items()} for k, d in meter.seconds.items()}
    doc["queries"] = {
        "budget": spec.max_queries,
        "attacks_and_substitutes": meter.spent,
        "rows": meter.rows,
        "seconds": seconds,
    }
    return doc


def run_variant(client: TargetClient, plan: Plan, spec: AuditSpec, images: tuple[np.ndarray, ...],
                points: list[tuple[str, float]], doc: dict, progress: Progress) -> None:  # fmt: skip
    """One variant's substitute and attack runs, appended to `doc` and to the progress's partial results."""
    x, y, seeds = images
    key, sub = client.variant.key, None
    b = plan.budgets[key]
    if "transfer" in plan.attacks and b["rounds"] >= 1:
        progress.step = f"{key}: training the substitute on its answers"
        client.meter.phase = "attack"
        oracle = oracle_of(client, None, spec.seed)
        try:
            sub, doc["substitutes"][key] = train_on_answers(oracle, seeds, b["rounds"], spec.seed)
        except Stopped as exc:
            doc["not_run"].append({"what": f"transfer ({key})", "why": str(exc)})
        progress.advance(f"{key}: substitute done")
    for norm, eps in points:
        for name in plan.attacks:
            if sub is None if name == "transfer" else b["square" if name == "square" else "hsj"] < MIN_CAP:
                progress.advance(f"{key}: {LABELS[name]} not run")
                continue
            progress.step = f"{key}: {LABELS[name]} {norm} ε={eps:g}"
            r = attack_run(name, client, x, y, norm, eps, b, spec, sub)
            doc["runs"].append(r)
            s = r["summary"]
            progress.partial.append({"variant": key, "attack": r["label"], "norm": norm, "eps": eps, "n": s["n"],
                                     "accuracy": s["accuracy"], "ci": s["ci"]})  # fmt: skip
            progress.advance(f"{progress.step} done")
