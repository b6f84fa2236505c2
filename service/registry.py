"""The model registry: read `models/manifest.json`, verify every file's sha256, build and load networks.

Artifacts are keyed "<dataset>/<name>" (e.g. "mnist/generator", "mnist/classifier_A"). Each entry holds its
kind, architecture, dataset, files ({role: {path, sha256}}), the command that made it and measured metrics.
Weights load from safetensors only; nothing is downloaded and nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load
from torch import nn

from service import nets
from service.purify import Detector, freeze

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "models"


class ManifestError(RuntimeError):
    """The manifest is missing or malformed, or a file does not match its recorded sha256."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Pipeline:
    """A classifier (name within its dataset) and the defense in front of it."""

    classifier: str
    defense: str


@dataclass
class Artifact:
    key: str
    kind: str
    dataset: str
    arch: str | None
    files: dict[str, dict[str, str]]
    metrics: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    def path(self, root: Path, role: str = "weights") -> Path:
        if role not in self.files:
            raise ManifestError(f"{self.key} has no {role!r} file")
        return root / self.files[role]["path"]


FPR_TOLERANCE = 0.03  # a calibration whose held-out false-positive rate misses its target by more is not used


def grid_key(init: str, steps: int, restarts: int) -> str:
    """The key of a detector calibration in a generator's `detector_grid`: "<start>:<L>:<R>"."""
    return f"{init}:{steps}:{restarts}"


class Registry:
    """Loads what `models/manifest.json` lists; `verify()` checks every file against its sha256."""

    def __init__(self, root: Path = DEFAULT_ROOT, verify: bool = True) -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.exists():
            raise ManifestError(f"{manifest} does not exist")
        try:
            doc = json.loads(manifest.read_text())
            self.artifacts = {
                key: Artifact(
                    key=key,
                    kind=e["kind"],
                    dataset=e["dataset"],
                    arch=e.get("arch"),
                    files=e["files"],
                    metrics=e.get("metrics", {}),
                    raw=e,
                )  # fmt: skip
                for key, e in doc["artifacts"].items()
            }
            self.raw_defaults: dict[str, dict[str, Any]] = dict(doc.get("defaults", {}))
            self.defaults = {ds: Pipeline(d["classifier"].split("/", 1)[1], d["defense"])
                             for ds, d in doc.get("defaults", {}).items()}  # fmt: skip
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise ManifestError(f"{manifest} is malformed: {exc!r}") from exc
        for ds, d in self.defaults.items():
            if f"{ds}/{d.classifier}" not in self.artifacts:
                raise ManifestError(f"{manifest}: defaults[{ds!r}] names {ds}/{d.classifier}, which it does not list")
        self._cache: dict[str, nn.Module] = {}
        self._lock = threading.Lock()
        self._verify = verify
        if verify:
            self.verify()

    def verify(self) -> None:
        """Raise ManifestError naming every missing file and every sha256 mismatch."""
        problems = []
        for art in self.artifacts.values():
            for role, f in art.files.items():
                p = self.root / f["path"]
                if not p.exists():
                    problems.append(f"{art.key} [{role}]: {p} is missing")
                elif sha256_file(p) != f["sha256"]:
                    problems.append(f"{art.key} [{role}]: {p} does not match its sha256 {f['sha256']}")
        if problems:
            raise ManifestError("model files failed verification:\n  " + "\n  ".join(problems))

    # -- lookup -------------------------------------------------------------------------------------
    def get(self, key: str) -> Artifact:
        if key not in self.artifacts:
            raise KeyError(f"no artifact {key!r} in the manifest")
        return self.artifacts[key]

    def datasets(self) -> list[str]:
        return sorted({a.dataset for a in self.artifacts.values() if a.kind == "generator"})

    def classifiers(self, dataset: str) -> list[str]:
        return sorted(a.key.split("/", 1)[1] for a in self.artifacts.values()
                      if a.dataset == dataset and a.kind == "classifier")  # fmt: skip

    def has(self, key: str) -> bool:
        return key in self.artifacts

    def best_defense(self, dataset: str, classifier: str) -> str | None:
        """The defense under which `classifier` measured most robust (worst case at the dataset's default threat,
        `training.robustness`), or None when it was not evaluated."""
        if not self.has(f"{dataset}/{classifier}"):
            return None
        rob = self.get(f"{dataset}/{classifier}").metrics.get("robustness", {})
        threat = self.raw_defaults.get(dataset, {}).get("threat")
        scored = [(cells[threat]["accuracy"], d) for d, cells in rob.items() if threat in cells]
        return max(scored)[1] if scored else None

    # -- loading ------------------------------------------------------------------------------------
    def read(self, key: str, role: str = "weights") -> bytes:
        """The bytes of an artifact's file, checked against the manifest's sha256 as they are read (a file replaced
        after start-up is refused, not silently served)."""
        art = self.get(key)
        path = art.path(self.root, role)
        raw = path.read_bytes()
        if self._verify and hashlib.sha256(raw).hexdigest() != art.files[role]["sha256"]:
            raise ManifestError(f"{key} [{role}]: {path} changed since the manifest was read (sha256 mismatch)")
        return raw

    def module(self, key: str, device: torch.device | str = "cpu") -> nn.Module:
        """The network of artifact `key`, in eval mode with frozen weights (cached per key and device)."""
        cache_key = f"{key}@{device}"
        with self._lock:
            if cache_key not in self._cache:
                art = self.get(key)
                kind = "classifier" if art.kind == "classifier" else art.kind
                net = nets.build(kind, art.arch) if kind == "classifier" else nets.build(kind)
                state = load(self.read(key))
                net.load_state_dict(state)
                self._cache[cache_key] = freeze(net.to(device))
            return self._cache[cache_key]

    def generator(self, dataset: str, device: torch.device | str = "cpu") -> nets.Generator:
        return self.module(f"{dataset}/generator", device)  # type: ignore[return-value]

    def encoder(self, dataset: str, device: torch.device | str = "cpu") -> nets.Encoder | None:
        key = f"{dataset}/encoder"
        return self.module(key, device) if self.has(key) else None  # type: ignore[return-value]

    def magnet(self, dataset: str, device: torch.device | str = "cpu") -> nets.MagNet:
        return self.module(f"{dataset}/magnet", device)  # type: ignore[return-value]

    def magnet_thresholds(self, dataset: str) -> tuple[float, float]:
        """MagNet's calibrated thresholds: detector I (mean squared error), detector II (mean absolute error)."""
        cal = self.get(f"{dataset}/magnet").raw["detector"]
        return float(cal["I"]["threshold"]), float(cal["II"]["threshold"])

    def classifier(self, dataset: str, name: str = "classifier_A", device: torch.device | str = "cpu") -> nn.Module:
        return self.module(f"{dataset}/{name}", device)

    def detector(self, dataset: str, init: str = "random", steps: int | None = None,
                 restarts: int | None = None) -> Detector | None:  # fmt: skip
        """The detector calibrated for this projection: start `init` and — when `steps`/`restarts` are given —
        exactly those (a threshold is a quantile of clean MSEs at one L and R: at other L, R it misfires, e.g.
        74 % of clean images flagged at L=25 under a threshold set at L=200), else None (`detector_note` says why)."""
        cal = self.detector_calibration(dataset, init, steps, restarts)
        return None if cal is None else Detector(threshold=float(cal["threshold"]), fpr=float(cal["fpr"]))

    def detector_calibration(self, dataset: str, init: str, steps: int | None = None,
                             restarts: int | None = None) -> dict | None:  # fmt: skip
        """The recorded calibration (threshold, fpr, n, steps, restarts, images) the service uses for this start at
        exactly these L and R — the start's main entry (`detector[init]`) or a grid point (`detector_grid["init:L:R"]`,
        `training.calibrate_detector`) — or None. Without steps/restarts: the start's main entry. A calibration whose
        measured held-out false-positive rate misses its target by more than FPR_TOLERANCE is not used."""
        cal = self._calibration_at(dataset, init, steps, restarts)
        return cal if cal is not None and cal["on_target"] else None

    def _calibration_at(self, dataset: str, init: str, steps: int | None, restarts: int | None) -> dict | None:
        for cal in self.detector_calibrations(dataset):
            if cal["init"] != init or (steps is None and restarts is None and not cal["main"]):
                continue
            if all(
                want is None or int(cal.get(key, want)) == want
                for key, want in (("steps", steps), ("restarts", restarts))
            ):
                return cal
        return None

    def detector_calibrations(self, dataset: str) -> list[dict]:
        """Every calibration of the dataset's detector, each with its `init`, `main` flag, `held_out_fpr` (the
        false-positive rate measured on held-out clean images, where recorded) and `on_target` (within
        FPR_TOLERANCE of its target, or not measured): grid points first (set on more images, they win where a main
        entry has the same L and R), then the main entries."""
        if not self.has(f"{dataset}/generator"):
            return []
        art = self.get(f"{dataset}/generator")
        out = [{**c, "init": c.get("init", key.split(":")[0]), "main": False, "held_out_fpr": c.get("test_fpr")}
               for key, c in art.raw.get("detector_grid", {}).items()]  # fmt: skip
        for init, c in art.raw.get("detector", {}).items():  # measured by training.eval_generator --record
            measured = art.metrics.get(f"{'rec' if init == 'random' else 'warm'}_detector_fpr_on_slice")
            out.append({**c, "init": init, "main": True, "held_out_fpr": measured})
        for c in out:
            c["on_target"] = c["held_out_fpr"] is None or abs(c["held_out_fpr"] - c["fpr"]) <= FPR_TOLERANCE
        return out

    def detector_note(self, dataset: str, init: str, steps: int, restarts: int) -> str | None:
        """Why a projection at (init, steps, restarts) gets no detector verdict (`flagged: null`); None if it does."""
        if self.detector(dataset, init, steps, restarts) is not None:
            return None
        have = [f"{c['init']} L={c.get('steps', '?')} R={c.get('restarts', '?')}"
                for c in self.detector_calibrations(dataset) if c["on_target"]]  # fmt: skip
        off = self._calibration_at(dataset, init, steps, restarts)
        why = (f"the threshold calibrated there flags {off['held_out_fpr']:.3f} of held-out clean images, more than "
               f"{FPR_TOLERANCE} from its target {off['fpr']}, so it is not used" if off else
               "a threshold holds for the projection it was set at")  # fmt: skip
        return (f"no detector threshold applies to a {init} start at L={steps}, R={restarts} ({why}); calibrated: "
                f"{', '.join(have) or 'none'}")  # fmt: skip

    def class_names(self, dataset: str) -> list[str]:
        return list(self.get(f"{dataset}/generator").raw.get("classes", [str(i) for i in range(10)]))
