"""The results page of `training.evaluate`: each dataset's block in Markdown, and the cells as JSON (`to_json`,
`from_json`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from training.eval_paper import paper_comparison, table
from training.eval_protocol import ATTACK_NAMES, CLASSIFIERS, COLUMNS, EPS, SECTIONS, Cell

if TYPE_CHECKING:
    from training.eval_sections import Evaluation


# -- rendering --------------------------------------------------------------------------------------------------
def cell_text(v: object) -> str:
    if isinstance(v, dict) and "cell" in v:
        return v["cell"].fmt()
    return str(v) if v else "–"


def row_n(row: dict) -> str:
    ns = {v["cell"].n for v in row.values() if isinstance(v, dict) and "cell" in v}
    return "/".join(str(n) for n in sorted(ns)) or "–"


def reuse_lines(info: dict) -> list[str]:
    """Which columns (and sections) came from which earlier run: each cell is the newest run's that measured it."""
    seen, out = {(c, g) for c in info.get("columns", COLUMNS) for g in info.get("sections", SECTIONS)}, []
    for r in info.get("reused", []):
        named = r.get("columns", [c for c in COLUMNS if c != "rectrained"])  # a run naming none predates rectrained
        new = {(c, g) for c in named for g in r.get("sections", SECTIONS)} - seen
        seen |= new
        cols = [c for c in COLUMNS if any(c == nc for nc, _ in new)]
        if cols:
            groups = sorted({g for _, g in new})
            where = "" if set(groups) == set(SECTIONS) else f" ({', '.join(groups)} rows)"
            out.append(f"- columns {', '.join(COLUMNS[c][0] for c in cols)}{where} from the earlier run "
                       f"`{r['command']}` (commit `{r['commit'][:12]}`, {r['date']})")  # fmt: skip
    return out


def render(ev: Evaluation, info: dict) -> str:
    """The dataset's section of the results page (Markdown)."""
    out = header(ev, info)
    for section in (clean_section, whitebox_section, cw_section, blackbox_section, auc_section, detect_section):
        out += section(ev)
    return "\n".join(out + paper_comparison(ev))


def header(ev: Evaluation, info: dict) -> list[str]:
    ds, s = ev.ds, ev.s
    quick = (
        " — QUICK SMOKE RUN (reduced n, L, R and iterations; not comparable with the papers)" if info["quick"] else ""
    )
    out = [f"## {ds}{quick}", ""]
    out += [f"- command: `{info['command']}`", f"- machine: {info['machine']}", f"- duration: {info['duration']}",
            f"- git commit: `{info['commit']}`", f"- date: {info['date']}",
            *reuse_lines(info),
            f"- images: the first n test images (n ≤ 1000: the committed slice models/{ds}/test_slice.npz); "
            "adaptive rows on the "
            f"first {min(s.adaptive_n, s.n)}",
            f"- Defense-GAN-Orig and -Rec: L={s.rec.steps}, R={s.rec.restarts} ({s.rec.optimizer}, lr {s.rec.lr}); "
            "the Rec classifiers are trained on reconstructions of training images (their manifest entries say "
            f"how); encoder warm "
            f"start: L={s.warm.steps}, R={s.warm.restarts}; Enhanced INC projects with "
            f"{'the warm start' if ev.E is not None else 'L, R as Defense-GAN'}",
            f"- projections computed {info.get('projections_run', ev.projections_run)}, reused from the cache "
            f"{info.get('projections_reused', ev.projections_reused)} (this run)",
            f"- not shipped (cells say so): {', '.join(ev.missing()) or 'nothing'}",
            "- every accuracy: value [Wilson 95% interval]; n per row", ""]  # fmt: skip
    if info.get("figure"):
        out += [f"![clean, FGSM and their Defense-GAN reconstructions (L, R as above)]({info['figure']})", ""]
    return out


def no_attack(r: dict, arch: str, n: int | None = None) -> str:
    """The bare classifier's clean accuracy, on the first n images when a row has fewer."""
    v = r["clean"].get(arch, {}).get("none")
    if isinstance(v, dict) and n is not None and n < v["cell"].n:
        if "correct" not in v:  # a reused cell from a run that kept no per-image results
            return f"{cell_text(v)} (n={v['cell'].n})"
        return Cell(int(v["correct"][:n].sum()), n).fmt()
    return cell_text(v)


def measured(row: dict) -> bool:
    return any(isinstance(v, dict) and "cell" in v for v in row.values())


def first_n(row: dict) -> int | None:
    ns = [v["cell"].n for v in row.values() if isinstance(v, dict) and "cell" in v]
    return min(ns) if ns else None


def clean_section(ev: Evaluation) -> list[str]:
    r, cols = ev.results, list(COLUMNS)
    if not r["clean"]:
        return []
    head = ["Classifier", "n"] + [COLUMNS[c][0] for c in cols]
    rows = [[a, row_n(row)] + [cell_text(row.get(c)) for c in cols] for a, row in r["clean"].items()]
    return ["### Clean accuracy (no attack)", "", *table(head, rows), ""]


def whitebox_section(ev: Evaluation) -> list[str]:
    r, s, cols = ev.results, ev.s, list(COLUMNS)
    if not (r["whitebox"] or r["adaptive"]):
        return []
    out = [f"### White-box L∞ ε={EPS}: oblivious attacks (Defense-GAN Table 4) and adaptive attacks", "",
           "Oblivious: the attack is computed on the column's bare classifier, then the column's defense runs. "
           "Adaptive: BPDA+EOT differentiates through the projection (straight-through) averaged over "
           f"{s.eot_samples} random-restart draws ({s.pgd_steps} steps, α={s.pgd_alpha}; one draw where the "
           "projection is deterministic); columns without a projection get PGD with the same budget. Latent: "
           f"the overpowered attack ({s.latent_steps} steps). The attacker's own projection through "
           f"Defense-GAN: L={s.attacker_steps or s.rec.steps}, R={s.attacker_restarts or s.rec.restarts}"
           " (the reported accuracy is always the real defense's); through the warm start: the defense's own.",
           ""]  # fmt: skip
    rows = []
    for arch in CLASSIFIERS:
        for group, attack in (("whitebox", "fgsm"), ("whitebox", "rand-fgsm"), ("adaptive", "eot"),
                              ("adaptive", "latent")):  # fmt: skip
            row = r[group].get(attack, {}).get(arch)
            if row is None or not measured(row):
                continue
            kind = "oblivious" if group == "whitebox" else "**adaptive**"
            rows.append([f"{arch}", f"{ATTACK_NAMES[attack]} ({kind})", row_n(row), no_attack(r, arch, first_n(row))]
                        + [cell_text(row.get(c)) for c in cols])  # fmt: skip
    return out + table(["Classifier", "Attack", "n", "No attack"] + [COLUMNS[c][0] for c in cols], rows) + [""]


def cw_section(ev: Evaluation) -> list[str]:
    r, s, cols = ev.results, ev.s, list(COLUMNS)
    if "cw" not in r["whitebox"]:
        return []
    out = ["### White-box CW-L2 (oblivious; Defense-GAN's cleverhans preset: 1 search step, "
           f"{s.cw.get('steps', 100)} iterations, lr 10, c=100)", ""]  # fmt: skip
    rows = []
    for arch, row in r["whitebox"]["cw"].items():
        if not measured(row):
            continue
        l2 = row.get("none", {}).get("mean_l2") if isinstance(row.get("none"), dict) else None
        rows.append([arch, row_n(row), no_attack(r, arch)] + [cell_text(row.get(c)) for c in cols]
                    + [f"{l2:.2f}" if l2 is not None else "–"])  # fmt: skip
    return out + table(["Classifier", "n", "No attack"] + [COLUMNS[c][0] for c in cols] + ["mean L2 (no def.)"],
                       rows) + [""]  # fmt: skip


def blackbox_section(ev: Evaluation) -> list[str]:
    r, p, cols = ev.results, ev.s.substitute, list(COLUMNS)
    if not r["blackbox"]:
        return []
    out = [f"### Black-box substitute FGSM ε={EPS} (Defense-GAN Table 1)", "",
           f"Substitute trained from {p['holdout']} held-out test images with {p['rounds']} rounds of Jacobian "
           f"augmentation (λ=0.1), {p['epochs']} epochs per round, querying the column's bare classifier for "
           "labels only; FGSM on the substitute, transferred.", ""]  # fmt: skip
    rows = [[pair, row_n(row), no_attack(r, pair[0])] + [cell_text(row.get(c)) for c in cols]
            for pair, row in r["blackbox"].items() if measured(row)]  # fmt: skip
    return out + table(["Classifier/substitute", "n", "No attack"] + [COLUMNS[c][0] for c in cols], rows) + [""]


def auc_section(ev: Evaluation) -> list[str]:
    if not ev.results["detector"]:
        return []
    rows = [[COLUMNS[col][0], label, f"{v['auc']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]",
             f"{v['n_clean']}/{v['n_attacked']}"]
            for col, d in ev.results["detector"].items() for label, v in d.items()]  # fmt: skip
    return ["### MSE detector: ROC AUC per attack (clean vs attacked reconstruction MSE)", "",
            "Value [Hanley–McNeil 95% interval]; n clean / n attacked.", "",
            *table(["Projection", "Attack", "ROC AUC", "n"], rows), ""]  # fmt: skip


def detect_section(ev: Evaluation) -> list[str]:
    r = ev.results
    proj_cols = [c for c in COLUMNS if c in ("rec", "rectrained", "warm", "enhanced", "magnet")]
    rows = []
    for group, attack in (("clean", None), ("whitebox", "fgsm"), ("whitebox", "rand-fgsm"), ("whitebox", "cw"),
                          ("adaptive", "eot"), ("adaptive", "latent")):  # fmt: skip
        for arch in CLASSIFIERS:
            row = r["clean"].get(arch) if attack is None else r[group].get(attack, {}).get(arch)
            docs = [v if isinstance(v := (row or {}).get(c), dict) and "defended" in v else None for c in proj_cols]
            if not any(docs):
                continue
            name = "clean (flagged = false positives)" if attack is None else ATTACK_NAMES[attack]
            cells = [f"{v['flagged'].acc:.2f} / {v['defended'].fmt()}" if v else "–" for v in docs]
            rows.append([arch, name + (" (**adaptive**)" if group == "adaptive" else ""), row_n(row), *cells])
    if not rows:
        return []
    return ["### Detect or correct: the service's detector at its calibrated threshold", "",
            "Per cell: the fraction flagged by the reconstruction-MSE detector (the threshold the service applies at "
            "the column's projection — its start, L and R — calibrated for a 5% false-positive rate on held-out "
            "clean images; MagNet: either of its two detectors) / the fraction **correct or flagged** [Wilson 95%] "
            "— what a caller that rejects flagged inputs gets. The latent attack is the one built to stay on the "
            "manifold, i.e. under the detector.", "",
            *table(["Classifier", "Attack", "n"] + [COLUMNS[c][0] for c in proj_cols], rows), ""]  # fmt: skip


# our column measured against each paper column: the paper's Orig is the projection before the classifier trained
# on original images (our "rec"), its Rec the projection before one trained on reconstructions (our "rectrained")


def with_intro(text: str, quick: bool = False) -> str:
    """The page's text with its current introduction in front of the first dataset block."""
    title = "# The papers' protocol: Defense-GAN Tables 1 and 4" + (" (QUICK SMOKE RUN)" if quick else "")
    intro = (f"{title}\n\nGenerated by `python -m training.evaluate`; do not edit by hand (each dataset's block is "
             "rewritten by its run). See training/evaluate.py for the protocol.\n\n"
             "These are the papers' attacks: oblivious FGSM, RAND+FGSM and CW, black-box substitutes, and fixed-step "
             "adaptive attacks (BPDA+EOT PGD-40, latent). Their lowest figure per pipeline is an upper bound on its "
             "robustness, not a robustness figure: fixed-step PGD overstated every pipeline. The AutoAttack-grade, "
             "per-image worst-case figures are in [robustness.md](robustness.md) "
             "(`python -m training.robustness`).\n")  # fmt: skip
    first = text.find("<!-- results:")
    return intro + ("\n" + text[first:] if first >= 0 else "")


def write_page(path: Path, dataset: str, section: str, quick: bool) -> None:
    """Replace this dataset's block in the results page, keeping the other datasets' blocks."""
    start, end = f"<!-- results:{dataset}:start -->", f"<!-- results:{dataset}:end -->"
    text = with_intro(path.read_text() if path.exists() else "", quick)
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
