"""ONNX export of the classifiers, with the weights stored once: in the model's safetensors file.

`classifier_X.onnx` holds the graph only; each initializer is ONNX *external data* pointing at its tensor's bytes
inside `classifier_X.safetensors` (same folder; safetensors stores raw little-endian tensors at known offsets, which
is exactly ONNX's external-data layout). So the two formats share one copy of the weights:

- torch loads the safetensors file as usual;
- ONNX Runtime, Triton or Netron load the .onnx from its path and read the weights beside it (copy both files);
- the service hands ONNX Runtime the graph bytes and the tensors of the verified safetensors bytes
  (`service.classify.OnnxClassifier(graph, weights=...)`), so nothing it runs was read unverified.

Re-export every shipped classifier from its safetensors (weights unchanged, manifest hashes updated):

    python -m training.onnx_export
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx.external_data_helper import set_external_data
from safetensors.torch import load_file
from torch import nn

from service import nets
from service.registry import Registry
from training import data
from training.common import MODELS_DIR, command_line, eval_slice, update_manifest


def safetensors_layout(path: Path) -> dict[str, tuple[int, int]]:
    """{tensor name: (byte offset in the file, byte length)} from a safetensors header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}  # fmt: skip


def export_onnx(model: nn.Module, path: Path, weights: Path, shape: nets.Shape = nets.IMAGE_SHAPE) -> None:
    """Write the graph of `model` to `path` (input `input` N×C×H×W float32 of `shape`, MNIST's 1×28×28 by default;
    output `logits` N×classes; dynamic batch), its initializers pointing into `weights` (the model's safetensors,
    already written, same folder)."""
    model.eval()
    if weights.parent.resolve() != path.parent.resolve():
        raise ValueError("the ONNX graph and its safetensors weights must share a folder")
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter on purpose: the dynamo one needs onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, *shape),), buf, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          do_constant_folding=False, dynamo=False)  # fmt: skip
    graph = onnx.load_from_string(buf.getvalue())
    layout = safetensors_layout(weights)
    stored = load_file(str(weights))
    for init in graph.graph.initializer:
        if init.name not in layout:
            raise ValueError(f"ONNX initializer {init.name!r} is not a tensor of {weights.name}")
        if not np.array_equal(onnx.numpy_helper.to_array(init), stored[init.name].numpy()):
            raise ValueError(f"ONNX initializer {init.name!r} differs from {weights.name}'s tensor")
        offset, length = layout[init.name]
        set_external_data(init, location=weights.name, offset=offset, length=length)
        init.ClearField("raw_data")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(graph.SerializeToString())


def onnx_max_diff(model: nn.Module, path: Path, x: np.ndarray) -> float:
    """Largest |ONNX Runtime − torch| logit on `x`, the ONNX model loaded from its path (weights beside it)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x})[0]
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    return float(np.abs(got - ref).max())


def reexport(models_dir: Path = MODELS_DIR) -> list[str]:
    """Re-export the ONNX graph of every classifier in the manifest from its safetensors; return their keys."""
    man = json.loads((Path(models_dir) / "manifest.json").read_text())
    specs = Registry(models_dir, verify=False)  # each dataset's image format, as the service reads it
    done = []
    for key, entry in man["artifacts"].items():
        if entry["kind"] != "classifier" or "onnx" not in entry["files"]:
            continue
        weights = Path(models_dir) / entry["files"]["weights"]["path"]
        onnx_path = Path(models_dir) / entry["files"]["onnx"]["path"]
        spec = specs.spec(entry["dataset"])
        model = nets.build("classifier", entry["arch"], shape=spec.shape, classes=spec.num_classes)
        model.load_state_dict(load_file(str(weights)))
        export_onnx(model, onnx_path, weights, spec.shape)
        xs, _ = eval_slice(entry["dataset"], models_dir)
        diff = onnx_max_diff(model, onnx_path, data.to_float(xs))
        # the weights file is unchanged, so the measured figures stay; the training command stays the entry's
        update_manifest(key, {**entry, "onnx_command": command_line(), "metrics": {"onnx_vs_torch_max_abs_diff": diff}},
                        models_dir, keep_measured=True)  # fmt: skip
        print(f"{key}: {onnx_path.stat().st_size} bytes of graph, ONNX vs torch max |diff| {diff:.2e}", flush=True)
        done.append(key)
    return done


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    reexport(p.parse_args(argv).models_dir)


if __name__ == "__main__":
    main()
