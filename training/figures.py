"""The README's pictures, from the shipped models.

    python -m training.figures

docs/img/purify_grid.png: rows = the first 12 MNIST slice images, their purification G(z*) (L=200, R=10), their FGSM
ε=0.3 versions (computed on classifier A), and the purification of those. docs/img/samples_<dataset>.png: 100
samples G(z), z ~ N(0, I), of each shipped generator. docs/img/reconstruct_<dataset>.png, for each colour dataset:
its first 12 slice images, their encoder warm-start projections at L=25 (the service's invert-classify) and at
L=200, R=1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from service.attacks import fgsm
from service.purify import ProjectionConfig, project
from service.registry import Registry
from training import data
from training.common import MODELS_DIR, ROOT, save_grid, setup


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    setup(0, args.threads)
    reg = Registry(MODELS_DIR)
    out = ROOT / "docs" / "img"
    for ds in reg.datasets():
        G = reg.generator(ds)
        z_std = float(reg.get(f"{ds}/generator").raw.get("latent_std", 1.0))
        with torch.no_grad():
            save_grid(G(torch.randn(100, G.latent_dim, generator=torch.Generator().manual_seed(0)) * z_std),
                      out / f"samples_{ds}.png")  # fmt: skip
        if reg.spec(ds).channels == 3 and reg.encoder(ds) is not None:
            reconstructions(reg, ds, args.n, out / f"reconstruct_{ds}.png")
    G, clf = reg.generator("mnist"), reg.classifier("mnist")
    xs, ys = data.load_slice("mnist")
    x = torch.from_numpy(data.to_float(xs[: args.n]))
    adv = fgsm(clf, x, torch.from_numpy(ys[: args.n].astype("int64")), eps=0.3)
    cfg = ProjectionConfig()
    rows = [x, project(x, G, cfg).images, adv, project(adv, G, cfg).images]
    save_grid(torch.cat(rows), out / "purify_grid.png", nrow=args.n)
    print(f"wrote {out}/purify_grid.png, samples_*.png and reconstruct_*.png")


def reconstructions(reg: Registry, ds: str, n: int, path: Path) -> None:
    """Rows: slice images, their warm-start projections at L=25 and L=200 (R=1)."""
    xs, _ = data.load_slice(ds)
    x = torch.from_numpy(data.to_float(xs[:n]))
    G, E = reg.generator(ds), reg.encoder(ds)
    rows = [x] + [project(x, G, ProjectionConfig(steps=L, restarts=1, init="encoder"), encoder=E, seed=0).images
                  for L in (25, 200)]  # fmt: skip
    save_grid(torch.cat(rows), path, nrow=n)


if __name__ == "__main__":
    main()
