"""Where the engine computes, and how tensors get there and back: the one place for device choices.

On CUDA, host→device copies go through pinned (page-locked) memory without blocking, and results come back into
pinned buffers with a single synchronisation for all of them; on CPU these are plain moves.
"""

from __future__ import annotations

import logging

import torch

from service.config import Settings

log = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    """The device named, where "auto" means CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on `device`; a CPU→CUDA copy is staged in pinned memory and does not block the host."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors on the CPU: from CUDA each is copied into a pinned buffer, with one synchronisation for all."""
    if not any(t.is_cuda for t in tensors):
        return tuple(t.cpu() for t in tensors)
    out = []
    for t in tensors:
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True) if t.is_cuda else t
        if t.is_cuda:
            buf.copy_(t, non_blocking=True)
        out.append(buf)
    torch.cuda.synchronize()
    return tuple(out)


def batch_size(s: Settings, device: torch.device) -> int:
    """The batcher's largest batch (images) on `device`: MG_MAX_BATCH_SIZE on CPU, MG_CUDA_BATCH_SIZE (at most
    config.CUDA_BATCH_CAP) on a GPU, where throughput keeps growing with the batch long after a CPU's has levelled."""
    if device.type != "cuda":
        return s.max_batch_size
    log.info("batches of up to %d images on %s (MG_CUDA_BATCH_SIZE)", s.cuda_batch_size, device)
    return s.cuda_batch_size
