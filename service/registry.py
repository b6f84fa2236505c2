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
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load
from torch import nn

from service import nets
from service.datasets import DatasetSpec, gray28
from service.purify import Detector, ProjectionConfig, freeze

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


T = TypeVar("T", torch.Tensor, np.ndarray)


@dataclass(frozen=True)
class MagNetDetector:
    """MagNet's two detectors (Meng & Chen 2017): an image is flagged when either score passes its threshold —
    detector I on the reformer's reconstruction MSE, detector II on the second autoencoder's mean absolute error."""

    threshold_i: float
    threshold_ii: float

    def flag(self, score_i: T, score_ii: T) -> T:
        return (score_i > self.threshold_i) | (score_ii > self.threshold_ii)


FPR_TOLERANCE = 0.03  # a calibration whose held-out false-positive rate misses its target by more is not used


def grid_key(init: str, steps: int, restarts: int) -> str:
    """The key of a detector calibration in a generator's `detector_grid`: "<start>:<L>:<R>"."""
    return f"{init}:{steps}:{restarts}"


KINDS = ("generator", "encoder", "classifier", "magnet", "advgan")
_HEX = set("0123456789abcdef")
# the manifest's schema: per entry field, the type it must have (kind, dataset, files required; the rest optional)
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "kind": str, "dataset": str, "files": dict, "arch": (str, type(None)), "command": str, "commit": str,
    "created": str, "classes": list, "training": dict, "metrics": dict, "detector": dict, "detector_grid": dict,
    "latent_dim": int, "latent_std": (int, float), "onnx_command": str, "generator_sha256": str, "defense": str,
    "target": str, "target_sha256": str, "eps": (int, float), "warm_start": dict, "input_shape": list,
}  # fmt: skip
_CALIBRATION = {"threshold": (int, float), "fpr": (int, float), "steps": int, "restarts": int, "n": int}


def _check_types(where: str, doc: dict, fields: dict[str, type | tuple[type, ...]]) -> None:
    for name, kind in fields.items():
        value = doc.get(name)
        if name in doc and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ManifestError(f"{where}.{name} is {type(value).__name__}, not {kind}")


def check_entry(key: str, e: dict) -> None:
    """The schema of one manifest entry, checked at start-up: the required fields, the type of every known field,
    each file's path and sha256, and each detector calibration's threshold, fpr and (where given) L and R."""
    if not isinstance(e, dict):
        raise ManifestError(f"artifacts[{key!r}] is not an object")
    missing = [f for f in ("kind", "dataset", "files") if f not in e]
    if missing:
        raise ManifestError(f"artifacts[{key!r}] lacks {', '.join(missing)}")
    _check_types(f"artifacts[{key!r}]", e, _FIELDS)
    if e["kind"] not in KINDS or key != f"{e['dataset']}/{key.partition('/')[2]}":
        raise ManifestError(f"artifacts[{key!r}]: kind {e['kind']!r} or dataset {e['dataset']!r} does not fit")
    for role, f in e["files"].items():
        if not (isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("sha256"), str)
                and len(f["sha256"]) == 64 and set(f["sha256"]) <= _HEX):  # fmt: skip
            raise ManifestError(f"artifacts[{key!r}].files[{role!r}] needs a path and a sha256 (64 hex digits)")
    cals = {**{f"detector[{k!r}]": c for k, c in e.get("detector", {}).items() if e["kind"] == "generator"},
            **{f"detector_grid[{k!r}]": c for k, c in e.get("detector_grid", {}).items()}}  # fmt: skip
    for where, cal in cals.items():
        if not isinstance(cal, dict) or "threshold" not in cal or "fpr" not in cal:
            raise ManifestError(f"artifacts[{key!r}].{where} needs a threshold and an fpr")
        _check_types(f"artifacts[{key!r}].{where}", cal, _CALIBRATION)


@dataclass(frozen=True)
class Measured:
    """What `models/measured.json` (built by `python -m training.report` from the results tree) holds: per artifact
    its newest measured figures, and per dataset the pipeline measured most robust and the threat it was ranked at:
    at the dataset's standard threat (`defaults`) and under the union of its L∞ and L2 threats (`union_defaults`)."""

    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    union_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Measured:
        if not path.exists():
            return cls()
        doc = json.loads(path.read_text())
        if not all(isinstance(doc.get(k, {}), dict) for k in ("artifacts", "defaults", "union_defaults")):
            raise ManifestError(f"{path} is malformed: artifacts, defaults and union_defaults must be objects")
        return cls(doc.get("artifacts", {}), doc.get("defaults", {}), doc.get("union_defaults", {}))


class Registry:
    """Loads what `models/manifest.json` lists (its schema checked); `verify()` checks every file against its
    sha256. An artifact's `metrics`: the manifest's training-time figures, then `models/measured.json`'s.

    `defaults` (per dataset, the pipeline served when a call names none): the manifest's own (a test's fixture) else
    the measured choice at the dataset's standard threat; with `ranking="union"`, the pipeline measured best under
    the union of its L∞ and L2 threats where one was measured (MG_DEFAULT_RANKING)."""

    def __init__(self, root: Path = DEFAULT_ROOT, verify: bool = True, ranking: str = "standard") -> None:
        self.root = Path(root)
        manifest = self.root / "manifest.json"
        if not manifest.exists():
            raise ManifestError(f"{manifest} does not exist")
        try:
            doc = json.loads(manifest.read_text())
            for key, e in doc["artifacts"].items():
                check_entry(key, e)
            measured = Measured.read(self.root / "measured.json")
            self.artifacts = {
                key: Artifact(key=key, kind=e["kind"], dataset=e["dataset"], arch=e.get("arch"), files=e["files"],
                              metrics={**e.get("metrics", {}), **measured.artifacts.get(key, {})}, raw=e)
                for key, e in doc["artifacts"].items()
            }  # fmt: skip

            def listed(chosen: dict[str, dict]) -> dict[str, dict]:
                return {ds: d for ds, d in chosen.items() if d.get("classifier") in doc["artifacts"]}

            self.raw_union_defaults: dict[str, dict[str, Any]] = doc.get("union_defaults") or listed(
                measured.union_defaults)  # fmt: skip
            self.standard_defaults: dict[str, dict[str, Any]] = doc.get("defaults") or listed(measured.defaults)
            defaults = self.standard_defaults | (self.raw_union_defaults if ranking == "union" else {})
            self.raw_defaults: dict[str, dict[str, Any]] = dict(defaults)
            self.specs = {ds: DatasetSpec.from_json(ds, d) for ds, d in doc.get("datasets", {}).items()}
            self.defaults = {ds: Pipeline(d["classifier"].split("/", 1)[1], d["defense"])
                             for ds, d in defaults.items()}  # fmt: skip
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:  # SpecError is a ValueError
            raise ManifestError(f"{manifest} is malformed: {exc!r}") from exc
        self._check_input_shapes(manifest)
        for ds, d in self.defaults.items():
            if f"{ds}/{d.classifier}" not in self.artifacts:
                raise ManifestError(f"{manifest}: defaults[{ds!r}] names {ds}/{d.classifier}, which it does not list")
        for ds, d in self.raw_union_defaults.items():
            if d.get("classifier") not in self.artifacts:
                raise ManifestError(f"{manifest}: union_defaults[{ds!r}] names {d.get('classifier')}, which it does "
                                    "not list")  # fmt: skip
        self._cache: dict[str, nn.Module] = {}
        self._calibrations: dict[str, list[dict]] = {}
        self._lock = threading.Lock()
        self._verify = verify
        if verify:
            self.verify()

    def _check_input_shapes(self, manifest: Path) -> None:
        """Every classifier's recorded input shape is its dataset's (a classifier trained on other images is refused
        at start-up, not fed wrongly shaped ones)."""
        for art in self.artifacts.values():
            shape = art.raw.get("input_shape")
            if shape is not None and tuple(shape) != self.spec(art.dataset).shape:
                raise ManifestError(f"{manifest}: {art.key} takes {shape}, its dataset's images are "
                                    f"{list(self.spec(art.dataset).shape)}")  # fmt: skip

    def spec(self, dataset: str) -> DatasetSpec:
        """The dataset's image format: the manifest's `datasets` entry, else MNIST's (1×28×28, fitted on black) with
        the generator's class names."""
        if dataset in self.specs:
            return self.specs[dataset]
        gen = self.artifacts.get(f"{dataset}/generator")
        return gray28(dataset, gen.raw.get("classes") if gen else None)

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
        """The defense under which `classifier` measured most robust (worst case at the threat the served default was
        ranked at, else at the standard threat; `training.robustness`), or None when it was not evaluated."""
        if not self.has(f"{dataset}/{classifier}"):
            return None
        rob = self.get(f"{dataset}/{classifier}").metrics.get("robustness", {})
        for ranked in (self.raw_defaults, self.standard_defaults):  # the served ranking's threat, else the standard
            threat = ranked.get(dataset, {}).get("threat")
            scored = [(cells[threat]["accuracy"], d) for d, cells in rob.items() if threat in cells]
            if scored:
                return max(scored)[1]
        return None

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
                spec = self.spec(art.dataset)
                net = nets.build(art.kind, art.arch, shape=spec.shape, classes=spec.num_classes)
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

    def magnet_detector(self, dataset: str) -> MagNetDetector:
        """MagNet's two detectors at their calibrated thresholds."""
        return MagNetDetector(*self.magnet_thresholds(dataset))

    def detector(self, dataset: str, init: str, steps: int, restarts: int) -> Detector | None:
        """The one detector lookup, keyed by the projection (start, L, R): the detector calibrated for exactly that
        projection, else None (`detector_note` says why). A threshold is a quantile of clean MSEs at one L and R:
        at other L, R it misfires (e.g. 74 % of clean images flagged at L=25 under a threshold set at L=200)."""
        cal = self.detector_calibration(dataset, init, steps, restarts)
        return None if cal is None else Detector(threshold=float(cal["threshold"]), fpr=float(cal["fpr"]))

    def verdict(self, dataset: str, cfg: ProjectionConfig, mse: T) -> tuple[Detector | None, T | None, str | None]:
        """The detector's verdict on reconstruction MSEs of a projection with `cfg`: (detector, flags, None) where a
        threshold is calibrated for cfg's start, L and R, else (None, None, why). Service and evaluations both
        flag here."""
        det = self.detector(dataset, cfg.init, cfg.steps, cfg.restarts)
        if det is None:
            return None, None, self.detector_note(dataset, cfg.init, cfg.steps, cfg.restarts)
        return det, det.flag(mse), None

    def detector_calibration(self, dataset: str, init: str, steps: int | None = None,
                             restarts: int | None = None) -> dict | None:  # fmt: skip
        """The recorded calibration (threshold, fpr, n, steps, restarts, images) applied to a projection from `init`
        at exactly these L and R, or None. Without steps/restarts: at the start's main L and R (its `detector[init]`
        entry's). A calibration whose measured held-out false-positive rate misses its target by more than
        FPR_TOLERANCE is not used."""
        cal = self._calibration_at(dataset, init, steps, restarts)
        return cal if cal is not None and cal["on_target"] else None

    def _calibration_at(self, dataset: str, init: str, steps: int | None, restarts: int | None) -> dict | None:
        cals = self.detector_calibrations(dataset)
        if steps is None or restarts is None:
            main = next((c for c in cals if c["main"] and c["init"] == init), None)
            if main is None or main.get("steps") is None or main.get("restarts") is None:
                return main
            steps = main["steps"] if steps is None else steps
            restarts = main["restarts"] if restarts is None else restarts
        # grid points come first: set on more images, they win where a main entry has the same L and R; a
        # calibration that records no L or R (a test fixture's) holds at any
        return next((c for c in cals if c["init"] == init and c.get("steps") in (None, steps)
                     and c.get("restarts") in (None, restarts)), None)  # fmt: skip

    def detector_calibrations(self, dataset: str) -> list[dict]:
        """Every calibration of the dataset's detector, each with its `init`, `steps`, `restarts`, `main` flag,
        `held_out_fpr` (the false-positive rate measured on held-out clean images, where recorded) and `on_target`
        (within FPR_TOLERANCE of its target, or not measured): grid points first, then the main entries. Built
        once per dataset."""
        if dataset not in self._calibrations:
            self._calibrations[dataset] = self._read_calibrations(dataset)
        return [dict(c) for c in self._calibrations[dataset]]

    def _read_calibrations(self, dataset: str) -> list[dict]:
        if not self.has(f"{dataset}/generator"):
            return []
        art = self.get(f"{dataset}/generator")
        out = [{**c, "init": c.get("init", key.split(":")[0]), "main": False, "held_out_fpr": c.get("test_fpr")}
               for key, c in art.raw.get("detector_grid", {}).items()]  # fmt: skip
        for init, c in art.raw.get("detector", {}).items():  # measured by training.eval_generator --record
            legacy = art.metrics.get(f"{'rec' if init == 'random' else 'warm'}_detector_fpr_on_slice")
            out.append({**c, "init": init, "main": True, "held_out_fpr": c.get("test_fpr", legacy)})
        for c in out:
            c.update({k: int(c[k]) for k in ("steps", "restarts") if c.get(k) is not None})
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
        return list(self.spec(dataset).classes)
