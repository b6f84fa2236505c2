"""Does an audit agree with the query-attack evaluation? The audit's own report against `training.blackbox.run_attack`
on the same images, attacks, budgets and answers.

    python -m training.audit_agreement --report docs/audit-example      # → docs/audit-example/agreement.md (+ .json)

Reads the audit's `report.json` (its command, sample, threats, budgets and guarded pipelines), starts what the audit
ran against: the tests' KServe ModelServer serving the shipped classifier A (`tests/upstreams.py`) and a
`python -m service` proxying it as `user-model` (no public profile: full probabilities, as the audit reads them),
then runs each of the audit's Square and transfer runs again with the query-attack suite's judge
(`training.blackbox.run_attack`): the same first n images of the sample, the same substitute seeds (the sample's
last `seeds` after them), the same query and round budgets, each guarded pipeline's parameters on every request.
The judges differ in one way: the reference judges a randomized pipeline (Defense-GAN's random restarts) worst of 10
resubmissions, the audit worst of its `repeats` (3 by default), so the reference can only be lower there. A cell
agrees when the two Wilson 95% intervals overlap; the deterministic bare target should agree to within an image or
two (the same answers and seed, Square's own randomness aside).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from service.attacks.query import AddressBook, Client
from service.audit.spec import RANDOMIZED
from training import data
from training.blackbox import Attack, Budget, Pipeline, run_attack, start_upstream, summarize
from training.common import MODELS_DIR, ROOT, command_line, git_commit
from training.processes import Server, free_port

ATTACKS = ("square", "transfer")  # the runs both can make on a scores target (HopSkipJump: labels-only targets)


def start_proxy(upstream: str, log: Path) -> Server:
    """`python -m service` proxying the upstream's `mnist-nchw` as `user-model`, every answer in full."""
    port = free_port()
    env = {"MG_MODELS_DIR": str(MODELS_DIR), "MG_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "MG_HOST": "127.0.0.1",
           "MG_PORT": str(port), "MG_REQUEST_TIMEOUT_S": "900", "MG_WARM_UP": "false",
           "MG_PROXY__UPSTREAMS": json.dumps({"user-model": {"url": upstream, "model": "mnist-nchw"}})}  # fmt: skip
    return Server([sys.executable, "-m", "service", "--log-level", "warning"], log, env, "/readyz", port)


def variants(spec: dict) -> list[tuple[str, dict, dict]]:
    """(the audit's variant name, request parameters, budget) of the bare target and each guarded pipeline."""
    out = [("bare", {"defense": "none"}, {"n": spec["n"], "queries": spec["queries"], "rounds": spec["rounds"]})]
    for p in spec.get("pipelines") or []:
        params = {k: p[k] for k in ("defense", "steps", "restarts") if p.get(k) is not None}
        name = p["defense"] + (f" L={p['steps']} R={p['restarts']}" if p.get("steps") else "")
        budget = {k: p.get(k) or spec[k] for k in ("n", "queries", "rounds")}
        out.append((f"guarded: {name}", params, budget))
    return out


def sample_sets(spec: dict) -> dict[str, np.ndarray]:
    """The audit's images (a shipped slice: its first n) and substitute seeds (its last `seeds`)."""
    xs, ys = data.load_slice(spec["sample"])
    x = data.to_float(xs)
    return {"x": x, "y": ys.astype(np.int64), "seeds": x[len(x) - spec["seeds"] :]}


def audit_runs(report: dict) -> dict[tuple[str, str, str], dict]:
    """The audit's summaries keyed (variant, attack, threat "norm:eps")."""
    return {(r["variant"], r["attack"], f"{r['norm']}:{r['eps']:g}"): r["summary"] for r in report["runs"]
            if r["attack"] in ATTACKS}  # fmt: skip


def compare(report: dict, url: str) -> list[dict]:
    """Every audit run of ATTACKS again through `training.blackbox.run_attack`; one row per run, both figures."""
    spec, ours, rows = report["info"]["spec"], audit_runs(report), []
    sets = sample_sets(spec)
    for variant, params, b in variants(spec):
        randomized = params["defense"] in RANDOMIZED
        p = Pipeline("audit", variant, "user-model", {}, True, randomized, "fast")
        budget = Budget(n=b["n"], full_n=b["n"], square=b["queries"], seeds=spec["seeds"], rounds=b["rounds"])
        for threat in spec["threats"]:
            for eps in threat["eps"]:
                for name in ATTACKS:
                    key = (variant, name, f"{threat['norm']}:{eps:g}")
                    if key not in ours:
                        continue
                    t0 = time.time()
                    client = Client(url, "user-model", params=params)
                    ref = summarize(run_attack(Attack(name, threat["norm"], eps), p, budget, False, client, client,
                                               sets, AddressBook(), seed=spec.get("seed", 0)))  # fmt: skip
                    rows.append(row(key, ours[key], ref, time.time() - t0))
                    print(f"{variant:<34} {name:<9} {key[2]:<9} audit {ours[key]['accuracy']:.3f} "
                          f"reference {ref['accuracy']:.3f} ({rows[-1]['seconds']:.0f} s)", flush=True)  # fmt: skip
    return rows


def row(key: tuple[str, str, str], ours: dict, ref: dict, seconds: float) -> dict:
    lo, hi = max(ours["ci"][0], ref["ci"][0]), min(ours["ci"][1], ref["ci"][1])
    return {"variant": key[0], "attack": key[1], "threat": key[2], "n": ours["n"], "audit": ours, "reference": ref,
            "difference": round(ours["accuracy"] - ref["accuracy"], 4), "overlap": lo <= hi,
            "seconds": round(seconds, 1)}  # fmt: skip


def render(doc: dict) -> str:
    cell = "{accuracy:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]".format
    lines = ["# The audit against the query-attack evaluation", "",
             f"Generated by `{doc['command']}` on {doc['date']} at commit {doc['commit']}, {doc['minutes']} min, from",
             f"the audit `{doc['audit_command']}`. See the module docstring of `training.audit_agreement` for what",
             "is held equal. Figures: images defended (correct after the attack, per image), Wilson 95% interval.", "",
             "| variant | attack | threat | n | audit | query-attack evaluation | difference | intervals overlap |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in doc["rows"]:
        overlap = "yes" if r["overlap"] else "no"
        lines.append(f"| {r['variant']} | {r['attack']} | {r['threat']} | {r['n']} | {cell(**r['audit'])} | "
                     f"{cell(**r['reference'])} | {r['difference']:+.3f} | {overlap} |")  # fmt: skip
    agree = sum(r["overlap"] for r in doc["rows"])
    lines += ["", f"{agree} of {len(doc['rows'])} cells agree within sampling error.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "audit-example", help="the audit's output folder")
    p.add_argument("--logs", type=Path, default=ROOT / "runs" / "audit-agreement")
    a = p.parse_args(argv)
    report = json.loads((a.report / "report.json").read_text())
    a.logs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    up = start_upstream(MODELS_DIR / "mnist" / "classifier_A.onnx", a.logs / "upstream.log")
    try:
        srv = start_proxy(up.url, a.logs / "service.log")
        try:
            rows = compare(report, srv.url)
        finally:
            srv.stop()
    finally:
        up.stop()
    doc = {"command": command_line(), "commit": git_commit(), "date": time.strftime("%Y-%m-%d"), "rows": rows,
           "minutes": round((time.time() - t0) / 60, 1), "audit_command": report["info"]["command"]}  # fmt: skip
    (a.report / "agreement.json").write_text(json.dumps(doc, indent=1) + "\n")
    (a.report / "agreement.md").write_text(render(doc))
    print(f"wrote {a.report / 'agreement.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
