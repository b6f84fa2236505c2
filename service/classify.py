"""Classification through ONNX Runtime (its CUDA provider on a GPU engine), with the torch model as reference."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from safetensors.numpy import load as load_safetensors

log = logging.getLogger(__name__)


CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def providers_for(device: str = "cpu") -> list[str]:
    """ONNX Runtime providers for the engine's device: on "cuda" the CUDA provider first (CPU behind it), falling
    back to CPU alone with a warning when this onnxruntime build has none (onnxruntime-gpu: setup.sh --gpu)."""
    if device != "cuda":
        return [CPU]
    if CUDA in ort.get_available_providers():
        return [CUDA, CPU]
    log.warning("MG_DEVICE=cuda, but onnxruntime %s offers no %s (install onnxruntime-gpu): classifiers run on CPU",
                ort.__version__, CUDA)  # fmt: skip
    return [CPU]


class OnnxClassifier:
    """An ONNX classifier session: N×1×28×28 float32 in [0, 1] → logits N×10.

    `model` is the ONNX graph (a path, or its bytes); the shipped graphs keep their weights as external data in the
    model's safetensors file (`training.onnx_export`). From a path ONNX Runtime reads them beside the graph; with
    `weights` (the safetensors bytes) the initializers are handed over from memory, which is how the service runs
    exactly the bytes it verified. `providers` (default: `providers_for(device)`) lists what the session actually
    loaded: onnxruntime-gpu falls back to CPU silently when CUDA is unusable, so this is checked and logged.
    """

    def __init__(self, model: Path | bytes, weights: bytes | None = None, providers: list[str] | None = None,
                 threads: int | None = None, device: str = "cpu") -> None:  # fmt: skip
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        if weights is not None:
            # the OrtValues must outlive the session: keep them on it
            self._initializers = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in load_safetensors(weights).items()}
            opts.add_external_initializers(list(self._initializers), list(self._initializers.values()))
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        wanted = providers or providers_for(device)
        self.session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), sess_options=opts,
                                            providers=wanted)  # fmt: skip
        self.providers = self.session.get_providers()
        if wanted[0] not in self.providers:
            log.warning("ONNX Runtime wanted %s but loaded %s: classifiers run on CPU", wanted[0], self.providers)
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def predict(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(labels N, probabilities N×10)."""
        return labels_and_probs(self.logits(x))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def labels_and_probs(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = softmax(np.asarray(logits, dtype=np.float64)).astype(np.float32)
    return probs.argmax(axis=1), probs


@torch.no_grad()
def torch_logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """Reference logits from the torch model (eval mode), batched."""
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
