"""The audit's report as files: report.json (everything), report.md (the tables) and hand-written SVG plots.

    write_report(doc, folder)      # report.json, report.md, robust-linf.svg, robust-l2.svg, queries.svg
    render(doc) -> str             # the Markdown alone (the page shows the same tables from the JSON)

Figures: robust accuracy (an image defended against every attack run at that threat and ε) with a Wilson 95%
interval and n; queries to first success among the images broken; the guard's gain and cost beside the bare target.
"""

from __future__ import annotations

import json
import math
from html import escape
from pathlib import Path

import numpy as np

NAMES = {"linf": "L∞", "l2": "L2"}
COLORS = ("#1f4e79", "#c0504d", "#4f8a3c", "#8064a2", "#d08a1f", "#2a9d9d", "#7f7f7f", "#a0522d")
W, H, PAD = 520, 300, 52


def write_report(doc: dict, folder: Path) -> list[str]:
    """The report's files in `folder` (created); their names."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"report.json": json.dumps(doc, indent=1) + "\n"}
    for norm in sorted({w["norm"] for w in doc["worst"]}):
        files[f"robust-{norm}.svg"] = robust_plot(doc, norm)
    if any(r["summary"]["first_success"] for r in doc["runs"]):
        files["queries.svg"] = queries_plot(doc)
    doc.setdefault("files", sorted([*files, "report.md"]))
    files["report.json"] = json.dumps(doc, indent=1) + "\n"
    files["report.md"] = render(doc)
    for name, text in files.items():
        (folder / name).write_text(text)
    return sorted(files)


def ci_text(s: dict) -> str:
    return f"{s['accuracy']:.3f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}] (n={s['n']})"


def render(doc: dict) -> str:
    """report.md: the target, the headline per threat, the guard's gain and cost, each run, what was not run."""
    info, t = doc["info"], doc.get("target") or {}
    lines = [f"# Robustness audit of `{t.get('name', info['spec']['target'])}`", "",
             f"Command: `{info.get('command', 'POST /v1/audits')}`; started {info['started']}"
             + (f", {info['minutes']} min" if info.get("minutes") is not None else "") + ".", "",
             f"Sample: {info['sample']}; attacked: {info['images']['attacked']}; substitute seeds: "
             f"{info['images'].get('seeds', '–')}.", ""]  # fmt: skip
    lines += target_lines(t) + headline(doc) + gain_lines(doc) + cost_lines(doc) + run_lines(doc)
    lines += queries_lines(doc) + not_run_lines(doc) + budget_lines(doc)
    lines += ["", "Plots: " + ", ".join(f"![{f}]({f})" for f in doc.get("files", []) if f.endswith(".svg"))]
    return "\n".join(lines) + "\n"


def target_lines(t: dict) -> list[str]:
    """The target's contract, model list and notes."""
    if not t:
        return []
    out = ["## Target", "", f"- {t['kind']} model, dataset {t['dataset']}"]
    if t.get("contract"):
        c = t["contract"]
        out.append(f"- input `{c['input_name']}`, {c['datatype']}, {c['layout']}, range [0, {c['value_range']:g}]")
    if t.get("repository") is not None:
        out.append(f"- the server's models (repository index): {', '.join(t['repository']) or 'none'}")
    out += [f"- {n}" for n in t.get("notes", [])]
    return [*out, ""]


def headline(doc: dict) -> list[str]:
    out = ["## Robust accuracy (every attack, per image)", "",
           "| threat | ε | variant | clean | robust | worst attack |", "|---|---|---|---|---|---|"]  # fmt: skip
    for w in doc["worst"]:
        c = doc["clean"].get(w["variant"])
        out.append(f"| {NAMES[w['norm']]} | {w['eps']:g} | {w['variant']} | {ci_text(c) if c else '–'} | "
                   f"{ci_text(w)} | {w['worst_attack']} ({w['worst_attack_accuracy']:.3f}) |")  # fmt: skip
    return out


def gain_lines(doc: dict) -> list[str]:
    """Per pipeline, threat and ε: bare against guarded."""
    if not doc["gain"]:
        return []
    out = ["", "## The guard's gain", "", "Robust accuracy on the images both attacked (n).", "",
           "| pipeline | threat | ε | n | bare | guarded | gain | beyond sampling error |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for g in doc["gain"]:
        out.append(f"| {g['pipeline']} | {NAMES[g['norm']]} | {g['eps']:g} | {g['n']} | {g['bare']:.3f} | "
                   f"{g['guarded']:.3f} | "
                   f"{g['gain']:+.3f} | {'yes' if g['separated'] else 'no (intervals overlap)'} |")  # fmt: skip
    return out


def cost_lines(doc: dict) -> list[str]:
    """Latency and throughput, guarded beside bare."""
    if not doc["cost"]:
        return []
    out = [
        "",
        "## The guard's cost",
        "",
        "Latency: single-image requests one after another (median); throughput: the clean pass in batches.",
        "",
        "| pipeline | latency ms (bare) | × | images/s (bare) | clean accuracy (bare) |",
        "|---|---|---|---|---|",
    ]
    for c in doc["cost"]:
        out.append(f"| {c['pipeline']} | {c['latency_ms']:.1f} ({c['bare_latency_ms']:.1f}) | {c['latency_x']:g} | "
                   f"{c['images_per_s']} ({c['bare_images_per_s']}) | {c['clean_accuracy']:.3f} "
                   f"({c['bare_clean_accuracy']:.3f}) |")  # fmt: skip
    return out


def run_lines(doc: dict) -> list[str]:
    """One row per attack run; the substitutes' cost."""
    out = [
        "",
        "## Every run",
        "",
        "| variant | threat | ε | attack | defended | queries per image: median (cap) | "
        "median query of the first success (images broken) | ended |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        s = r["summary"]
        cap = f"{s['median_queries']:.0f} ({r['queries_cap']:,})" if r["queries_cap"] else "substitute's labels"
        first = "–" if s["median_first_success"] is None else f"{s['median_first_success']:.0f}"
        out.append(f"| {r['variant']} | {NAMES[r['norm']]} | {r['eps']:g} | {r['label']} | {ci_text(s)} | {cap} | "
                   f"{first} ({s['broken_with_success_query']}) | {r['ended']} |")  # fmt: skip
    for key, sub in doc["substitutes"].items():
        out.append(f"\nSubstitute ({key}): {sub['oracle_queries']:,} labels over {sub['rounds']} rounds, agreeing "
                   f"with the target on {sub['agreement']:.3f} of its training points.")  # fmt: skip
    return out


def queries_lines(doc: dict) -> list[str]:
    """Quartiles of the query of the first success, per run that broke an image."""
    rows = [r for r in doc["runs"] if r["summary"]["first_success"]]
    if not rows:
        return []
    out = [
        "",
        "## Queries to first success",
        "",
        "Among the images each query attack broke (quartiles).",
        "",
        "| variant | threat | ε | attack | broken | 25% | 50% | 75% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        q = np.percentile(r["summary"]["first_success"], [25, 50, 75])
        k = len(r["summary"]["first_success"])
        out.append(f"| {r['variant']} | {NAMES[r['norm']]} | {r['eps']:g} | {r['label']} | {k}/{r['n']} | "
                   + " | ".join(f"{v:.0f}" for v in q) + " |")  # fmt: skip
    return out


def not_run_lines(doc: dict) -> list[str]:
    out = ["", "## Not run, and why", ""]
    return out + ([f"- {x['what']}: {x['why']}" for x in doc["not_run"]] or ["- everything planned ran"])


def budget_lines(doc: dict) -> list[str]:
    """The budget spent, and each variant's caps."""
    q, plan = doc.get("queries") or {}, doc.get("plan") or {}
    if not q:
        return []
    scale = plan.get("scale", 1.0)
    note = "the plan fitted" if scale >= 1 else f"every cap was scaled by {scale:.3f} to fit"
    return ["", "## Queries", "", f"The attacks and substitutes sent {q['attacks_and_substitutes']:,} rows of a "
            f"budget of {q['budget']:,} ({note}); clean passes, judging and timing are counted apart: "
            + "; ".join(f"{v}: " + ", ".join(f"{p} {n:,}" for p, n in d.items()) for v, d in q["rows"].items())
            + ".", "", "| variant | images | Square ≤ queries | HopSkipJump images, ≤ queries | substitute rounds |",
            "|---|---|---|---|---|", *(budget_row(k, b, plan.get("attacks", [])) for k, b in plan.get("budgets",
                                                                                              {}).items())]  # fmt: skip


def budget_row(key: str, b: dict, attacks: list[str]) -> str:
    """One variant's caps; "not run" for the attacks the plan left out."""
    sq = f"{b['square']:,}" if "square" in attacks else "not run"
    hsj = f"{b['hsj_n']}, {b['hsj']:,}" if "hsj" in attacks else "not run"
    return f"| {key} | {b['n']} | {sq} | {hsj} | {b['rounds'] if 'transfer' in attacks else 'not run'} |"


# -- plots ---------------------------------------------------------------------------------------------------------
def _frame(title: str, xlabel: str, ylabel: str, xmax: float, ymax: float = 1.0) -> list[str]:
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="11">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>',
           f'<text x="{W / 2}" y="{H - 6}" text-anchor="middle">{escape(xlabel)}</text>',
           f'<text x="14" y="{H / 2}" text-anchor="middle" transform="rotate(-90 14 {H / 2})">{escape(ylabel)}</text>',
           f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 20}" y2="{H - PAD}" stroke="black"/>',
           f'<line x1="{PAD}" y1="30" x2="{PAD}" y2="{H - PAD}" stroke="black"/>']  # fmt: skip
    for k in range(6):
        y, v = _y(k / 5 * ymax, ymax), k / 5 * ymax
        out.append(f'<text x="{PAD - 4}" y="{y + 4:.1f}" text-anchor="end">{v:.1f}</text>')
        out.append(f'<line x1="{PAD}" y1="{y:.1f}" x2="{W - 20}" y2="{y:.1f}" stroke="#ddd"/>')
    for k in range(6):
        x = _x(k / 5 * xmax, xmax)
        v = k / 5 * xmax
        out.append(f'<text x="{x:.1f}" y="{H - PAD + 14}" text-anchor="middle">{v:,.0f}</text>' if xmax >= 50 else
                   f'<text x="{x:.1f}" y="{H - PAD + 14}" text-anchor="middle">{v:.3g}</text>')  # fmt: skip
    return out


def nice(v: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k at or above `v` (an axis' end)."""
    k = 10 ** math.floor(math.log10(v))
    return next(m * k for m in (1, 2, 2.5, 5, 10) if m * k >= v)


def _x(v: float, xmax: float) -> float:
    return PAD + (W - 20 - PAD) * v / (xmax or 1)


def _y(v: float, ymax: float = 1.0) -> float:
    return (H - PAD) - (H - PAD - 30) * v / ymax


def robust_plot(doc: dict, norm: str) -> str:
    """Robust accuracy against ε (0: clean accuracy), per variant, with Wilson 95% intervals."""
    ws = [w for w in doc["worst"] if w["norm"] == norm]
    xmax = nice(max(w["eps"] for w in ws) * 1.1)
    out = _frame(f"robust accuracy, {NAMES[norm]}", f"ε ({NAMES[norm]})", "accuracy (95% CI)", xmax)
    for k, v in enumerate(doc["variants"]):
        c, color = doc["clean"].get(v), COLORS[k % len(COLORS)]
        pts = ([(0.0, c)] if c else []) + [(w["eps"], w) for w in ws if w["variant"] == v]
        path = " ".join(f"{_x(e, xmax):.1f},{_y(s['accuracy']):.1f}" for e, s in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for e, s in pts:
            x = _x(e, xmax) + 3 * k
            out.append(f'<line x1="{x:.1f}" y1="{_y(s["ci"][0]):.1f}" x2="{x:.1f}" y2="{_y(s["ci"][1]):.1f}" '
                       f'stroke="{color}"/><circle cx="{x:.1f}" cy="{_y(s["accuracy"]):.1f}" r="3" fill="{color}">'
                       f'<title>{escape(v)}: {ci_text(s)}</title></circle>')  # fmt: skip
        out.append(f'<text x="{W - 24}" y="{40 + 14 * k}" text-anchor="end" fill="{color}">{escape(v)}</text>')
    return "\n".join([*out, "</svg>"]) + "\n"


def queries_plot(doc: dict) -> str:
    """The fraction of images broken by each query count (per run with a first success): its distribution."""
    runs = [r for r in doc["runs"] if r["queries_cap"]]
    xmax = nice(max(r["queries_cap"] for r in runs))
    out = _frame("queries to first success", "queries per image", "fraction of images broken", xmax)
    for k, r in enumerate(runs):
        q, color = sorted(r["summary"]["first_success"]), COLORS[k % len(COLORS)]
        pts, y = [f"{_x(0, xmax):.1f},{_y(0):.1f}"], 0.0
        for i, v in enumerate(q):
            pts.append(f"{_x(v, xmax):.1f},{_y(y):.1f}")
            y = (i + 1) / r["n"]
            pts.append(f"{_x(v, xmax):.1f},{_y(y):.1f}")
        pts.append(f"{_x(xmax, xmax):.1f},{_y(y):.1f}")
        dash = "" if r["variant"] == "bare" else ' stroke-dasharray="5 3"'
        label = f"{r['variant']}, {r['label']} {NAMES[r['norm']]} {r['eps']:g}"
        out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" stroke-width="2"{dash}>'
                   f"<title>{escape(label)}</title></polyline>")  # fmt: skip
        out.append(f'<text x="{W - 24}" y="{40 + 14 * k}" text-anchor="end" fill="{color}">{escape(label)}</text>')
    return "\n".join([*out, "</svg>"]) + "\n"
