"""The README's pictures, from the shipped models.

    python -m training.figures

docs/img/purify_grid.png: rows = the first 12 MNIST slice images, their purification G(z*) (L=200, R=10), their FGSM
ε=0.3 versions (computed on classifier A), and the purification of those. docs/img/samples_<dataset>.png: 100
samples G(z), z ~ N(0, I), of each shipped generator.
"""

from __future__ import annotations

import argparse

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
    G, clf = reg.generator("mnist"), reg.classifier("mnist")
    xs, ys = data.load_slice("mnist")
    x = torch.from_numpy(data.to_float(xs[: args.n]))
    adv = fgsm(clf, x, torch.from_numpy(ys[: args.n].astype("int64")), eps=0.3)
    cfg = ProjectionConfig()
    rows = [x, project(x, G, cfg).images, adv, project(adv, G, cfg).images]
    save_grid(torch.cat(rows), out / "purify_grid.png", nrow=args.n)
    print(f"wrote {out}/purify_grid.png and samples_*.png")


if __name__ == "__main__":
    main()
