"""The defended pipeline without HTTP: purify (project onto G's range) → classify (ONNX Runtime) → detect.

One `Engine` per process holds the registry, the ONNX sessions and the device. Everything here is synchronous
and CPU/GPU-bound: the batcher runs it off the event loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from service.classify import OnnxClassifier, labels_and_probs
from service.config import DEFENSES, Defense, Settings
from service.device import pick_device, to_device, to_host
from service.errors import ServiceError
from service.purify import Detector, Projection, ProjectionConfig, StepGraphs, check_images, project
from service.registry import Registry

PROJECTING: tuple[Defense, ...] = ("defense-gan", "invert-classify", "enhanced-invert-classify")  # onto G's range
FROM_ENCODER: tuple[Defense, ...] = ("invert-classify", "enhanced-invert-classify")  # project from E(x)
Stop = Callable[[], bool]  # asked between projection steps: True cancels (service.purify.Cancelled)
ENHANCED = "_enhanced"  # classifier_X_enhanced: classifier_X adversarially fine-tuned on G's range


def enhanced_classifier(registry: Registry, dataset: str, classifier: str) -> str | None:
    """The Enhanced Invert-and-Classify counterpart of `classifier` (itself if it is one), or None if not shipped."""
    name = classifier if classifier.endswith(ENHANCED) else classifier + ENHANCED
    return name if registry.has(f"{dataset}/{name}") else None


class NotShipped(ServiceError, LookupError):
    """A model the request needs is not in the registry."""

    status = 404


def offered_defenses(registry: Registry, dataset: str) -> list[Defense]:
    """The defenses `dataset`'s shipped models make possible, in the order of `DEFENSES`."""
    gen, enc = registry.has(f"{dataset}/generator"), registry.has(f"{dataset}/encoder")
    needs = {
        "none": True,
        "defense-gan": gen,
        "invert-classify": gen and enc,
        "enhanced-invert-classify": gen and enc and any(c.endswith(ENHANCED) for c in registry.classifiers(dataset)),
        "magnet": registry.has(f"{dataset}/magnet"),
    }
    return [d for d in DEFENSES if needs[d]]


def require_magnet(registry: Registry, dataset: str) -> None:
    if not registry.has(f"{dataset}/magnet"):
        raise NotShipped(f"no MagNet autoencoders are shipped for {dataset}")


def classifier_for(registry: Registry, dataset: str, classifier: str, defense: str) -> str:
    """The classifier a defense classifies with: `classifier`, or for enhanced-invert-classify its enhanced
    counterpart (NotShipped, naming the shipped ones, when there is none; for magnet, NotShipped without MagNet's
    autoencoders). The one rule for v1, v2 and the engine, checked before any work."""
    if defense == "magnet":
        require_magnet(registry, dataset)
    if defense != "enhanced-invert-classify":
        return classifier
    enhanced = enhanced_classifier(registry, dataset, classifier)
    if enhanced is None:
        have = [c for c in registry.classifiers(dataset) if c.endswith(ENHANCED)]
        raise NotShipped(f"no enhanced classifier is shipped for {dataset}/{classifier}; shipped: {have or 'none'}")
    return enhanced


LEGACY_DEFAULT = ("classifier_A", "defense-gan")  # served when the manifest names no default for a dataset


def default_classifier(registry: Registry, dataset: str, override: str | None = None) -> str:
    """The classifier served when the caller names none: `override` (MG_DEFAULT_CLASSIFIER), else the manifest's
    `defaults[dataset]` (the most robust measured pipeline), else classifier_A."""
    if override:
        return override
    d = registry.defaults.get(dataset)
    return d.classifier if d else LEGACY_DEFAULT[0]


def default_defense(registry: Registry, dataset: str, classifier: str | None = None, override: str | None = None,
                    proxied: bool = False) -> str:  # fmt: skip
    """The defense applied when the caller names none; the one rule for /v1, /v2 and the proxy.

    `override` (MG_DEFAULT_DEFENSE) wins. Otherwise the manifest's default pipeline for the dataset when the
    classifier is its classifier (or none is named), else the defense under which that classifier measured most
    robust, else defense-gan. A proxy always purifies: where that rule says "none", it projects with the warm start.
    """
    d = registry.defaults.get(dataset)
    if override:
        defense = override
    elif d is not None and classifier in (None, d.classifier):
        defense = d.defense
    else:
        defense = (registry.best_defense(dataset, classifier) if classifier else None) or LEGACY_DEFAULT[1]
    if proxied and defense in ("none", "enhanced-invert-classify"):
        return "invert-classify"
    return defense


class ParameterError(ServiceError, ValueError):
    """A projection parameter outside what the server accepts (/v1 answers 422, the Open Inference Protocol 400)."""

    status = 422


def _within(name: str, v: int | None, low: int, high: int) -> int | None:
    """`v` (an integer: the request's fields are typed by pydantic) unless it lies outside [low, high]."""
    if v is not None and not low <= v <= high:
        cap = f" (the server cap max_{name}, MG_MAX_{name.upper()})" if v > high else ""
        raise ParameterError(f"{name}={v} is outside [{low}, {high}]{cap}")
    return v


def projection_config(defense: str, steps: int | None, restarts: int | None, s: Settings) -> ProjectionConfig | None:
    """The projection a defense name implies, with the caller's overrides (None: the server's defaults): the one
    rule for steps and restarts of /v1, /v2 and the proxy. Restarts in [1, max_restarts], steps in [1, max_steps] —
    0 only with the encoder's warm start (classify E(x) unrefined; from a random start it would classify noise).
    None for a defense that does not project ("none", "magnet"): steps and restarts do not apply to it."""
    if defense not in PROJECTING:
        return None
    warm = defense in FROM_ENCODER
    st = _within("steps", steps, 0 if warm else 1, s.max_steps)
    rs = _within("restarts", restarts, 1, s.max_restarts)
    if warm:
        return ProjectionConfig(init="encoder").with_(steps=s.encoder_steps if st is None else st,
                                                      restarts=rs or s.encoder_restarts)  # fmt: skip
    return ProjectionConfig().with_(steps=s.default_steps if st is None else st, restarts=rs or s.default_restarts)


@dataclass
class PurifyResult:
    """Purified images of one request, with per-image MSE and the detector's decision when one is calibrated."""

    images: torch.Tensor  # N×C×H×W in [0, 1]
    z: torch.Tensor  # N×latent
    mse: np.ndarray  # N
    restart_mse: np.ndarray  # N×R
    threshold: float | None
    fpr: float | None
    flagged: np.ndarray | None  # N bools
    steps: int
    restarts: int
    init: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    detector_note: str | None = None  # why `flagged` is None after a projection

    def rows(self, i: int, j: int) -> PurifyResult:
        """Images i…j−1 of the result (one request's share of a merged batch)."""
        return replace(self, images=self.images[i:j], z=self.z[i:j], mse=self.mse[i:j],
                       restart_mse=self.restart_mse[i:j], flagged=_cut(self.flagged, i, j))  # fmt: skip


def _cut(a: Any, i: int, j: int) -> Any:
    return None if a is None else a[i:j]


@dataclass
class DefendResult:
    """Per-image results of one defended call (arrays of length N)."""

    labels: np.ndarray
    probs: np.ndarray  # N×10
    purified: torch.Tensor | None  # N×C×H×W, None without defense
    mse: np.ndarray | None
    flagged: np.ndarray | None
    threshold: float | None
    timings_ms: dict[str, float]
    steps: int
    restarts: int
    detector_note: str | None = None  # why `flagged` is None after a projection

    def rows(self, i: int, j: int) -> DefendResult:
        """Images i…j−1 of the result (one request's share of a merged batch)."""
        return replace(self, labels=self.labels[i:j], probs=self.probs[i:j], purified=_cut(self.purified, i, j),
                       mse=_cut(self.mse, i, j), flagged=_cut(self.flagged, i, j))  # fmt: skip


@dataclass
class MagNetResult:
    """MagNet's reformer output and detector verdict (either detector over its threshold flags an image)."""

    images: torch.Tensor  # AE_I(x), N×C×H×W
    mse: np.ndarray  # detector I's score: the reformer's reconstruction MSE
    flagged: np.ndarray
    threshold: float  # detector I's (detector II, on the mean absolute error, has its own)


class Engine:
    """Purify and classify with the registry's models. Thread-safe for concurrent callers.

    On CUDA the projection's step loop runs as CUDA graphs (`cuda_graphs`, MG_CUDA_GRAPHS) and the classifiers on
    ONNX Runtime's CUDA provider where the installed onnxruntime has it (else CPU, logged)."""

    def __init__(self, registry: Registry, device: str = "auto", ort_threads: int | None = None,
                 cuda_graphs: bool = True) -> None:  # fmt: skip
        self.registry = registry
        self.device = pick_device(device)
        self._ort_threads = ort_threads
        self.graphs = StepGraphs() if cuda_graphs and self.device.type == "cuda" else None
        self._sessions: dict[str, OnnxClassifier] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, registry: Registry, s: Settings) -> Engine:
        return cls(registry, s.device, ort_threads=s.torch_threads, cuda_graphs=s.cuda_graphs)

    # -- models -------------------------------------------------------------------------------------
    def onnx(self, dataset: str, classifier: str) -> OnnxClassifier:
        key = f"{dataset}/{classifier}"
        with self._lock:
            if key not in self._sessions:
                graph, weights = self.registry.read(key, "onnx"), self.registry.read(key, "weights")
                self._sessions[key] = OnnxClassifier(graph, weights, threads=self._ort_threads,
                                                     device=self.device.type)  # fmt: skip
            return self._sessions[key]

    def warm_up(self) -> None:
        """Open every ONNX classifier's session and load every generator and encoder, running each once."""
        for art in self.registry.artifacts.values():
            if art.kind == "classifier" and "onnx" in art.files:
                x = torch.full((1, *self.registry.spec(art.dataset).shape), 0.5)
                self.onnx(art.dataset, art.key.split("/", 1)[1]).logits(x.numpy())
        for ds in self.registry.datasets():
            x = torch.full((1, *self.registry.spec(ds).shape), 0.5)
            self.purify(x, ds, ProjectionConfig(steps=1, restarts=1), seed=0)
            if self.registry.encoder(ds, self.device) is not None:
                self.purify(x, ds, ProjectionConfig(steps=1, restarts=1, init="encoder"), seed=0)

    # -- stages -------------------------------------------------------------------------------------
    def purify(self, x: torch.Tensor, dataset: str, cfg: ProjectionConfig, seed: int | None = None,
               stop: Stop | None = None) -> Projection:  # fmt: skip
        """Project x (N×C×H×W in [0, 1], the dataset's shape) onto the dataset's generator range (`stop`: see
        `project`, which checks the images)."""
        gen = self.registry.generator(dataset, self.device)
        enc = self.registry.encoder(dataset, self.device) if cfg.init == "encoder" else None
        if cfg.init == "encoder" and enc is None:
            raise ValueError(f"no encoder is shipped for {dataset}")
        p = project(to_device(x, self.device), gen, cfg, encoder=enc, seed=seed, stop=stop, graphs=self.graphs)
        return Projection(*to_host(p.images, p.z, p.mse, p.restart_mse))

    def purify_result(self, x: torch.Tensor, dataset: str, cfg: ProjectionConfig, seed: int | None = None,
                      stop: Stop | None = None) -> PurifyResult:  # fmt: skip
        """Purify, with per-image MSE and the detector's verdict where one is calibrated for cfg's start, L and R."""
        t = time.perf_counter()
        p = self.purify(x, dataset, cfg, seed=seed, stop=stop)
        ms = (time.perf_counter() - t) * 1e3
        mse = p.mse.numpy()
        det, flagged, note = self.detect(dataset, cfg, mse)
        return PurifyResult(p.images, p.z, mse, p.restart_mse.numpy(), det.threshold if det else None,
                            det.fpr if det else None, flagged, cfg.steps, cfg.restarts, cfg.init, {"purify_ms": ms},
                            note)  # fmt: skip

    def detect(self, dataset: str, cfg: ProjectionConfig, mse: np.ndarray
               ) -> tuple[Detector | None, np.ndarray | None, str | None]:  # fmt: skip
        """(detector, flags, None) where a threshold is calibrated for cfg's start, L and R, else (None, None, why)."""
        return self.registry.verdict(dataset, cfg, mse)

    def reform(self, x: torch.Tensor, dataset: str) -> MagNetResult:
        """MagNet: the reformed images AE_I(x) and the verdict of its two detectors (NotShipped without one)."""
        check_images(x, self.registry.spec(dataset).shape)
        require_magnet(self.registry, dataset)
        net = self.registry.magnet(dataset, self.device)
        det = self.registry.magnet_detector(dataset)
        with torch.no_grad():
            xd = to_device(x, self.device)
            reformed = net(xd)
            images, s1, s2 = to_host(reformed, *net.scores(xd, reformed))
        return MagNetResult(images, s1.numpy(), det.flag(s1, s2).numpy(), det.threshold_i)

    def classify(self, x: torch.Tensor, dataset: str, classifier: str) -> tuple[np.ndarray, np.ndarray]:
        """(labels, probabilities) of x through the ONNX classifier."""
        return labels_and_probs(self.onnx(dataset, classifier).logits(x))

    def defend(self, x: torch.Tensor, dataset: str, classifier: str, defense: str,
               cfg: ProjectionConfig | None = None, seed: int | None = None, stop: Stop | None = None
               ) -> DefendResult:  # fmt: skip
        """Classify x, purifying it first unless defense == "none"; detector flags for defended calls.
        enhanced-invert-classify classifies with `classifier`'s enhanced counterpart (NotShipped if there is none)."""
        if defense not in DEFENSES:
            raise ValueError(f"unknown defense {defense!r}; expected one of {DEFENSES}")
        classifier = classifier_for(self.registry, dataset, classifier, defense)
        return self.run_defense(x, dataset, classifier, defense, cfg, seed, stop)

    def run_defense(self, x: torch.Tensor, dataset: str, classifier: str, defense: str,
                    cfg: ProjectionConfig | None = None, seed: int | None = None, stop: Stop | None = None
                    ) -> DefendResult:  # fmt: skip
        """`defend` for a resolved request: `classifier` is the one that classifies (`service.request.resolve`
        named it, the enhanced twin for enhanced-invert-classify). The images are checked once, by the stage that
        reads them first."""
        if defense == "enhanced-invert-classify" and not classifier.endswith(ENHANCED):
            raise ValueError(f"{classifier!r} is not an enhanced classifier: resolve the request first")
        timings: dict[str, float] = {}
        if defense == "none":
            check_images(x, self.registry.spec(dataset).shape)
            t = time.perf_counter()
            labels, probs = self.classify(x, dataset, classifier)
            timings["classify_ms"] = (time.perf_counter() - t) * 1e3
            return DefendResult(labels, probs, None, None, None, None, timings, 0, 0)
        if defense == "magnet":
            return self._magnet(x, dataset, classifier, timings)
        cfg = cfg or ProjectionConfig(init="encoder" if defense in FROM_ENCODER else "random")
        t = time.perf_counter()
        proj = self.purify(x, dataset, cfg, seed=seed, stop=stop)
        timings["purify_ms"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        labels, probs = self.classify(proj.images, dataset, classifier)
        timings["classify_ms"] = (time.perf_counter() - t) * 1e3
        mse = proj.mse.numpy()
        det, flagged, note = self.detect(dataset, cfg, mse)
        return DefendResult(labels, probs, proj.images, mse, flagged, det.threshold if det else None, timings,
                            cfg.steps, cfg.restarts, note)  # fmt: skip

    def _magnet(self, x: torch.Tensor, dataset: str, classifier: str, timings: dict[str, float]) -> DefendResult:
        t = time.perf_counter()
        m = self.reform(x, dataset)
        timings["purify_ms"] = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        labels, probs = self.classify(m.images, dataset, classifier)
        timings["classify_ms"] = (time.perf_counter() - t) * 1e3
        return DefendResult(labels, probs, m.images, m.mse, m.flagged, m.threshold, timings, 0, 0)
