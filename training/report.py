"""Print the shipped models and their recorded figures as markdown, straight from models/manifest.json.

python -m training.report            # the README's measured tables are this command's output

The last table reads what `python -m training.evaluate` recorded on each classifier's entry: the papers' protocol
and fixed-step attacks, an upper bound on robustness. The figures to trust are `training.robustness`'s
(docs/robustness.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from training.common import MANIFEST, ROOT


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
    if method == "reconstructions":
        rc = t["reconstructions"]
        return (f"{t.get('epochs')} epochs on G(z*) of {rc['images']:,} training images (warm start L={rc['steps']}, "
                f"R={rc['restarts']}), Defense-GAN-Rec")  # fmt: skip
    if method == "enhanced-inc":
        return (f"{t.get('epochs')} epochs from {t.get('init')}: PGD ε={eps:g}, {t['steps']} steps + overpowered "
                f"pairs every {t.get('op_every')} batches, Enhanced INC")  # fmt: skip
    return f"{t.get('epochs')} epochs"


def main() -> None:
    arts = json.loads(MANIFEST.read_text())["artifacts"]
    print("| dataset | classifier | clean test accuracy (10,000) | training | ONNX vs torch max diff |")
    print("|---|---|---|---|---|")
    for key, e in arts.items():
        if e["kind"] == "classifier":
            m, t = e["metrics"], e.get("training", {})
            how = _how(t)
            print(f"| {e['dataset']} | {key.split('/')[1]} | {m.get('clean_test_accuracy', '–')} | {how} "
                  f"| {m.get('onnx_vs_torch_max_abs_diff', 0):.1e} |")  # fmt: skip
    print()
    print("| dataset | generator iterations | projection | n | classifier A on G(z*), clean | FGSM ε=0.3 (on A) then "
          "projected | MSE clean | detector AUC | detector FPR on slice (target) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for e in arts.values():
        if e["kind"] != "generator":
            continue
        m = e.get("metrics", {})
        for prefix, label in (("rec", "random init"), ("warm", "encoder warm start")):
            if f"{prefix}_n" not in m:
                continue
            fpr = e.get("detector", {}).get("random" if prefix == "rec" else "encoder", {}).get("fpr")
            print(f"| {e['dataset']} | {e['training']['iterations']} | {label}, L={m[f'{prefix}_steps']}, "
                  f"R={m[f'{prefix}_restarts']} | {m[f'{prefix}_n']} "
                  f"| {m[f'{prefix}_acc_clean_defended']:.3f}{_ci(m.get(f'{prefix}_acc_clean_defended_ci95'))} "
                  f"| {m[f'{prefix}_acc_fgsm_defended']:.3f}{_ci(m.get(f'{prefix}_acc_fgsm_defended_ci95'))} "
                  f"| {m[f'{prefix}_mse_clean']:.4f} | {m[f'{prefix}_detector_auc_fgsm']:.3f} "
                  f"| {m.get(f'{prefix}_detector_fpr_on_slice', float('nan')):.3f} ({fpr}) |")  # fmt: skip

    robustness(arts)
    measured_robustness()


def measured_robustness(docs: Path = ROOT / "docs") -> None:
    """The README's robustness rows, from training.robustness's docs/robustness-<dataset>.json: the baselines
    (A, FGSM-trained A, the first Enhanced A), every adversarially trained classifier, every defended pipeline."""
    rows = []
    for path in sorted(docs.glob("robustness-*.json")):
        doc = json.loads(path.read_text())
        for r in doc["results"]:
            if not (r["classifier"] in BASELINES or r["method"] in ROBUST or r["defense"] != "none"):
                continue
            c = r["clean"]
            cells = "; ".join(f"{t}: {v['accuracy']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] (n={v['n']})"
                              for t, v in r["threats"].items())  # fmt: skip
            rows.append(f"| {doc['dataset']} | {r['classifier']} | {r['defense']} | {r['method']} "
                        f"| {c['accuracy']:.4f} (n={c['n']}) | {cells} |")  # fmt: skip
    if rows:
        print()
        print("| dataset | classifier | defense | training | clean | worst case per threat (n) |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))


BASELINES = ("classifier_A", "classifier_A_adv0.3", "classifier_A_enhanced")
ROBUST = ("pgd", "trades", "enhanced-inc")


def robustness(arts: dict) -> None:
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
    if rows:
        print()
        print(
            "| dataset | classifier | defense | clean (n) | FGSM ε=0.3, oblivious | BPDA+EOT (PGD-40 without "
            "projection), adaptive | latent, adaptive | lowest of these (attack): an upper bound, see "
            "docs/robustness.md | lowest correct-or-flagged |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
