"""The purification engine: project images onto a generator's range (Defense-GAN), and the MSE detector.

    z* = argmin_z ‖G(z) − x‖²,  L gradient steps from R starts, best start by reconstruction MSE.

Defaults are Defense-GAN's (official code, `reconstruct`): z₀ ~ N(0, I/128), per-image loss the *mean* squared
error over pixels summed over the batch, SGD momentum 0.7, lr 10, lr ×0.1 from step ⌈0.8·L⌉, L = 200, R = 10.
All R starts of all N images run as one N·R×128 tensor; only z requires grad. `init="encoder"` starts from
z₀ = E(x) (plus small noise for the extra starts), the warm start that needs far fewer steps.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class ProjectionConfig:
    """Projection hyper-parameters; the defaults reproduce Defense-GAN-Rec (L=200, R=10)."""

    steps: int = 200
    restarts: int = 10
    lr: float = 10.0
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.7
    decay_at: float = 0.8  # fraction of `steps` after which lr is multiplied by `decay`
    decay: float = 0.1
    init: Literal["random", "encoder"] = "random"
    init_std: float | None = None  # random init std; None: 1/sqrt(latent_dim) as in Defense-GAN
    encoder_noise: float = 0.1  # std of the noise added to E(x) for restarts after the first
    z_max_norm: float | None = None  # optional constraint: keep each ‖z‖₂ at most this
    z_min_norm: float | None = None  # optional constraint: keep each ‖z‖₂ at least this (with max: a shell)

    def with_(self, **changes: object) -> ProjectionConfig:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]


@dataclass
class Projection:
    """Result of `project` for N images."""

    images: torch.Tensor  # G(z*), N×1×H×W
    z: torch.Tensor  # z*, N×latent
    mse: torch.Tensor  # per-image reconstruction MSE of the chosen start, N
    restart_mse: torch.Tensor  # final MSE of every start, N×R


class Cancelled(RuntimeError):
    """A projection stopped early because its callers are gone."""


def check_images(x: torch.Tensor, shape: tuple[int, ...] = (1, 28, 28)) -> None:
    """Raise ValueError unless x is a finite float tensor N×C×H×W of `shape` with values in [0, 1]."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("images must be a floating-point tensor")
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(shape) or x.shape[0] == 0:
        raise ValueError(f"images must have shape N×{'×'.join(map(str, shape))}, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or infinity")
    if x.min() < 0 or x.max() > 1:
        raise ValueError("image values must lie in [0, 1]")


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: the generator is a fixed function of z during projection."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def initial_latents(
    x: torch.Tensor, latent_dim: int, cfg: ProjectionConfig, encoder: nn.Module | None, seed: int | None
) -> torch.Tensor:
    """Starting points, N·R×latent (restart-major within each image: rows i·R … i·R+R−1 belong to image i).

    With a seed, every image gets the same R noise draws, so a batch gives exactly the per-image results. Without
    one, each image gets its own draws from a fresh non-deterministic seed: two identical images in one batch (two
    callers' identical requests) start apart, and no caller can predict or repeat another's starts.
    """
    n, r = x.shape[0], cfg.restarts
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    shape = (1, r, latent_dim) if seed is not None else (n, r, latent_dim)
    noise = torch.randn(shape, generator=gen).to(x.device).expand(n, r, latent_dim)
    if cfg.init == "random":
        std = cfg.init_std if cfg.init_std is not None else 1.0 / math.sqrt(latent_dim)
        return (noise * std).reshape(n * r, latent_dim)
    if encoder is None:
        raise ValueError("init='encoder' needs an encoder")
    with torch.no_grad():
        z0 = encoder(x)  # N×latent
    noise = noise.clone()
    noise[:, 0].zero_()  # the first start is E(x) itself
    return (z0[:, None, :] + cfg.encoder_noise * noise).reshape(n * r, latent_dim)


class Descent:
    """The step loop's state: latents z (a leaf), their targets, and the optimizer. `step()` is one projection step
    in place with no host sync, so with fixed tensor addresses it can be captured in a CUDA graph."""

    def __init__(self, z: torch.Tensor, target: torch.Tensor, generator: nn.Module, cfg: ProjectionConfig,
                 capturable: bool = False) -> None:  # fmt: skip
        self.z, self.target, self.generator, self.cfg = z.requires_grad_(True), target, generator, cfg
        if cfg.optimizer == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam([self.z], lr=cfg.lr, capturable=capturable)
        else:
            self.opt = torch.optim.SGD([self.z], lr=cfg.lr, momentum=cfg.momentum)

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = lr

    def __call__(self, lr: float) -> None:
        """One step at learning rate `lr`."""
        self.set_lr(lr)
        self.step()

    def step(self) -> None:
        cfg = self.cfg
        loss = (self.generator(self.z) - self.target).pow(2).mean(dim=(1, 2, 3)).sum()
        (self.z.grad,) = torch.autograd.grad(loss, self.z)
        self.opt.step()
        if cfg.z_max_norm is not None or cfg.z_min_norm is not None:
            with torch.no_grad():
                norm = self.z.norm(dim=1, keepdim=True).clamp_min(1e-12)
                self.z.mul_(norm.clamp(min=cfg.z_min_norm, max=cfg.z_max_norm) / norm)

    def reset(self, z0: torch.Tensor, target: torch.Tensor) -> None:
        """Start over from z0 (its rows first; rows beyond are zero padding), as a fresh optimizer would."""
        with torch.no_grad():
            for buf, src in ((self.z, z0), (self.target, target)):
                buf[len(src) :].zero_()
                buf[: len(src)].copy_(src)
            for state in self.opt.state.values():
                for v in state.values():
                    if isinstance(v, torch.Tensor):
                        v.zero_()
        self.set_lr(self.cfg.lr)


def bucket(rows: int, smallest: int = 16) -> int:
    """The static row count a batch of `rows` latents runs at: the next power of two (at least `smallest`)."""
    return max(smallest, 1 << (rows - 1).bit_length())


class StepGraphs:
    """Fixed-shape step loops, one per (generator, optimizer settings, row bucket), reused across calls.

    Rows are padded to `bucket(rows)` (every row's gradient depends on that row alone, so padding changes nothing),
    and the optimizer state is zeroed per call. With `capture` (CUDA only) the step at each of the two learning rates
    (before and after the decay) is one `torch.cuda.CUDAGraph`, captured when the loop is built and replayed L times
    in all; without, the same static loop runs eagerly (what tests check on CPU).
    At most `size` loops are kept (least recently used goes). One projection at a time: calls serialize.
    """

    def __init__(self, capture: bool = True, size: int = 8) -> None:
        self.capture, self.size = capture, size
        self._loops: OrderedDict[tuple, tuple[Descent, dict[float, torch.cuda.CUDAGraph]]] = OrderedDict()
        self.lock = threading.Lock()

    def loop(self, z0: torch.Tensor, target: torch.Tensor, generator: nn.Module,
             cfg: ProjectionConfig) -> tuple[Descent, Callable[[float], None]]:  # fmt: skip
        """Load z0 and target into a cached static loop: (its state, `step(lr)`); call under `self.lock`."""
        key = (id(generator), bucket(len(z0)), z0.device, cfg.optimizer, cfg.lr, cfg.momentum, cfg.decay,
               cfg.z_max_norm, cfg.z_min_norm)  # fmt: skip
        if key not in self._loops:
            z = torch.zeros(key[1], z0.shape[1], device=z0.device)
            t = torch.zeros(key[1], *target.shape[1:], device=target.device)
            descent, graphs = Descent(z, t, generator, cfg, capturable=self.capture), {}
            for lr in dict.fromkeys((cfg.lr, cfg.lr * cfg.decay)) if self.capture else ():
                graphs[lr] = capture(descent, lr, next(iter(graphs.values()), None))  # before any call's steps
            self._loops[key] = (descent, graphs)
            while len(self._loops) > self.size:
                self._loops.popitem(last=False)
        self._loops.move_to_end(key)
        descent, graphs = self._loops[key]
        descent.reset(z0, target)  # also undoes the capture's warm-up steps
        if not self.capture:
            return descent, descent
        return descent, lambda lr: graphs[lr].replay()


def capture(descent: Descent, lr: float, share: torch.cuda.CUDAGraph | None) -> torch.cuda.CUDAGraph:
    """One step of `descent` at learning rate `lr` as a CUDA graph (warmed up on a side stream first, as capture
    needs); graphs of one loop share a memory pool."""
    descent.set_lr(lr)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            descent.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the other lane's thread (ONNX Runtime, pinned copies) may call CUDA while this one captures
    with torch.cuda.graph(graph, pool=share.pool() if share is not None else None, capture_error_mode="thread_local"):
        descent.step()
    return graph


class Pacer:
    """Keeps the host within 2·`every` steps of a CUDA device (so `stop()` between steps still stops work that has
    not run, while `every` steps stay queued); a no-op on CPU, where each step runs before the call returns."""

    def __init__(self, device: torch.device, every: int = 5) -> None:
        self.every = every if device.type == "cuda" else 0
        self.pending: torch.cuda.Event | None = None

    def tick(self, step: int) -> None:
        if not self.every or (step + 1) % self.every:
            return
        if self.pending is not None:
            self.pending.synchronize()
        self.pending = torch.cuda.Event()
        self.pending.record()


def project(
    x: torch.Tensor,
    generator: nn.Module,
    cfg: ProjectionConfig | None = None,
    *,
    encoder: nn.Module | None = None,
    seed: int | None = 0,
    stop: Callable[[], bool] | None = None,
    graphs: StepGraphs | None = None,
) -> Projection:
    """Project images x (N×1×28×28 in [0, 1]) onto the range of `generator`; see the module docstring.
    `stop()` is asked before every step: True raises `Cancelled` (the caller is gone), within one step (on CUDA
    within 10 steps: `Pacer`). `graphs`: run the step loop there (static shapes; CUDA graphs on a GPU)."""
    cfg = cfg or ProjectionConfig()
    check_images(x, generator.shape)
    if cfg.steps < 0 or cfg.restarts < 1:
        raise ValueError("steps must be >= 0 and restarts >= 1")
    if any(p.requires_grad for p in generator.parameters()):
        raise ValueError("freeze the generator first (service.purify.freeze): its weights must not get gradients")
    n, r = x.shape[0], cfg.restarts
    target = x.repeat_interleave(r, dim=0)  # N·R×1×H×W, aligned with the latents
    z0 = initial_latents(x, generator.latent_dim, cfg, encoder, seed)
    if graphs is None:
        descent = Descent(z0, target, generator, cfg)
        descend(descent, cfg, stop, x.device)
        z = descent.z.detach()
    else:
        with graphs.lock:
            descent, step = graphs.loop(z0, target, generator, cfg)
            descend(step, cfg, stop, x.device)
            z = descent.z.detach()[: n * r].clone()
    with torch.no_grad():
        recon = generator(z)
        mse = (recon - target).pow(2).mean(dim=(1, 2, 3)).view(n, r)
        best = mse.argmin(dim=1)
        rows = torch.arange(n, device=x.device) * r + best
        return Projection(images=recon[rows], z=z[rows], mse=mse[torch.arange(n), best], restart_mse=mse)


def descend(step: Callable[[float], None], cfg: ProjectionConfig, stop: Callable[[], bool] | None,
            device: torch.device) -> None:  # fmt: skip
    """Run cfg.steps calls of `step(lr)`, lr × decay from step ⌈decay_at·L⌉, asking `stop()` before each."""
    decay_step = math.ceil(cfg.decay_at * cfg.steps)
    pacer = Pacer(device)
    for i in range(cfg.steps):
        if stop is not None and stop():
            raise Cancelled(f"projection cancelled at step {i} of {cfg.steps}")
        step(cfg.lr * cfg.decay if i >= decay_step else cfg.lr)
        pacer.tick(i)


@dataclass(frozen=True)
class Detector:
    """Flags inputs whose reconstruction MSE exceeds a threshold calibrated on clean images."""

    threshold: float
    fpr: float = 0.05

    @classmethod
    def calibrate(cls, clean_mse: torch.Tensor, fpr: float = 0.05) -> Detector:
        """Threshold = the (1 − fpr) quantile of clean reconstruction MSEs."""
        if not 0 < fpr < 1:
            raise ValueError("fpr must lie in (0, 1)")
        return cls(threshold=float(torch.quantile(clean_mse.double().flatten(), 1 - fpr)), fpr=fpr)

    def flag(self, mse: torch.Tensor) -> torch.Tensor:
        return mse > self.threshold


def roc_auc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of score > t separating positives from negatives (Mann–Whitney U, ties ½)."""
    neg, pos = negatives.double().flatten(), positives.double().flatten()
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))
