"""docs/robustness.md and the measured figures from `training.robustness`'s rows: per pipeline the newest run's row
(results/robustness/<dataset>/), the default chosen over them, and the checks made on that default."""

from __future__ import annotations

from pathlib import Path

from service.registry import Registry
from training import results
from training.common import ROOT, warm_config
from training.robustness_protocol import (
    DETECT_ATTACKS,
    PUBLISHED,
    STANDARD,
    THREATS,
    UNION,
    choose_default,
    clean_bar,
    pipelines,
    threat_key,
    union_key,
)

JOB = "robustness"


DOCS = ROOT / "docs"


def measured(doc: dict) -> tuple[dict[str, dict], dict | None, dict | None]:
    """A dataset's page doc as /v1/models' measured figures: per classifier key its `robustness` per defense, the
    dataset's default pipeline and its best pipeline under the union (each with the threat it was ranked at and the
    command that measured it)."""
    dataset, out = doc["dataset"], {}
    for r in doc["results"]:
        cell = {"clean": r["clean"],
                **{t: {k: v[k] for k in ("accuracy", "ci", "n")} | {"attacks": list(r["attacks"])}
                   for t, v in r["threats"].items()},
                "evaluation": r.get("evaluation", doc["info"])}  # fmt: skip
        if "detect_or_correct" in r:
            d = r["detect_or_correct"]
            cell["detect_or_correct"] = {
                t: {k: c[k] for k in ("accuracy", "ci", "n")} | {"attacks": list(d["attacks"])}
                for t, c in d.items() if t not in ("threshold", "attacks")
            } | {"threshold": d["threshold"]}  # fmt: skip
        out.setdefault(f"{dataset}/{r['classifier']}", {}).setdefault("robustness", {})[r["defense"]] = cell

    def ranked(d: dict | None, threat: str) -> dict | None:
        return None if d is None else {**d, "threat": threat, "command": _measured_by(doc, d)["command"]}

    return (
        out,
        ranked(doc.get("default"), threat_key(*STANDARD[dataset])),
        ranked(doc.get("union_default"), union_key(dataset)),
    )


def _measured_by(doc: dict, default: dict) -> dict:
    """The run that measured the default's row."""
    return next((r.get("evaluation", doc["info"]) for r in doc["results"]
                 if f"{doc['dataset']}/{r['classifier']}" == default["classifier"]
                 and r["defense"] == default["defense"]), doc["info"])  # fmt: skip


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


def dataset_lines(doc: dict) -> list[str]:
    """One dataset's section of docs/robustness.md."""
    ds, threats = doc["dataset"], [threat_key(*t) for t in doc["threats"]] + [union_key(doc["dataset"])]
    runs = _runs(doc)
    lines: list[str] = []
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
    lines += _best_lines(doc, threats)
    lines += _table_lines(doc, threats, runs) + _detect_lines(doc) + _per_attack_lines(doc) + _check_lines(doc)
    lines.append("")
    return lines


def _table_lines(doc: dict, threats: list[str], runs: list[dict]) -> list[str]:
    lines: list[str] = []
    head = ["classifier", "training", "defense", "clean", *threats] + (["run"] if len(runs) > 1 else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in doc["results"]:
        clean = r["clean"]
        row = [r["classifier"], r["method"], r["defense"], f"{clean['accuracy']:.4f} (n={clean['n']})",
               *[_cell(r["threats"].get(t)) for t in threats]]  # fmt: skip
        row += [str(runs.index(r.get("evaluation", doc["info"])) + 1)] if len(runs) > 1 else []
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _best_lines(doc: dict, threats: list[str]) -> list[str]:
    """Per threat, and under the union, the pipeline `choose_default`'s rule ranks first there (the union's is
    `defaults.union` in /v1/models)."""
    ds, bar = doc["dataset"], clean_bar(doc["dataset"], doc["results"])
    lines = [f"Best per threat (clean accuracy ≥ {bar:.4f}; compared on the images all were attacked on):", ""]
    rows = [unpack_flags(r) for r in doc["results"]]  # paired on the per-image flags, as the default was chosen
    for t in threats:
        row = _row_of(doc, choose_default(rows, ds, t))
        what = f"`{row['classifier']}` + `{row['defense']}`, {_cell(row['threats'][t])}" if row else "not measured"
        what = "none holds any image" if row and row["threats"][t]["accuracy"] == 0 else what
        lines.append(f"- {t}{' (both at once)' if t == union_key(ds) else ''}: {what}")
    return [*lines, ""]


def _row_of(doc: dict, pipeline: dict | None) -> dict | None:
    """The page's row of a chosen pipeline ({"classifier": "<dataset>/<name>", "defense"})."""
    return next((r for r in doc["results"] if pipeline and f"{doc['dataset']}/{r['classifier']}" ==
                 pipeline["classifier"] and r["defense"] == pipeline["defense"]), None)  # fmt: skip


def _detect_lines(doc: dict) -> list[str]:
    ds, lines = doc["dataset"], []
    dets = [r for r in doc["results"] if "detect_or_correct" in r]
    if not dets:
        return lines
    union, std = union_key(ds), threat_key(*STANDARD[ds])
    cols = [threat_key(*t) for t in UNION[ds]] + [union]
    lines += ["", "Correct or flagged (the detector's rejections count as defended) under attacks that also keep "
              "the detectors under their thresholds (detector-aware PGD: BPDA through a projection, exact through "
              "MagNet; `-w1`/`-w100`: the detector penalty's weight, 10 where unnamed; the latent attack, L∞ only), "
              "at each threat of the union and both at once; beside them the "
              "plain worst case (rejections count as errors):", "",
              f"| classifier | defense | threshold | attacks | {' | '.join(cols)} | plain {std} | plain {union} |",
              "|---|---|---|---|" + "---|" * (len(cols) + 2)]  # fmt: skip
    served, off = doc.get("service_thresholds", {}), False
    for r in dets:
        d = r["detect_or_correct"]
        names = ", ".join(d.get("attacks", DETECT_ATTACKS))
        mark = "" if abs(served.get(r["defense"], d["threshold"]) - d["threshold"]) < 1e-9 else " †"
        off |= bool(mark)
        lines.append(f"| {r['classifier']} | {r['defense']} | {d['threshold']:.4f}{mark} | {names} | "
                     + " | ".join(_cell(d.get(t)) for t in cols)
                     + f" | {_cell(r['threats'].get(std))} | {_cell(r['threats'].get(union))} |")  # fmt: skip
    if off:
        lines += ["", "† measured at a threshold other than the one the service applies at this projection "
                  f"({', '.join(f'{k} {v:.4f}' for k, v in sorted(served.items()))}): the row's attack and "
                  "verdict used the start's older calibration, not the one keyed by its (start, L, R); not "
                  "re-measured."]  # fmt: skip
    return lines


def _per_attack_lines(doc: dict) -> list[str]:
    ds, lines = doc["dataset"], []
    lines += ["", "Per attack (robust images left after each, in order) for the standard threat:", ""]
    std = threat_key(*STANDARD[ds])
    for r in doc["results"]:
        t = r["threats"].get(std)
        if t:
            steps = ", ".join(f"{a} {k}" for a, k in t["after"].items())
            lines.append(f"- {r['classifier']} + {r['defense']}: clean {t['clean_correct']}/{t['n']} → {steps}")
    return lines


def _check_lines(doc: dict) -> list[str]:
    lines: list[str] = []
    if doc.get("sanity"):
        s = doc["sanity"]
        lines += ["", f"Sanity checks (Carlini et al. 2019) on `{s['pipeline']}`, n={s['n']}, "
                  f"{s['threat']}:", "", f"- APGD-CE accuracy by ε: {s['eps_sweep_apgd_ce']}",
                  f"- APGD-CE by iterations: {s['iterations_apgd_ce']}",
                  f"- white-box APGD-CE {s['white_box_apgd_ce']}, black-box Square {s['black_box_square']}",
                  *[f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in s["checks"].items()]]  # fmt: skip
    for h in (doc[k] for k in ("holdout", "holdout_union") if doc.get(k)):
        lines += ["", f"Held out (test images {h['test_indices'][0]}–{h['test_indices'][1] - 1}, outside the "
                  f"slice; same attacks, another seed): `{h['pipeline']}` at {h['threat']}: "
                  f"{_cell(h)}; clean {h['clean_correct']}/{h['n']}."]  # fmt: skip
    if doc.get("cross_check"):
        c = doc["cross_check"]
        lines += ["", f"Own attack vs reference on `{c['pipeline']}` ({c['threat']}, same {c['n']} images): "
                  f"the service's PGD-{c['iters']} {c['ours']:.3f}, pyautoattack APGD-CE {c['reference']:.3f} "
                  f"(difference {c['ours'] - c['reference']:+.3f})."]  # fmt: skip
    return lines


def render(docs: list[dict], out: Path = DOCS / "robustness.md") -> str:
    """docs/robustness.md from each dataset's page doc (`page_from_tree`)."""
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
        "The union column (`linf:ε∞+l2:ε₂`, both threats at once; Maini et al. 2020): an image counts only if",
        'every attack of both norms failed on it, on the images both threats were attacked on; "–" where a row\'s',
        "run predates per-image flags at every threat (rerun it with `--only`).",
        "",
    ]
    for doc in sorted(docs, key=lambda d: d["dataset"]):
        lines += dataset_lines(doc)
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
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


def page_doc(dataset: str, info: dict, rows: list[dict], default: dict | None, checks: dict) -> dict:
    """docs/robustness-<dataset>.json's content: the rows, the default and the best pipeline under the union."""
    return {"dataset": dataset, "threats": THREATS[dataset], "info": info,
            "results": [pack_flags(r) for r in rows], "default": default,
            "union_default": choose_default(rows, dataset, union_key(dataset)), **checks}  # fmt: skip


def page_from_tree(reg: Registry, dataset: str, root: Path = results.RESULTS_DIR) -> dict | None:
    """The dataset's page doc from the results tree: per pipeline still served the newest run's row (with that
    run's config as its `evaluation`), the default chosen over them, and the newest checks made on that default."""
    cells = results.newest(JOB, dataset, ("row", "classifier", "defense", "name"), root)
    if not cells:
        return None
    runs = {r["run"]: {k: v for k, v in r.items() if k != "run"} for r in results.used_runs(JOB, dataset, cells, root)}
    by = {(c["classifier"], c["defense"]): unpack_flags(_row(c, runs))
          for c in cells if c["row"] == "pipeline"}  # fmt: skip
    rows = [by[k] for k in pipelines(reg, dataset, reg.classifiers(dataset)) if k in by]  # every measured one
    default = choose_default(rows, dataset)
    on = {"holdout_union": _pipeline_name(choose_default(rows, dataset, union_key(dataset)))}  # the rest: the default's
    checks = {c["row"]: {k: v for k, v in c.items() if k not in ("row", "run")} for c in cells
              if c["row"] != "pipeline" and c.get("pipeline") == on.get(c["row"], _pipeline_name(default))}  # fmt: skip
    newest = runs[max(runs, key=lambda name: results.order(name))]
    return page_doc(dataset, newest, rows, default, checks) | {"service_thresholds": service_thresholds(reg, dataset)}


def service_thresholds(reg: Registry, dataset: str) -> dict[str, float]:
    """The detector threshold the service applies per defense: at the warm start's (start, L, R) behind the
    projection (`Registry.detector`), MagNet's detector I."""
    out = {}
    if reg.has(f"{dataset}/generator"):
        warm = warm_config(reg, dataset)
        det = reg.detector(dataset, warm.init, warm.steps, warm.restarts)
        if det is not None:
            out["invert-classify"] = det.threshold
    if reg.has(f"{dataset}/magnet"):
        out["magnet"] = reg.magnet_thresholds(dataset)[0]
    return out


def _row(cell: dict, runs: dict[str, dict]) -> dict:
    return {k: v for k, v in cell.items() if k not in ("row", "run")} | {"evaluation": runs[cell["run"]]}


def _pipeline_name(default: dict | None) -> str:
    """A default's pipeline as `Pipeline.name` spells it."""
    return f"{default['classifier'].split('/', 1)[1]}+{default['defense']}" if default else ""


def previous_rows(reg: Registry, dataset: str, root: Path = results.RESULTS_DIR) -> list[dict]:
    """The rows of the dataset's recorded evaluation (each with the run that measured it)."""
    doc = page_from_tree(reg, dataset, root)
    return [] if doc is None else [unpack_flags(r) for r in doc["results"]]


def merge(old: list[dict], new: list[dict], order: list[tuple[str, str]]) -> list[dict]:
    """`old` with the rows of `new` in place of those for the same pipeline, in `order` (pipelines no longer
    served are dropped)."""
    by = {(r["classifier"], r["defense"]): r for r in old} | {(r["classifier"], r["defense"]): r for r in new}
    return [by[k] for k in order if k in by]


def pack_flags(r: dict) -> dict:
    """A result for the page's JSON: per-image flags (what `choose_default` pairs on, and the union is made of) as a
    string of 0s and 1s in each threat's cell; the detector cells keep none."""
    out = strip_flags(r)
    for t, cell in r["threats"].items():
        if cell.get("robust_flags") is not None:
            out["threats"][t] = out["threats"][t] | {
                "robust_bits": "".join("1" if f else "0" for f in cell["robust_flags"])
            }
    return out


def unpack_flags(r: dict) -> dict:
    """`pack_flags` undone."""

    def cell(c: dict) -> dict:
        if "robust_bits" not in c:
            return c
        return {k: v for k, v in c.items() if k != "robust_bits"} | {
            "robust_flags": [b == "1" for b in c["robust_bits"]]
        }

    return r | {"threats": {t: cell(c) for t, c in r["threats"].items()}}
