"""Small helpers shared by the offline jobs: seeding, threads, batches, checkpoints, grids, the manifest."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from service.device import pick_device
from service.purify import ProjectionConfig
from service.registry import Registry, sha256_file

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"
RUNS_DIR = ROOT / "runs"
MANIFEST = MODELS_DIR / "manifest.json"


def setup(seed: int, threads: int | None = None, device: str = "auto") -> torch.device:
    """Seed everything, set CPU threads, and return the device to train on ("auto": CUDA when present)."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick its fastest kernels once
    return dev


def add_device_option(p: argparse.ArgumentParser) -> None:
    """--device: where a job trains; CUDA by default where one is present (data and model moved there once)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when a GPU is present)")  # fmt: skip


def command_line() -> str:
    """The exact command that is running, as a user would type it."""
    return ("python -m " + __import__("__main__").__spec__.name + " " + shlex.join(sys.argv[1:])).rstrip()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "service", "training"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def batches(n: int, batch: int, rng: np.random.Generator, shuffle: bool = True) -> Iterator[np.ndarray]:
    """Index batches over one epoch (the last partial batch is dropped when shuffling)."""
    idx = rng.permutation(n) if shuffle else np.arange(n)
    stop = n - (n % batch) if shuffle else n
    for i in range(0, stop, batch):
        yield idx[i : i + batch]


def save_grid(images: torch.Tensor | np.ndarray, path: Path | str, nrow: int = 10, pad: int = 2) -> None:
    """Save N×1×H×W images in [0, 1] as one PNG grid."""
    path = Path(path)
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    x = x.reshape(len(x), x.shape[-2], x.shape[-1])
    n, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = np.ones((rows * (h + pad) + pad, nrow * (w + pad) + pad), np.float32)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = x[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.clip(0, 1) * 255).round().astype(np.uint8), mode="L").save(path)


def save_weights(module: torch.nn.Module, path: Path) -> str:
    """Save a module's state dict as safetensors; return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))
    return sha256_file(path)


def update_manifest(key: str, entry: dict, models_dir: Path = MODELS_DIR, keep_measured: bool = False) -> None:
    """Insert or replace `artifacts[key]` in models/manifest.json, hashing each of its files.

    `entry["files"]` maps a role ("weights", "onnx", "data") to {"path": relative to models/}; sha256, the git
    commit and the date are filled in. What was recorded on the entry (metrics, a detector calibration) is kept while
    its files are the same; new files (a retrained model) drop it, since it describes other weights.
    `keep_measured` keeps it although a file changed (a re-export of the same weights).
    """
    with edit_manifest(models_dir) as man:
        _merge_entry(man, key, entry, Path(models_dir), keep_measured)


def _merge_entry(man: dict, key: str, entry: dict, models_dir: Path, keep_measured: bool) -> None:
    old = man["artifacts"].get(key, {})
    files = {role: {"path": f["path"], "sha256": sha256_file(models_dir / f["path"])}
             for role, f in entry["files"].items()}  # fmt: skip
    # measured fields (metrics, detector calibration) of the old files
    kept = old if keep_measured or old.get("files") == files else {}
    merged = {**kept, **entry}
    merged["metrics"] = {**kept.get("metrics", {}), **entry.get("metrics", {})}
    merged["files"] = files
    merged["commit"] = entry.get("commit") or git_commit()
    merged["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    man["artifacts"][key] = dict(sorted(merged.items()))
    man["artifacts"] = dict(sorted(man["artifacts"].items()))


@contextlib.contextmanager
def edit_manifest(models_dir: Path = MODELS_DIR) -> Iterator[dict]:
    """Read models/manifest.json, yield it for changes, write it back atomically, all under an exclusive lock:
    training jobs running side by side each read-modify-write it, and a reader never sees half a file."""
    with edit_json(Path(models_dir) / "manifest.json", {"schema": 1, "artifacts": {}}, indent=2) as man:
        yield man


@contextlib.contextmanager
def edit_json(path: Path, empty: dict | None = None, indent: int = 1) -> Iterator[dict]:
    """Read a JSON file (or `empty`), yield it for changes, write it back atomically, under an exclusive lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.loads(path.read_text()) if path.exists() else dict(empty or {})
        yield doc
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=indent) + "\n")
        tmp.replace(path)


def record_metrics(key: str, metrics: dict, models_dir: Path = MODELS_DIR, **fields: object) -> None:
    """Merge measured metrics (and top-level `fields`) into an existing manifest entry; files stay as they are."""
    with edit_manifest(models_dir) as man:
        entry = man["artifacts"][key]
        entry.setdefault("metrics", {}).update(metrics)
        for name, value in fields.items():
            entry[name] = {**entry.get(name, {}), **value} if isinstance(value, dict) else value


class Progress:
    """A plain progress line every `every` steps: step/total, rate, ETA and the given scalars."""

    def __init__(self, total: int, every: int = 50, start: int = 0) -> None:
        self.total, self.every, self.start, self.t0 = total, every, start, time.time()

    def due(self, step: int) -> bool:
        """Whether `step` prints a line (read a device scalar, a host sync, only then)."""
        return not step % self.every or step == self.total

    def __call__(self, step: int, **scalars: float) -> None:
        if not self.due(step):
            return
        done = max(step - self.start, 1)
        el = time.time() - self.t0
        eta = el / done * (self.total - step)
        vals = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
        print(f"[{step}/{self.total}] {el / done:.3f}s/it eta {eta / 60:.1f}min {vals}", flush=True)


def env_threads() -> int | None:
    v = os.environ.get("MG_THREADS")
    return int(v) if v else None


def warm_config(reg: Registry, dataset: str) -> ProjectionConfig:
    """The warm start's L, R as recorded on the generator's entry (eval_generator --init encoder), else 25, 1."""
    raw = reg.get(f"{dataset}/generator").raw if reg.has(f"{dataset}/generator") else {}
    m, ws = raw.get("metrics", {}), raw.get("warm_start", {})
    steps = int(ws.get("steps", m.get("warm_steps", 25)))
    restarts = int(ws.get("restarts", m.get("warm_restarts", 1)))
    return ProjectionConfig(init="encoder", steps=steps, restarts=restarts)
