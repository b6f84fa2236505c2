"""Shared fixtures: the shipped registry, and a tiny random-weight registry for fast unit tests."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from service import nets
from service.datasets import DatasetSpec
from service.registry import Registry, sha256_file
from training.onnx_export import export_onnx

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("MG_MODELS_DIR") or ROOT / "models")  # the shipped models (a GPU check: a subset)

torch.set_num_threads(int(os.environ.get("MG_TEST_THREADS", "2")))


TINY_RGB = DatasetSpec("tinyrgb", 3, 32, 32, ("red", "green", "blue"), "fill")  # a colour dataset for the tests


def write_tiny_models(root: Path, datasets: tuple[str, ...] = ("mnist",), seed: int = 0,
                      enhanced: bool = False, specs: tuple[DatasetSpec, ...] = ()) -> Path:  # fmt: skip
    """A models/ folder with random-weight generator, encoder and classifier A (+ ONNX; with `enhanced` also a
    classifier_A_enhanced) and its manifest, for MNIST-format `datasets` and for each of `specs` (its shape and
    classes, recorded in the manifest's `datasets`)."""
    torch.manual_seed(seed)
    artifacts: dict[str, dict] = {}
    names = [("generator", "generator", None), ("encoder", "encoder", None), ("classifier_A", "classifier", "A")]
    names += [("classifier_A_enhanced", "classifier", "A")] if enhanced else []
    for spec in [DatasetSpec(ds) for ds in datasets] + list(specs):
        ds = spec.name
        (root / ds).mkdir(parents=True, exist_ok=True)
        for name, kind, arch in names:
            net = nets.build(kind, arch, shape=spec.shape, classes=spec.num_classes).eval()
            w = root / ds / f"{name}.safetensors"
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(w))
            files = {"weights": {"path": f"{ds}/{name}.safetensors", "sha256": sha256_file(w)}}
            if kind == "classifier":
                o = root / ds / f"{name}.onnx"
                export_onnx(net, o, w, spec.shape)
                files["onnx"] = {"path": f"{ds}/{name}.onnx", "sha256": sha256_file(o)}
            entry = {"kind": kind, "arch": arch, "dataset": ds, "files": files, "metrics": {}, "command": "tests"}
            if kind == "generator":
                entry["classes"] = list(spec.classes)
                entry["detector"] = {"random": {"threshold": 0.05, "fpr": 0.05}}
            artifacts[f"{ds}/{name}"] = entry
    doc: dict[str, Any] = {"schema": 1, "artifacts": artifacts}
    if specs:
        doc["datasets"] = {spec.name: spec.to_json() for spec in specs}
    (root / "manifest.json").write_text(json.dumps(doc, indent=2))
    return root


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_registry(tiny_models: Path) -> Registry:
    return Registry(tiny_models)


@pytest.fixture(scope="session")
def registry() -> Registry:
    """The shipped models, hash-verified."""
    return Registry(MODELS)


def wait_ready(client: TestClient) -> None:
    """Poll /readyz of an in-process app until it answers 200 (warm-up runs in the background)."""
    for _ in range(600):
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError(client.get("/readyz").json())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip, with the reason, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A headless Chromium per test module (tests/browser.py); only the page's tests ask for it."""
    from browser import chromium

    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver
