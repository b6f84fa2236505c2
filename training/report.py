"""Print the shipped models and their recorded figures as markdown, straight from models/manifest.json.

python -m training.report            # the README's "Shipped models" tables are this command's output
"""

from __future__ import annotations

import json

from training.common import MANIFEST


def _ci(v: object) -> str:
    return f" [{v[0]:.3f}, {v[1]:.3f}]" if isinstance(v, list) else ""


def main() -> None:
    arts = json.loads(MANIFEST.read_text())["artifacts"]
    print("| dataset | classifier | clean test accuracy (10,000) | epochs | ONNX vs torch max diff |")
    print("|---|---|---|---|---|")
    for key, e in arts.items():
        if e["kind"] == "classifier":
            m, t = e["metrics"], e.get("training", {})
            print(f"| {e['dataset']} | {key.split('/')[1]} | {m.get('clean_test_accuracy', '–')} | {t.get('epochs')} "
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


if __name__ == "__main__":
    main()
