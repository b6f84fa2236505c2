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

from service.datasets import DatasetSpec
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
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = spec.name if spec is not None else Path(sys.argv[0]).stem
    return ("python -m " + name + " " + shlex.join(sys.argv[1:])).rstrip()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "service", "training"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_arguments(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """The arguments that define a run (what a checkpoint saves and a resume must repeat): `names` of `args`."""
    return {name: getattr(args, name) for name in names}


def check_resume(saved: dict | None, wanted: dict, checkpoint: Path) -> None:
    """Refuse to resume `checkpoint` with other arguments than it was made with: resuming under other flags would
    silently mix two runs in one. A checkpoint saved before its arguments were (`saved` None) resumes as it did;
    an argument it did not save is not compared."""
    if saved is None:
        return
    differ = {k: (saved[k], v) for k, v in wanted.items() if k in saved and saved[k] != v}
    if differ:
        said = ", ".join(f"--{k.replace('_', '-')} {old!r} (this run: {new!r})" for k, (old, new) in differ.items())
        raise SystemExit(f"{checkpoint} was made with {said}; resume it with the same arguments, or start another "
                         "run (another --name or --tag, or another run folder)")  # fmt: skip


def batches(n: int, batch: int, rng: np.random.Generator, shuffle: bool = True) -> Iterator[np.ndarray]:
    """Index batches over one epoch (the last partial batch is dropped when shuffling)."""
    idx = rng.permutation(n) if shuffle else np.arange(n)
    stop = n - (n % batch) if shuffle else n
    for i in range(0, stop, batch):
        yield idx[i : i + batch]


def save_grid(images: torch.Tensor | np.ndarray, path: Path | str, nrow: int = 10, pad: int = 2) -> None:
    """Save N×C×H×W images in [0, 1] (C 1 or 3; N×H×W gray too) as one PNG grid, gray or RGB as they are."""
    path = Path(path)
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    x = (x[:, None] if x.ndim == 3 else x).transpose(0, 2, 3, 1)  # N×H×W×C
    n, h, w, c = x.shape
    rows = (n + nrow - 1) // nrow
    grid = np.ones((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = x[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (grid.clip(0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode="L" if c == 1 else "RGB").save(path)


def save_weights(module: torch.nn.Module, path: Path) -> str:
    """Save a module's state dict as safetensors; return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))
    path.chmod(0o644)  # safetensors writes 0600: the container image's non-root server could not read it
    return sha256_file(path)


def generator_iterations(entry: dict) -> str:
    """A generator's training as "GAN iterations [+ fine-tuning iterations]", from its manifest entry."""
    gan = entry.get("training", {}).get("iterations")
    tuned = sum(seg["iterations"] for seg in entry.get("segments", []))
    return f"{gan} + {tuned} recon" if tuned else str(gan)


def update_manifest(key: str, entry: dict, models_dir: Path = MODELS_DIR, keep_measured: bool = False) -> None:
    """Insert or replace `artifacts[key]` in models/manifest.json, hashing each of its files.

    `entry["files"]` maps a role ("weights", "onnx", "data") to {"path": relative to models/}; sha256, the git
    commit and the date are filled in. A calibration recorded on the entry (`detector`, `detector_grid`) is kept
    while its files are the same; new files (a retrained model) drop it, since it describes other weights.
    `keep_measured` keeps it although a file changed (a re-export of the same weights). What the job measured —
    `entry["metrics"]` and `entry["training"]["history"]` — goes to the results tree (`record_metrics`), not into
    the manifest.
    """
    entry = dict(entry)
    measured = dict(entry.pop("metrics", None) or {})
    if isinstance(entry.get("training"), dict) and "history" in entry["training"]:
        entry["training"] = dict(entry["training"])
        measured["training_history"] = entry["training"].pop("history")
    with edit_manifest(models_dir) as man:
        _merge_entry(man, key, entry, Path(models_dir), keep_measured)
    if measured:
        record_metrics(key, measured, models_dir, job="training")


def record_dataset(spec: DatasetSpec, models_dir: Path = MODELS_DIR) -> None:
    """Record a dataset's image format in the manifest (`datasets[name]`), which every network of it is built for."""
    with edit_manifest(models_dir) as man:
        man["datasets"] = dict(sorted({**man.get("datasets", {}), spec.name: spec.to_json()}.items()))


def eval_slice(dataset: str, models_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A dataset's evaluation images and labels (uint8): its committed slice (models/<dataset>/test_slice.npz, the
    first 1,000 test images), else (a data set prepared without one) the first 1,000 images of its test split."""
    from training import data

    try:
        return data.load_slice(dataset) if models_dir is None else data.load_slice(dataset, models_dir)
    except FileNotFoundError:
        arrays = data.load(dataset)
        return arrays["x_test"][: data.SLICE_SIZE], arrays["y_test"][: data.SLICE_SIZE]


def _merge_entry(man: dict, key: str, entry: dict, models_dir: Path, keep_measured: bool) -> None:
    old = man["artifacts"].get(key, {})
    files = {role: {"path": f["path"], "sha256": sha256_file(models_dir / f["path"])}
             for role, f in entry["files"].items()}  # fmt: skip
    # calibrations of the old files
    kept = old if keep_measured or old.get("files") == files else {}
    merged = {**{k: v for k, v in kept.items() if k != "metrics"}, **entry}
    merged["files"] = files
    merged["commit"] = entry.get("commit") or git_commit()
    merged["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    man["artifacts"][key] = dict(sorted(merged.items()))
    man["artifacts"] = dict(sorted(man["artifacts"].items()))


@contextlib.contextmanager
def edit_manifest(models_dir: Path = MODELS_DIR) -> Iterator[dict]:
    """Read models/manifest.json, yield it for changes, write it back atomically, all under an exclusive lock:
    training jobs running side by side each read-modify-write it, and a reader never sees half a file."""
    path = Path(models_dir) / "manifest.json"
    with locked(path):
        doc = json.loads(path.read_text()) if path.exists() else {"schema": 1, "artifacts": {}}
        yield doc
        tmp = path.with_suffix(".tmp")
        tmp.write_text(manifest_text(doc))
        tmp.replace(path)


def manifest_text(doc: object, width: int = 140) -> str:
    """The manifest as JSON, one level per line, and on one line (without spaces) whatever fits in `width` columns
    there: a file's path and sha256, a calibration's figures."""

    def fmt(v: object, depth: int) -> str:
        flat = json.dumps(v, ensure_ascii=False, separators=(",", ":"))
        if not isinstance(v, (dict, list)) or not v or len(flat) + depth <= width:
            return flat
        pad = " " * (depth + 1)
        items = ([f"{pad}{json.dumps(k, ensure_ascii=False)}: {fmt(x, depth + 1)}" for k, x in v.items()]
                 if isinstance(v, dict) else [pad + fmt(x, depth + 1) for x in v])  # fmt: skip
        brackets = "{}" if isinstance(v, dict) else "[]"
        return brackets[0] + "\n" + ",\n".join(items) + "\n" + " " * depth + brackets[1]

    return fmt(doc, 0) + "\n"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside `path` (`<path>.lock`) for a read-modify-write of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def edit_json(path: Path, empty: dict | None = None, indent: int = 1) -> Iterator[dict]:
    """Read a JSON file (or `empty`), yield it for changes, write it back atomically, under an exclusive lock."""
    with locked(path):
        doc = json.loads(path.read_text()) if path.exists() else dict(empty or {})
        yield doc
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=indent) + "\n")
        tmp.replace(path)


def results_dir(models_dir: Path, quick: bool = False) -> Path:
    """The results tree that goes with a models folder: the repository's results/ for models/ (a smoke run's:
    runs/results, never on a page of record); a models folder elsewhere (a test's) keeps its own inside it."""
    if Path(models_dir).resolve() != MODELS_DIR.resolve():
        return Path(models_dir) / "results"
    return RUNS_DIR / "results" if quick else ROOT / "results"


def record_metrics(key: str, metrics: dict, models_dir: Path = MODELS_DIR, job: str = "metrics",
                   **fields: object) -> None:  # fmt: skip
    """Record what a job measured on artifact `key`: each metric (a name, or a path "a/b" into a nested figure) a row
    of a new run of `job` in the results tree
    (with the sha256 of the weights it was measured on), then models/measured.json rebuilt. `fields`
    (a detector calibration) go into the manifest entry itself; its files stay as they are."""
    if fields:
        with edit_manifest(models_dir) as man:
            entry = man["artifacts"][key]
            for name, value in fields.items():
                entry[name] = {**entry.get(name, {}), **value} if isinstance(value, dict) else value
    if not metrics:
        return
    from training import report, results

    sha = weights_sha(json.loads((Path(models_dir) / "manifest.json").read_text())["artifacts"][key])
    root = results_dir(models_dir)
    run = results.start_run(job, key.split("/", 1)[0], {"command": command_line(), "commit": git_commit()}, root)
    results.write_rows(run, [{"artifact": key, "sha256": sha, "path": name.split("/"), "value": value}
                             for name, value in metrics.items()])  # fmt: skip
    report.write_measured(models_dir, root)


# measured fields that `training.report` rebuilds from the results tree (training.evaluate's and
# training.robustness's rows): a manifest entry carrying them has nothing to move, they are dropped
REBUILT = ("evaluation", "eval_fixed_step_min", "eval_clean_accuracy", "eval_detector_auc", "robustness")


def metric_job(name: str) -> str:
    """The job a measured field of the older manifest came from."""
    if name == "advgan_tables":
        return "eval_advgan"
    return "eval_generator" if name.startswith(("rec_", "warm_")) else "training"


def tidy_manifest(models_dir: Path = MODELS_DIR, root: Path | None = None) -> int:
    """Move what a manifest entry still carries of measured figures (written by an older job) into the results
    tree (one run per job and dataset), drop its `defaults` (the measured choice is rebuilt by the report, the
    served one is a setting) and write the manifest in its own format. Returns the number of figures moved."""
    moved: dict[tuple[str, str], list[dict]] = {}
    with edit_manifest(models_dir) as man:
        man.pop("defaults", None)
        for key, entry in man["artifacts"].items():
            if entry["kind"] != "generator":
                entry.pop("classes", None)  # the dataset's class names: the generator's entry holds them
            metrics = entry.pop("metrics", None) or {}
            training = entry.get("training")
            if isinstance(training, dict) and "history" in training:
                metrics["training_history"] = training.pop("history")
            for name, value in metrics.items():
                if name not in REBUILT:
                    rows = moved.setdefault((metric_job(name), entry["dataset"]), [])
                    rows.append({"artifact": key, "sha256": weights_sha(entry), "path": [name], "value": value})
    from training import results

    config = {"command": command_line(), "commit": git_commit(), "moved": "measured fields of models/manifest.json"}
    for (job, dataset), rows in sorted(moved.items()):
        results.write_rows(results.start_run(job, dataset, config, root or results_dir(models_dir)), rows)
    return sum(len(rows) for rows in moved.values())


def weights_sha(entry: dict) -> str:
    """The sha256 of the weights a measurement on this entry was made on (its first file where it has none)."""
    files = entry["files"]
    return (files.get("weights") or next(iter(files.values())))["sha256"]


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
    art = reg.get(f"{dataset}/generator") if reg.has(f"{dataset}/generator") else None
    m, ws = (art.metrics, art.raw.get("warm_start", {})) if art else ({}, {})
    steps = int(ws.get("steps", m.get("warm_steps", 25)))
    restarts = int(ws.get("restarts", m.get("warm_restarts", 1)))
    return ProjectionConfig(init="encoder", steps=steps, restarts=restarts)
