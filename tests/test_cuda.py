"""The GPU path (issue 17): the static step loop, pinned transfers, the GPU batch size, ONNX Runtime's provider.

The static loop (what a CUDA graph replays) is checked against the eager loop here on CPU; the tests marked `cuda`
run the graphs themselves and skip without a device (bench/gpu.py runs them on a GPU host).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from pydantic import ValidationError

from service import classify
from service.classify import OnnxClassifier
from service.config import CUDA_BATCH_CAP, Settings
from service.device import batch_size, to_device, to_host
from service.engine import Engine
from service.purify import Cancelled, Descent, ProjectionConfig, StepGraphs, bucket, project
from service.registry import Registry

CONFIGS = [
    ProjectionConfig(steps=12, restarts=3),
    ProjectionConfig(steps=7, restarts=2, optimizer="adam", lr=0.05, z_max_norm=0.5),
    ProjectionConfig(steps=6, restarts=2, init="encoder"),
]


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_bucket_is_the_next_power_of_two() -> None:
    assert [bucket(r) for r in (1, 16, 17, 100, 1024, 1025)] == [16, 16, 32, 128, 1024, 2048]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["sgd", "adam-constrained", "encoder"])
def test_the_static_loop_gives_the_eager_results(tiny_registry: Registry, cfg: ProjectionConfig) -> None:
    """Padded rows, reused buffers and a zeroed optimizer state per call change nothing: a loop reused across calls
    of other sizes (and rebuilt after eviction) gives each call the eager answer."""
    G, E = tiny_registry.generator("mnist"), tiny_registry.encoder("mnist")
    static = StepGraphs(capture=False, size=1)
    for n, seed in ((5, 0), (3, 1), (5, 2), (9, 3)):
        x = images(n, seed)
        eager = project(x, G, cfg, encoder=E, seed=seed)
        got = project(x, G, cfg, encoder=E, seed=seed, graphs=static)
        assert torch.allclose(got.z, eager.z, atol=1e-5), (n, (got.z - eager.z).abs().max())
        assert torch.allclose(got.mse, eager.mse, atol=1e-6) and torch.equal(got.restart_mse.argmin(1),
                                                                              eager.restart_mse.argmin(1))  # fmt: skip
    assert len(static._loops) == 1, "the cache keeps at most `size` loops"


def test_the_static_loop_is_cancelled_between_steps(tiny_registry: Registry) -> None:
    G = tiny_registry.generator("mnist")
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 4

    with pytest.raises(Cancelled, match="step 4 of 50"):
        project(images(2), G, ProjectionConfig(steps=50, restarts=2), stop=stop, graphs=StepGraphs(capture=False))


def test_the_gpu_batch_size_is_a_capped_setting() -> None:
    s = Settings(max_batch_size=32, cuda_batch_size=1024)
    assert batch_size(s, torch.device("cpu")) == 32
    assert batch_size(s, torch.device("cuda")) == 1024
    with pytest.raises(ValidationError):
        Settings(cuda_batch_size=CUDA_BATCH_CAP + 1)


def test_transfers_on_cpu_are_plain_moves() -> None:
    t = torch.arange(6.0)
    assert to_device(t, torch.device("cpu")) is t
    (back,) = to_host(t)
    assert torch.equal(back, t)


def test_onnx_runtime_on_cuda_says_when_it_falls_back_to_cpu(tiny_registry: Registry,
                                                             caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    key = "mnist/classifier_A"
    graph, weights = tiny_registry.read(key, "onnx"), tiny_registry.read(key, "weights")
    assert OnnxClassifier(graph, weights, device="cpu").providers == [classify.CPU]
    with caplog.at_level(logging.WARNING, logger="service.classify"):
        clf = OnnxClassifier(graph, weights, device="cuda")
    if classify.CUDA in clf.providers:
        assert clf.providers[0] == classify.CUDA
    else:
        assert clf.providers == [classify.CPU]
        assert "classifiers run on CPU" in caplog.text, "a fallback to CPU is logged, never silent"
    x = images(3).numpy()
    assert np.allclose(clf.logits(x), OnnxClassifier(graph, weights).logits(x), atol=1e-4)


def test_training_jobs_default_to_cuda_where_present() -> None:
    from training import robustness, train_classifier, train_enhanced, train_robust

    want = "cuda" if torch.cuda.is_available() else "cpu"
    parsed = [
        train_classifier.parse(["--dataset", "mnist", "--model", "A"]),
        train_enhanced.parse(["--dataset", "mnist"]),
        train_robust.parse(["--dataset", "mnist", "--eps", "0.3"]),
        robustness.parse(["--dataset", "mnist"]),
    ]
    assert [a.device for a in parsed] == [want] * 4
    assert train_robust.parse(["--dataset", "mnist", "--eps", "0.3", "--device", "cpu"]).device == "cpu"


# -- on a CUDA device -----------------------------------------------------------------------------------------------
@pytest.fixture
def fp32() -> Iterator[None]:
    """Full float32 convolutions and matmuls (no TF32, torch's default for cuDNN), to compare with the CPU."""
    was = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = was


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", CONFIGS, ids=["sgd", "adam-constrained", "encoder"])
def test_cuda_graphs_match_the_eager_loop_and_the_cpu(registry: Registry, cfg: ProjectionConfig, fp32: None) -> None:
    dev = torch.device("cuda")
    G, E = registry.generator("mnist", dev), registry.encoder("mnist", dev)
    graphs = StepGraphs()
    for n in (4, 3, 4):  # the second call of a shape replays the graph captured by the first
        x = images(n, n)
        cpu = project(x, registry.generator("mnist"), cfg, encoder=registry.encoder("mnist"), seed=n)
        eager = project(x.to(dev), G, cfg, encoder=E, seed=n)
        graphed = project(x.to(dev), G, cfg, encoder=E, seed=n, graphs=graphs)
        assert torch.allclose(graphed.z.cpu(), eager.z.cpu(), atol=1e-3), (graphed.z.cpu() - eager.z.cpu()).abs().max()
        assert torch.allclose(graphed.mse.cpu(), cpu.mse, rtol=1e-3, atol=1e-5)


@pytest.mark.cuda
def test_a_projection_step_makes_no_host_sync(registry: Registry) -> None:
    dev = torch.device("cuda")
    for opt in ("sgd", "adam"):
        c = ProjectionConfig(steps=3, restarts=2, optimizer=opt)  # type: ignore[arg-type]
        d = Descent(torch.zeros(16, 128, device=dev), torch.rand(16, 1, 28, 28, device=dev),
                    registry.generator("mnist", dev), c, capturable=True)  # fmt: skip
        d.step()  # the optimizer's state is allocated at the first step
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                d.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_a_graphed_projection_is_cancelled_within_a_few_steps(registry: Registry) -> None:
    G = registry.generator("mnist", "cuda")
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 30

    with pytest.raises(Cancelled, match="step 30 of 200"):
        project(images(64).cuda(), G, ProjectionConfig(), stop=stop, graphs=StepGraphs())


@pytest.mark.cuda
def test_the_engine_on_cuda_returns_host_tensors_and_the_cpu_answer(registry: Registry, fp32: None) -> None:
    gpu, cpu = Engine(registry, "cuda"), Engine(registry, "cpu")
    assert gpu.graphs is not None
    x = images(8)
    cfg = ProjectionConfig(steps=20, restarts=4)
    a = gpu.defend(x, "mnist", "classifier_A", "defense-gan", cfg, seed=0)
    b = cpu.defend(x, "mnist", "classifier_A", "defense-gan", cfg, seed=0)
    assert a.purified is not None and a.purified.device.type == "cpu" and a.purified.is_pinned()
    assert np.allclose(a.mse, b.mse, rtol=1e-3, atol=1e-5) and (a.labels == b.labels).mean() >= 7 / 8


@pytest.mark.cuda
def test_robust_training_runs_on_cuda(tmp_path: Path) -> None:
    from training import data, train_robust

    xs, ys = data.load_slice("mnist")
    arrays = {"x_train": xs[:256], "y_train": ys[:256], "x_test": xs[256:], "y_test": ys[256:]}
    args = train_robust.parse(["--dataset", "mnist", "--eps", "0.3", "--steps", "2", "--batch", "32", "--max-steps",
                               "8", "--monitor", "32", "--run-dir", str(tmp_path), "--device", "cuda"])  # fmt: skip
    model, history = train_robust.train(args, arrays)
    assert len(args.losses) == 8 and all(np.isfinite(args.losses)) and history


def test_the_gpu_check_runs_dry_on_cpu(tiny_models: Path, tmp_path: Path) -> None:
    """bench/gpu.py --dry-run: every section runs at tiny sizes and the report says what this device lacks."""
    from bench import gpu

    threads = torch.get_num_threads()
    try:
        rc = gpu.main(["--dry-run", "--out", str(tmp_path), "--models-dir", str(tiny_models), "--timeout", "120",
                       "--device", "cpu"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    r = json.loads((tmp_path / "gpu.json").read_text())
    assert r["dry_run"] and r["tests"]["returncode"] == 0, r["tests"]
    assert ("passed" if torch.cuda.is_available() else "skipped") in r["tests"]["summary"]
    proj = r["projection"]
    assert [(p["setting"], p["batch"]) for p in proj] == [(s, b) for s in gpu.SETTINGS for b in (1, 4)]
    assert all(p["eager"] > 0 and p["eager_flops"] > 0 and "graphs" not in p for p in proj), proj
    assert r["peak"]["fp32"] > 0
    (row,) = r["onnx"]
    if classify.CUDA in ort.get_available_providers():  # onnxruntime-gpu on a GPU host
        assert row["cuda"] > 0
    else:
        assert row["cpu"] > 0 and row["cuda"] is None and "onnxruntime-gpu" in row["cuda_note"]
    (h,) = r["http"]
    assert h["requests"] == 4 and h["req_s"] > 0 and h["direct_img_s"] > 0 and h["merged"] >= 1
    md = (tmp_path / "gpu.md").read_text()
    assert r["environment"]["device"] in md and "| defense-gan | 3 | 2 | 4 |" in md


@pytest.mark.cuda
def test_robustness_pipelines_attack_on_cuda_with_cpu_images(registry: Registry, fp32: None) -> None:
    from training import robustness

    x = images(16)
    y = torch.from_numpy(np.asarray(Engine(registry, "cpu").classify(x, "mnist", "classifier_A")[0], dtype=np.int64))
    budget = robustness.Budget(iters=5, defended_iters=2, latent_steps=3)
    for defense, attack in (("none", "pgd-ours"), ("invert-classify", "latent")):
        cpu = robustness.Pipeline(registry, "mnist", "classifier_A", defense)
        gpu = robustness.Pipeline(registry, "mnist", "classifier_A", defense, "cuda")
        assert (gpu.correct(x, y) == cpu.correct(x, y)).float().mean() >= 15 / 16
        adv = gpu.attack(attack, "linf", 0.3, 0, budget)(x, y)
        assert adv.device.type == "cpu" and robustness.within(adv, x, "linf", 0.3).all()
