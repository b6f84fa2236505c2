"""Print the project's requirements from pyproject.toml, one a line, for `pip install -r`: the Docker images install
them in a layer of their own before the source is copied, so a source edit reuses that layer.

    python scripts/requirements.py [--gpu] [EXTRA ...]     # --gpu: onnxruntime-gpu in place of onnxruntime

Python ≥ 3.11 (tomllib), as in both images.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
ONNXRUNTIME = re.compile(r"onnxruntime(?![-\w])")  # the CPU package, not onnxruntime-gpu


def requirements(pyproject: Path, extras: list[str], gpu: bool) -> list[str]:
    """The dependencies plus those of `extras`; with `gpu`, the gpu extra's onnxruntime-gpu instead of onnxruntime
    (never both installed: they share the module name)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    reqs = list(project["dependencies"]) + [r for e in extras for r in optional[e]]
    if gpu:
        reqs = [r for r in reqs if not ONNXRUNTIME.match(r)] + optional["gpu"]
    return list(dict.fromkeys(reqs))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="onnxruntime-gpu in place of onnxruntime")
    p.add_argument("--pyproject", type=Path, default=PYPROJECT)
    p.add_argument("extras", nargs="*", help="optional-dependency groups to add (e.g. ray)")
    a = p.parse_args(argv)
    print("\n".join(requirements(a.pyproject, a.extras, a.gpu)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
