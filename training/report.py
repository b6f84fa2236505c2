"""Build every results page, the README's tables and models/measured.json from the results tree alone.

    python -m training.report      # docs/results.md, docs/robustness.md, the README's tables, models/measured.json

Each page shows, per cell, the row of the newest run that measured it (`training.results`); running it twice writes
the same bytes. models/measured.json is what /v1/models shows as measured figures: per artifact its newest measured
figures on its current weights (training-time figures, training.evaluate's headline, training.robustness's worst
cases), and per dataset the pipeline measured most robust. The evaluation's table here (`robustness`) shows the
papers' protocol and fixed-step attacks, an upper bound on robustness; the figures to trust are
training.robustness's (docs/robustness.md).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from service.registry import Registry
from training import eval_advgan, eval_store, evaluate, results
from training import robustness as rob
from training.common import MODELS_DIR, ROOT, generator_iterations, results_dir, tidy_manifest
from training.data import DATASETS
from training.robustness_protocol import ROBUST_METHODS

DOCS = ROOT / "docs"
README = ROOT / "README.md"


def _ci(v: object) -> str:
    return f" [{v[0]:.3f}, {v[1]:.3f}]" if isinstance(v, list) else ""


def _how(t: dict) -> str:
    """How a classifier was trained, in a few words, from its manifest `training`."""
    if "iters" in t:
        return f"{t['iters']} iterations from {t['init']}, Enhanced INC"
    eps, method = (t.get("threat") or {}).get("eps"), t.get("method")
    if method == "fgsm":
        return f"{t.get('epochs')} epochs, FGSM ε={eps:g}"
    if method == "ensemble":
        static = ", ".join(s.split("_")[-1] for s in t.get("static", []))
        return f"{t.get('epochs')} epochs, ensemble FGSM ε={eps:g} (static {static})"
    if method in ("trades", "pgd"):
        beta = f" β={t['beta']:g}" if method == "trades" else ""
        init = f" from {t['init'].split('/')[-1]}" if t.get("init") else ""
        return f"{t.get('epochs')} epochs{init}, {method.upper()} ε={eps:g}{beta}, {t['steps']} steps"
    if method in ("max", "msd"):
        init = f" from {t['init'].split('/')[-1]}" if t.get("init") else ""
        how = "worst of L∞ ε={:g} and L2 ε={:g} PGD" if method == "max" else "MSD over L∞ ε={:g} and L2 ε={:g}"
        return f"{t.get('epochs')} epochs{init}, {how.format(eps, t['threat']['eps_l2'])}, {t['steps']} steps"
    if method in ("reconstructions", "images+reconstructions"):
        rc, both = t["reconstructions"], "the training images and " if method != "reconstructions" else ""
        return (f"{t.get('epochs')} epochs on {both}G(z*) of {rc['images']:,} training images (warm start "
                f"L={rc['steps']}, R={rc['restarts']}), Defense-GAN-Rec")  # fmt: skip
    if method == "enhanced-inc":
        return (f"{t.get('epochs')} epochs from {t.get('init')}: PGD ε={eps:g}, {t['steps']} steps + overpowered "
                f"pairs every {t.get('op_every')} batches, Enhanced INC")  # fmt: skip
    return f"{t.get('epochs')} epochs"


BASELINES = ("classifier_A", "classifier_A_adv0.3", "classifier_A_enhanced")


def artifact_rows(root: Path, manifest: dict) -> dict[str, dict]:
    """Every job's per-artifact rows (`{"artifact", "sha256", "path", "value"}`): per artifact and path the newest,
    where it was measured on the artifact's current weights."""
    out: dict[str, dict] = {}
    for job in sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        for ds in sorted(p.name for p in (root / job).iterdir() if p.is_dir()):
            for row in results.newest(job, ds, ("artifact", "path"), root):
                entry = manifest["artifacts"].get(row.get("artifact"))
                if entry is None or "path" not in row or row.get("sha256") not in _shas(entry):
                    continue
                node = out.setdefault(row["artifact"], {})
                for k in row["path"][:-1]:
                    node = node.setdefault(k, {})
                node[row["path"][-1]] = row["value"]
    return out


def _shas(entry: dict) -> set[str | None]:
    return {None} | {f["sha256"] for f in entry["files"].values()}


def evaluation_measured(reg: Registry, root: Path, quick: bool = False) -> dict[str, dict]:
    """training.evaluate's headline per classifier (and the detector's ROC AUC on the generator's entry), from the
    newest cells of each dataset."""
    out: dict[str, dict] = {}
    for ds in _datasets(root, "evaluate-quick" if quick else "evaluate"):
        found = evaluate.from_tree(reg, ds, root, quick)
        if found is None:
            continue
        ev, doc = found
        ev.columns = set(evaluate.COLUMNS)
        for key, metrics in eval_store.headline(ev, doc["info"]).items():
            out.setdefault(key, {}).update(metrics)
        if ev.G is not None and ev.results["detector"]:
            out.setdefault(f"{ds}/generator", {})["eval_detector_auc"] = ev.results["detector"]
    return out


def robustness_docs(reg: Registry, root: Path) -> list[dict]:
    """training.robustness's page doc per dataset, from the newest row per pipeline."""
    docs = [rob.page_from_tree(reg, ds, root) for ds in _datasets(root, rob.JOB)]
    return [d for d in docs if d is not None]


def _dataset_order(ds: str) -> tuple[int, str]:
    return (DATASETS.index(ds) if ds in DATASETS else len(DATASETS), ds)


def _datasets(root: Path, job: str) -> list[str]:
    base = root / job
    return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.exists() else []


def measured(models_dir: Path, root: Path, quick: bool = False) -> dict:
    """models/measured.json's content."""
    manifest = json.loads((Path(models_dir) / "manifest.json").read_text())
    reg = Registry(models_dir, verify=False)
    arts = artifact_rows(root, manifest)
    for key, metrics in evaluation_measured(reg, root, quick).items():
        arts.setdefault(key, {}).update(metrics)
    for ds in _datasets(root, eval_advgan.JOB):
        page = eval_advgan.page_from_tree(ds, root)
        for key, metrics in (eval_advgan.measured(page, ds) if page else {}).items():
            arts.setdefault(key, {}).update(metrics)
    defaults, union = {}, {}
    for doc in robustness_docs(reg, root):
        figures, default, best_union = rob.measured(doc)
        for key, metrics in figures.items():
            arts.setdefault(key, {}).update(metrics)
        if default is not None:
            defaults[doc["dataset"]] = default
        if best_union is not None:
            union[doc["dataset"]] = best_union
    return {"artifacts": {k: v for k, v in sorted(arts.items()) if k in manifest["artifacts"]},
            "defaults": defaults, "union_defaults": union}  # fmt: skip


def write_measured(models_dir: Path = MODELS_DIR, root: Path | None = None, quick: bool = False) -> Path:
    path = Path(models_dir) / "measured.json"
    doc = measured(models_dir, root or results_dir(models_dir), quick)
    path.write_text(json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return path


def write_results_page(reg: Registry, root: Path, out: Path = DOCS / "results.md") -> None:
    """docs/results.md: each dataset's block from the newest cells (training.evaluate's renderer)."""
    for ds in sorted(_datasets(root, "evaluate"), key=_dataset_order):
        evaluate.redraw(reg, ds, root, out)


def write_robustness_page(reg: Registry, root: Path, out: Path = DOCS / "robustness.md") -> None:
    docs = robustness_docs(reg, root)
    if docs:
        rob.render(docs, out)


# -- the README's tables --------------------------------------------------------------------------------------------
def classifier_table(arts: dict) -> list[str]:
    lines = ["| dataset | classifier | clean test accuracy (10,000) | training | ONNX vs torch max diff |",
             "|---|---|---|---|---|"]  # fmt: skip
    for key, e in arts.items():
        if e["kind"] == "classifier":
            m, t = e["metrics"], e.get("training", {})
            lines.append(f"| {e['dataset']} | {key.split('/')[1]} | {m.get('clean_test_accuracy', '–')} | {_how(t)} "
                         f"| {m.get('onnx_vs_torch_max_abs_diff', 0):.1e} |")  # fmt: skip
    return lines


def generator_table(arts: dict) -> list[str]:
    lines = ["| dataset | generator iterations | projection | n | classifier: on x / on G(z*), clean | FGSM (on the "
             "classifier) then projected | MSE clean | detector AUC | detector FPR on slice (target) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in arts.values():
        m = e.get("metrics", {})
        for prefix, label in (("rec", "random init"), ("warm", "encoder warm start")):
            if e["kind"] != "generator" or f"{prefix}_n" not in m:
                continue
            fpr = e.get("detector", {}).get("random" if prefix == "rec" else "encoder", {}).get("fpr")
            lines.append(
                f"| {e['dataset']} | {generator_iterations(e)} | {label}, L={m[f'{prefix}_steps']}, "
                f"R={m[f'{prefix}_restarts']} | {m[f'{prefix}_n']} "
                f"| {m.get(f'{prefix}_classifier', 'classifier_A').removeprefix('classifier_')}: "
                f"{m[f'{prefix}_acc_clean_no_defense']:.3f} / "
                f"{m[f'{prefix}_acc_clean_defended']:.3f}{_ci(m.get(f'{prefix}_acc_clean_defended_ci95'))} "
                f"| ε={m.get(f'{prefix}_eps', 0.3):.4g}: "
                f"{m[f'{prefix}_acc_fgsm_defended']:.3f}{_ci(m.get(f'{prefix}_acc_fgsm_defended_ci95'))} "
                f"| {m[f'{prefix}_mse_clean']:.4f} | {m[f'{prefix}_detector_auc_fgsm']:.3f} "
                f"| {m.get(f'{prefix}_detector_fpr_on_slice', float('nan')):.3f} ({fpr}) |"
            )  # fmt: skip
    return lines


def robustness_table(docs: list[dict]) -> list[str]:
    """The README's robustness rows: the baselines (A, FGSM-trained A, the first Enhanced A), every adversarially
    trained classifier, every defended pipeline."""
    lines = [
        "| dataset | classifier | defense | training | clean | worst case per threat (n) |",
        "|---|---|---|---|---|---|",
    ]
    for doc in sorted(docs, key=lambda d: d["dataset"]):
        for r in doc["results"]:
            if not (r["classifier"] in BASELINES or r["method"] in ROBUST_METHODS or r["defense"] != "none"):
                continue
            c = r["clean"]
            cells = "; ".join(f"{t}: {v['accuracy']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] (n={v['n']})"
                              for t, v in r["threats"].items())  # fmt: skip
            lines.append(f"| {doc['dataset']} | {r['classifier']} | {r['defense']} | {r['method']} "
                         f"| {c['accuracy']:.4f} (n={c['n']}) | {cells} |")  # fmt: skip
    return lines


def evaluation_table(arts: dict) -> list[str]:
    """Per classifier and defense the evaluation attacked adaptively: clean, oblivious FGSM, adaptive, worst L∞ and
    detect-or-correct (the other rows, oblivious only, are in docs/results.md)."""
    rows = []
    for key, e in arts.items():
        ev = e.get("metrics", {}).get("evaluation")
        if e["kind"] != "classifier" or not ev or ev.get("quick"):
            continue
        for defense, cells in ev.items():
            if not isinstance(cells, dict) or "eot" not in cells:  # worst cases only where adaptive attacks ran
                continue
            rob = e["metrics"].get("eval_fixed_step_min", {}).get(defense, {})

            def acc(attack: str, cells: dict = cells) -> str:
                c = cells.get(attack)
                return f"{c['acc']:.2f} ({c['n']})" if c else "–"

            doc = rob.get("correct_or_flagged")
            rows.append(f"| {e['dataset']} | {key.split('/')[1]} | {defense} | {acc('clean')} | {acc('fgsm')} "
                        f"| {acc('eot')} | {acc('latent')} | {rob.get('accuracy', float('nan')):.2f} "
                        f"({rob.get('worst_attack', '–')}) | {'–' if doc is None else f'{doc:.2f}'} |")  # fmt: skip
    if not rows:
        return []
    return [
        "| dataset | classifier | defense | clean (n) | FGSM ε=0.3, oblivious | BPDA+EOT (PGD-40 without "
        "projection), adaptive | latent, adaptive | lowest of these (attack): an upper bound, see "
        "docs/robustness.md | lowest correct-or-flagged |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def with_measured(models_dir: Path) -> dict:
    """The manifest's entries, each with its measured figures (Registry's `metrics`)."""
    reg = Registry(models_dir, verify=False)
    return {k: {**a.raw, "metrics": a.metrics} for k, a in reg.artifacts.items()}


def write_readme(tables: dict[str, list[str]], readme: Path = README) -> None:
    """Replace each `<!-- report:NAME -->` … `<!-- /report:NAME -->` block of the README with its table."""
    text = readme.read_text()
    for name, lines in tables.items():
        start, end = f"<!-- report:{name} -->", f"<!-- /report:{name} -->"
        block = "\n".join([start, *lines, end])
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _, b=block: b, text, flags=re.S)
    readme.write_text(text)


def build(models_dir: Path = MODELS_DIR, root: Path | None = None, docs: Path = DOCS, readme: Path = README) -> None:
    """Every page, the README's tables and models/measured.json, from the results tree alone (first moving into the
    tree whatever measured figures a job of the older code left in the manifest: `tidy_manifest`)."""
    root = root or results_dir(models_dir)
    tidy_manifest(models_dir, root)
    write_measured(models_dir, root)
    reg = Registry(models_dir, verify=False)
    write_results_page(reg, root, docs / "results.md")
    rob_docs = robustness_docs(reg, root)
    if rob_docs:
        rob.render(rob_docs, docs / "robustness.md")
    advgan = eval_advgan.page_from_tree("mnist", root)
    if advgan:
        (docs / "advgan.md").write_text(eval_advgan.render(advgan) + "\n")
    arts = with_measured(models_dir)
    if readme.exists():
        write_readme({"classifiers": classifier_table(arts), "generators": generator_table(arts),
                      "robustness": robustness_table(rob_docs)}, readme)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    p.add_argument("--results-dir", type=Path, default=None, help="the results tree (default results/)")
    p.add_argument("--docs", type=Path, default=DOCS)
    p.add_argument("--readme", type=Path, default=README)
    args = p.parse_args(argv)
    build(args.models_dir, args.results_dir, args.docs, args.readme)
    print(f"built {args.docs}/results.md, {args.docs}/robustness.md, {args.readme}'s tables and "
          f"{args.models_dir}/measured.json from {args.results_dir or results_dir(args.models_dir)}")  # fmt: skip


if __name__ == "__main__":
    main()
