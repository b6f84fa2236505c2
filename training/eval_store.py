"""`training.evaluate`'s cells in the results tree, and the page's view of them: the newest row per cell.

A run writes one row per cell it measured — `{"group", "path", "value"}`, e.g. group "whitebox", path
["fgsm", "A", "warm"] — and never the cells of the columns or sections it did not run. The page (and a `--columns`
run, for the columns it reuses) reads back, per cell, the newest run's row among the runs on the same n images.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from training import results
from training.eval_protocol import CLASSIFIERS, COLUMNS, EPS

JOB = "evaluate"
QUICK_JOB = "evaluate-quick"  # smoke runs: their own job, never on a page of record
# how deep a group's cells sit in `Evaluation.results`, and where the column is on a cell's path
DEPTH = {"clean": 2, "whitebox": 3, "blackbox": 2, "adaptive": 3, "detector": 2, "cw_l2": 2, "substitutes": 1}
COLUMN_AT = {"clean": -1, "whitebox": -1, "blackbox": -1, "adaptive": -1, "detector": 0, "cw_l2": -1}
RUN_FIELDS = ("command", "commit", "date", "columns", "sections")  # what the page says of a run it reuses


def job(quick: bool) -> str:
    return QUICK_JOB if quick else JOB


def flatten(group: str, node: object, depth: int, path: tuple = ()) -> Iterator[tuple[tuple, object]]:
    if depth == 0 or not isinstance(node, dict):
        yield path, node
        return
    for k, v in node.items():
        yield from flatten(group, v, depth - 1, (*path, k))


def rows_of(results_json: dict, columns: set[str], groups: set[str]) -> list[dict]:
    """The cells a run measured: those of its `groups` in its `columns` (substitutes: every one it holds)."""
    out = []
    for group in groups:
        for path, value in flatten(group, results_json.get(group, {}), DEPTH[group]):
            if group in COLUMN_AT and path and path[COLUMN_AT[group]] not in columns:
                continue
            out.append({"group": group, "path": list(path), "value": value})
    return out


def nest(rows: list[dict]) -> dict:
    """`rows_of` undone: {group: nested cells}."""
    out: dict = {group: {} for group in DEPTH}
    for row in rows:
        node = out.setdefault(row["group"], {})
        for k in row["path"][:-1]:
            node = node.setdefault(k, {})
        if row["path"]:
            node[row["path"][-1]] = row["value"]
        else:
            out[row["group"]] = row["value"]
    return out


def view(dataset: str, root: Path, n: int | None = None, quick: bool = False) -> dict | None:
    """The page's view of the dataset: {"info", "results"} from the newest row per cell, over the runs on `n`
    images (default: the newest run's n); `info` is the newest run's, with the others it reuses under "reused".
    None where no run was recorded."""
    all_runs = results.runs(job(quick), dataset, root)
    if not all_runs:
        return None
    n = results.config(all_runs[-1])["n"] if n is None else n
    cells = results.newest(job(quick), dataset, ("group", "path"), root, where=lambda cfg: cfg.get("n") == n)
    used = results.used_runs(job(quick), dataset, cells, root)
    if not used:
        return None
    info = {k: v for k, v in used[0].items() if k not in ("run", "reused")}
    # the runs it draws on, each with the runs its own page drew on (a migrated page's `reused`)
    others = [e for r in used for e in ([{k: r[k] for k in RUN_FIELDS if k in r}] if r is not used[0] else [])
              + r.get("reused", [])]  # fmt: skip
    figure = next((r["figure"] for r in used if r.get("figure")), None)
    return {"info": info | {"figure": figure} | ({"reused": others} if others else {}), "results": nest(cells)}


def headline(ev: Any, info: dict) -> dict[str, dict]:
    """Per classifier key: clean and robust accuracy per service defense, for models/manifest.json."""
    out: dict[str, dict] = {}
    linf = [("whitebox", "fgsm"), ("whitebox", "rand-fgsm"), ("adaptive", "eot"), ("adaptive", "latent")]
    linf_attacks = {attack for _, attack in linf}
    for arch in CLASSIFIERS:
        for col, (_, defense) in COLUMNS.items():
            key = ev.key(arch, col)
            clean = ev.results["clean"].get(arch, {}).get(col)
            if key is None or not isinstance(clean, dict) or col not in ev.columns:  # reused: its run recorded it
                continue
            m = out.setdefault(key, {"eval_clean_accuracy": {}, "eval_fixed_step_min": {}, "evaluation": {}})
            m["eval_clean_accuracy"][defense] = round(clean["cell"].acc, 4)
            detail = m["evaluation"].setdefault(defense, {"clean": clean["cell"].as_json()})
            cells = {attack: v for group, attack in [*linf, ("whitebox", "cw")]
                     if isinstance(v := ev.results[group].get(attack, {}).get(arch, {}).get(col), dict)
                     and "cell" in v}  # fmt: skip
            for attack, v in cells.items():
                detail[attack] = v["cell"].as_json()
                if "defended" in v:  # correct-or-flagged by the detector
                    detail[attack]["correct_or_flagged"] = v["defended"].as_json()
            scored = [(v["cell"].acc, a) for a, v in cells.items() if a in linf_attacks]
            if scored:
                acc, attack = min(scored, key=lambda t: t[0])  # the first of equals, in `linf` order
                # the adaptive "eot" row is PGD-40 where the column has no projection to attack through
                name = "pgd" if attack == "eot" and ev.projection(col) is None else attack
                m["eval_fixed_step_min"][defense] = {"linf_eps": EPS, "accuracy": round(acc, 4),
                                                      "worst_attack": name, "n": detail[attack]["n"]}  # fmt: skip
                doc = [(v["defended"].acc, a) for a, v in cells.items() if a in linf_attacks and "defended" in v]
                if doc:
                    doc_acc, doc_attack = min(doc, key=lambda t: t[0])
                    m["eval_fixed_step_min"][defense] |= {"correct_or_flagged": round(doc_acc, 4),
                                                           "correct_or_flagged_worst_attack": doc_attack}  # fmt: skip
    for m in out.values():
        m["evaluation"] = {**m["evaluation"], "n": ev.s.n, "quick": info["quick"], "commit": info["commit"],
                           "date": info["date"], "command": info["command"], "page": info["page"]}  # fmt: skip
    return out
