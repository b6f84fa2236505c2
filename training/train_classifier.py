"""Train a Defense-GAN classifier (models A–E, or TRADES' S) and export it as safetensors and ONNX (one copy of the
weights).

    python -m training.train_classifier --dataset mnist --model A
    python -m training.train_classifier --dataset mnist --model A --adv-eps 0.3     # FGSM adversarial training
    python -m training.train_classifier --dataset mnist --model B --adv-eps 0.3 --adv-static D,E   # ensemble
    python -m training.train_classifier --dataset mnist --model A --on-reconstructions 20000   # Defense-GAN-Rec
    python -m training.train_classifier --dataset NAME --model A    # any prepared data set (gray or colour)

Adam lr 1e-3, 10 epochs, batch 128, inputs in [0, 1] (the paper's settings). With --adv-eps, every batch is half
clean and half FGSM(ε) on the current weights (Goodfellow et al. 2015's mixed objective, the paper's
"adversarial training" baseline). With --adv-static as well, ensemble adversarial training (Tramèr et al. 2018):
the adversarial half is crafted in turn on the current weights and on each named static, pre-trained classifier
(shipped, frozen, hashes verified), so batch i uses source i mod (1 + statics).
With --on-reconstructions N, the classifier is trained on G(z*) of N training images instead of the images
(Defense-GAN's "Rec" classifiers; with --with-images, on both: one classifier that reads images and their
purifications alike, shipped as classifier_<X>_mix): projected by the shipped generator with the encoder warm start
and the L, R recorded on the generator's entry (Defense-GAN's L=200, R=10 costs ~2 s per image here: 60k would take
35 h), cached in chunks under runs/<dataset>/train_recs/ (resumable).
The network is built for the data set's images and classes (`training.data.spec`). Measures clean accuracy on the
full test set, checks ONNX Runtime against torch on the 1,000-image slice, and records both in models/manifest.json
(with the data set's image format, `datasets`, and the classifier's `input_shape`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from service.attacks import fgsm
from service.nets import build_classifier
from service.purify import project
from service.registry import Registry
from training import data
from training.common import (
    MODELS_DIR,
    add_device_option,
    batches,
    command_line,
    eval_slice,
    record_dataset,
    save_weights,
    setup,
    update_manifest,
    warm_config,
)
from training.onnx_export import export_onnx, onnx_max_diff


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def train(args: argparse.Namespace, arrays: dict[str, np.ndarray] | None = None) -> nn.Module:
    """Train and return the classifier (CPU, eval mode); `arrays` overrides the cached dataset (tests)."""
    device = setup(args.seed, args.threads, args.device)
    arrays = arrays if arrays is not None else data.load(args.dataset)
    x_tr = torch.from_numpy(data.to_float(arrays["x_train"]))
    y_tr = torch.from_numpy(arrays["y_train"].astype(np.int64))
    if args.on_reconstructions:
        x_rec, y_rec = reconstructions(args, x_tr, y_tr)
        x_tr, y_tr = (torch.cat([x_tr, x_rec]), torch.cat([y_tr, y_rec])) if args.with_images else (x_rec, y_rec)
    x_tr, y_tr = x_tr.to(device), y_tr.to(device)
    x_te = torch.from_numpy(data.to_float(arrays["x_test"])).to(device)
    y_te = torch.from_numpy(arrays["y_test"].astype(np.int64)).to(device)
    spec = data.spec(args.dataset)
    model = build_classifier(args.model, spec.shape, spec.num_classes).to(device)
    sources = [model, *static_models(args, device)]
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(args.seed)
    t0, batch_no = time.time(), 0
    for epoch in range(1, args.epochs + 1):
        model.train()
        total, steps = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device: no sync
        for idx in batches(len(x_tr), args.batch, rng):
            xb, yb = x_tr[idx], y_tr[idx]
            if args.adv_eps > 0:
                half, source = len(xb) // 2, sources[batch_no % len(sources)]
                model.eval()
                adv = fgsm(source, xb[half:], yb[half:], eps=args.adv_eps)
                model.train()
                xb = torch.cat([xb[:half], adv])
            batch_no += 1
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
            steps += 1
        acc, mean_loss = accuracy(model, x_te, y_te), float(total) / steps
        args.history = [*getattr(args, "history", []), mean_loss]
        print(f"epoch {epoch}/{args.epochs} loss {mean_loss:.4f} test acc {acc:.4f} "
              f"({(time.time() - t0) / 60:.1f} min)", flush=True)  # fmt: skip
    model = model.cpu().eval()
    return model


def reconstructions(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, chunk: int = 2000,
                    batch: int = 100) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """G(z*) of the first --on-reconstructions training images (a fixed shuffle) and their labels; each chunk is
    cached under runs/<dataset>/train_recs/<generator, encoder sha, L, R>/ so a stopped run resumes."""
    reg = Registry(args.models_dir)
    G, E = reg.generator(args.dataset), reg.encoder(args.dataset)
    cfg = warm_config(reg, args.dataset)
    idx = torch.from_numpy(np.random.default_rng(args.seed).permutation(len(x))[: args.on_reconstructions])
    x, y = x[idx], y[idx]
    shas = [reg.get(f"{args.dataset}/{k}").files["weights"]["sha256"][:12] for k in ("generator", "encoder")]
    folder = args.runs_dir / args.dataset / "train_recs" / f"{'-'.join(shas)}-L{cfg.steps}-R{cfg.restarts}-s{args.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    out, t0 = [], time.time()
    for i in range(0, len(x), chunk):
        f = folder / f"{i:06d}-{min(i + chunk, len(x)):06d}.safetensors"
        if not f.exists():
            imgs = [project(x[j : j + batch], G, cfg, encoder=E, seed=args.seed + j).images
                    for j in range(i, min(i + chunk, len(x)), batch)]  # fmt: skip
            save_file({"images": torch.cat(imgs).contiguous()}, str(f))
        out.append(load_file(str(f))["images"])
        print(f"reconstructed {min(i + chunk, len(x))}/{len(x)} training images ({time.time() - t0:.0f}s)", flush=True)
    args.rec_config, args.rec_shas = cfg, shas
    return torch.cat(out), y


def static_models(args: argparse.Namespace, device: torch.device) -> list[nn.Module]:
    """The frozen, shipped classifiers named by --adv-static (ensemble adversarial training's static sources)."""
    reg = Registry(args.models_dir)
    return [reg.classifier(args.dataset, f"classifier_{a.upper()}", device) for a in args.adv_static]


def ship_classifier(model: nn.Module, dataset: str, name: str, entry: dict, metrics: dict | None = None,
                    models_dir: Path = MODELS_DIR) -> dict:  # fmt: skip
    """Write models_dir/<dataset>/<name>.safetensors and its .onnx graph (whose weights are the safetensors'),
    measure clean test accuracy (full test set, when the dataset cache is there) and ONNX-vs-torch agreement
    (slice), and record `entry` in the manifest."""
    spec = data.spec(dataset)
    rel = {role: f"{dataset}/{name}.{ext}" for role, ext in (("weights", "safetensors"), ("onnx", "onnx"))}
    save_weights(model, models_dir / rel["weights"])
    export_onnx(model, models_dir / rel["onnx"], models_dir / rel["weights"], spec.shape)
    xs, _ = eval_slice(dataset)
    metrics = {
        **(metrics or {}),
        "onnx_vs_torch_max_abs_diff": onnx_max_diff(model, models_dir / rel["onnx"], data.to_float(xs)),
    }
    try:
        a = data.load(dataset)
        x_te = torch.from_numpy(data.to_float(a["x_test"]))
        y_te = torch.from_numpy(a["y_test"].astype(np.int64))
        metrics |= {"clean_test_accuracy": round(accuracy(model, x_te, y_te), 4), "test_images": len(x_te)}
    except data.DataError:
        pass
    files = {role: {"path": path} for role, path in rel.items()}
    full = {"kind": "classifier", "dataset": dataset, "command": command_line(), **entry, "files": files,
            "input_shape": list(spec.shape), "metrics": metrics}  # fmt: skip
    record_dataset(spec, models_dir)  # the format the registry builds the network for
    update_manifest(f"{dataset}/{name}", full, models_dir)
    print(f"shipped {dataset}/{name}: {metrics}", flush=True)
    return metrics


def ship(args: argparse.Namespace, model: nn.Module) -> dict:
    method = ("ensemble" if args.adv_static else "fgsm") if args.adv_eps > 0 else "standard"
    if args.on_reconstructions:
        method = "images+reconstructions" if args.with_images else "reconstructions"
    suffix = {"standard": "", "fgsm": f"_adv{args.adv_eps:g}", "ensemble": f"_ens{args.adv_eps:g}",
              "reconstructions": "_rec", "images+reconstructions": "_mix"}[method]  # fmt: skip
    threat = {"norm": "linf", "eps": args.adv_eps} if args.adv_eps > 0 else None
    training = {"method": method, "threat": threat, "epochs": args.epochs, "batch": args.batch, "lr": args.lr,
                "adv_eps": args.adv_eps, "seed": args.seed}  # fmt: skip
    if args.adv_static:
        training["static"] = [f"{args.dataset}/classifier_{a.upper()}" for a in args.adv_static]
    if args.on_reconstructions:
        cfg = args.rec_config
        training["reconstructions"] = {"images": args.on_reconstructions, "init": cfg.init, "steps": cfg.steps,
                                       "restarts": cfg.restarts, "generator": f"{args.dataset}/generator",
                                       "encoder": f"{args.dataset}/encoder", "shas": args.rec_shas}  # fmt: skip
    name = f"classifier_{args.model.upper()}{suffix}"
    return ship_classifier(model, args.dataset, name, {"arch": args.model.upper(), "training": training},
                           models_dir=args.models_dir)  # fmt: skip


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=data.dataset_name, required=True, help="mnist, fmnist or any prepared data set")
    p.add_argument("--model", choices=list("ABCDES") + list("abcdes"), required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--adv-eps", type=float, default=0.0, help="FGSM adversarial training at this ε (0: off)")
    p.add_argument("--adv-static", type=lambda v: [a for a in v.split(",") if a], default=[],
                   help="ensemble adversarial training: comma list of shipped static sources (e.g. D,E)")  # fmt: skip
    p.add_argument("--on-reconstructions", type=int, default=0, metavar="N",
                   help="train on G(z*) of N training images (Defense-GAN-Rec's classifier; 0: off)")  # fmt: skip
    p.add_argument("--with-images", action="store_true",
                   help="with --on-reconstructions: train on the training images and those G(z*) together")  # fmt: skip
    p.add_argument("--runs-dir", type=Path, default=MODELS_DIR.parent / "runs", help="cache of the reconstructions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    add_device_option(p)
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    p.add_argument("--no-ship", action="store_true", help="train and report only")
    a = p.parse_args(argv)
    if a.adv_static and a.adv_eps <= 0:
        p.error("--adv-static needs --adv-eps > 0")
    if a.with_images and not a.on_reconstructions:
        p.error("--with-images needs --on-reconstructions N")
    if a.on_reconstructions and a.adv_eps > 0:
        p.error("--on-reconstructions trains a standard classifier: no --adv-eps")
    return a


if __name__ == "__main__":
    a = parse()
    m = train(a)
    if not a.no_ship:
        ship(a, m)
