"""The GPU check (issue 17): one short run on a CUDA host that runs the CUDA tests and measures, side by side,

    python -m bench.gpu --out runs/gpu                # on a GPU host, about 3–6 minutes; scripts/gpu-check.sh wraps it
    python -m bench.gpu --out /tmp/gpu --dry-run      # anywhere: tiny sizes on CPU, seconds (a test runs this)

- tests: `pytest -m cuda tests/test_cuda.py` (they skip, with the reason, where there is no device);
- projection img/s through the engine (transfers included) at L=200, R=10 and at the warm start (encoder, L=25,
  R=1) for batch 1, 16, 64, 256, 1024: eager kernels against the CUDA-graph step loop, and the achieved FLOP/s
  (FlopCounterMode's count of one step × steps / time) over the device's measured dense matmul peak;
- ONNX Runtime's CUDA provider against its CPU provider, per shipped classifier;
- HTTP: /v1/classify on a real uvicorn server (loopback, the batcher on the GPU worker), concurrent clients,
  against the engine called directly at the batch the batcher can form (bench/http.py's load and direct run).
Installs nothing. Writes gpu.json and gpu.md (device name included) to --out; every section stops at --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bench import http as bhttp
from bench.purify import matmul_flops, step_flops, timed
from service import classify
from service.classify import OnnxClassifier
from service.config import Settings
from service.device import batch_size, pick_device
from service.engine import Engine
from service.purify import ProjectionConfig
from service.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
DATASET = "mnist"
SETTINGS = {"defense-gan": ("random", 200, 10), "warm start": ("encoder", 25, 1)}  # init, L, R


@dataclass
class Plan:
    """Sizes of one run: the full run on a GPU, or the CPU dry run."""

    batches: list[int]
    settings: dict[str, tuple[str, int, int]]
    onnx_batch: int
    concurrency: list[int]
    requests: int
    http: tuple[str, int, int]  # defense, L, R of the HTTP section
    peak_sizes: tuple[int, ...]
    repeat: int

    @classmethod
    def make(cls, dry_run: bool) -> Plan:
        if dry_run:
            return cls([1, 4], {"defense-gan": ("random", 3, 2), "warm start": ("encoder", 2, 1)}, 4, [2], 4,
                       ("defense-gan", 2, 2), (256,), 1)  # fmt: skip
        return cls([1, 16, 64, 256, 1024], SETTINGS, 1024, [64, 256], 2048, ("defense-gan", 200, 10),
                   (4096, 8192), 3)  # fmt: skip


@dataclass
class Run:
    """The run's clock and results; a section that fails or runs out of time is recorded, not fatal."""

    deadline: float
    results: dict = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, name: str, fn: Callable[[], object]) -> None:
        if self.left() <= 0:
            self.results[name] = {"skipped": "out of time (--timeout)"}
            return
        t = time.monotonic()
        try:
            self.results[name] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded in the report, the other sections still run
            self.results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"[{name}] {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)


def environment(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "cuda": torch.version.cuda, "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(), "torch_threads": torch.get_num_threads(),
        "tf32_conv": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }  # fmt: skip


def cuda_tests(timeout: float) -> dict:
    """The CUDA-marked tests in a child pytest: its summary line and exit status."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    env = {**os.environ, "MG_TEST_THREADS": str(torch.get_num_threads())}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.strip()]
    return {"command": " ".join(cmd[1:]), "returncode": p.returncode, "summary": lines[-1] if lines else p.stderr}


def images(n: int) -> torch.Tensor:
    """n slice images (repeated past the slice's 1,000)."""
    with np.load(ROOT / "models" / DATASET / "test_slice.npz", allow_pickle=False) as f:
        raw = f["x"]
    return torch.from_numpy(raw[np.arange(n) % len(raw)] / 255.0).float()[:, None]


def projection(reg: Registry, device: torch.device, plan: Plan, run: Run) -> list[dict]:
    """img/s through Engine.purify per setting, batch and mode, and each row's achieved FLOP/s."""
    modes = {"eager": Engine(reg, str(device), cuda_graphs=False)}
    if device.type == "cuda":
        modes["graphs"] = Engine(reg, str(device), cuda_graphs=True)
    G = reg.generator(DATASET, device)
    probe = torch.zeros(16, G.latent_dim, device=device, requires_grad=True)
    per_latent = step_flops(G, probe, torch.zeros(16, 1, 28, 28, device=device)) / 16
    x, rows = images(max(plan.batches)), []
    for name, (init, steps, restarts) in plan.settings.items():
        cfg = ProjectionConfig(init=init, steps=steps, restarts=restarts)  # type: ignore[arg-type]
        for b in plan.batches:
            row: dict = {"setting": name, "init": init, "steps": steps, "restarts": restarts, "batch": b}
            for mode, engine in modes.items():
                if run.left() <= 0:
                    row[mode] = None
                    continue
                engine.purify(x[:b], DATASET, cfg, seed=0)  # warm: cuDNN's choice, the graph's capture
                t = timed(lambda e=engine, b=b, cfg=cfg: e.purify(x[:b], DATASET, cfg, seed=0), plan.repeat)
                row[mode] = b / t
                row[f"{mode}_flops"] = per_latent * b * restarts * steps / t
            rows.append(row)
    return rows


def peak(device: torch.device, plan: Plan) -> dict:
    """The dense matmul FLOP/s of the device, float32 and (on CUDA) TF32, as the projection's convolutions run."""
    out = {"fp32": max(matmul_flops(n, device) for n in plan.peak_sizes)}
    if device.type == "cuda":
        was = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            out["tf32"] = max(matmul_flops(n, device) for n in plan.peak_sizes)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = was
    return out


def onnx(reg: Registry, plan: Plan) -> list[dict]:
    """img/s of each shipped classifier under the CPU and (where this onnxruntime has it) the CUDA provider."""
    x, rows = images(plan.onnx_batch).numpy(), []
    for name in reg.classifiers(DATASET):
        key = f"{DATASET}/{name}"
        graph, weights = reg.read(key, "onnx"), reg.read(key, "weights")
        row: dict = {"classifier": name, "batch": len(x)}
        for label, device in (("cpu", "cpu"), ("cuda", "cuda")):
            clf = OnnxClassifier(graph, weights, device=device)
            if device == "cuda" and classify.CUDA not in clf.providers:
                row[label] = None
                row["cuda_note"] = f"no {classify.CUDA} in onnxruntime {ort.__version__} (onnxruntime-gpu needed)"
                continue
            clf.logits(x)
            row[label] = len(x) / timed(lambda c=clf: c.logits(x), plan.repeat)
        rows.append(row)
    return rows


def http(reg: Registry, device: torch.device, plan: Plan, run: Run) -> list[dict]:
    """/v1/classify on a spawned server (this device, the GPU batch size) against Engine.defend called directly."""
    defense, steps, restarts = plan.http
    proc, url = bhttp.spawn(reg.root, {"MG_DEVICE": device.type, "MG_TORCH_THREADS": str(torch.get_num_threads())})
    max_batch = batch_size(Settings(), device)  # the server's: the same MG_ environment
    rows = []
    try:
        bhttp.wait_ready(url, min(run.left(), 300), proc)
        raw = images(256)
        pngs = [bhttp.png((im[0].numpy() * 255).round().astype(np.uint8)) for im in raw]
        params = {"model": f"{DATASET}/classifier_A", "defense": defense, "steps": steps, "restarts": restarts}
        engine = Engine(reg, str(device))
        cfg = ProjectionConfig(steps=steps, restarts=restarts)
        for c in plan.concurrency:
            if run.left() <= 0:
                break
            total = max(plan.requests, c)
            before = bhttp.batch_stats(bhttp.httpx.get(url + "/metrics").text, "defend")
            wall, lat = asyncio.run(bhttp.load(url, pngs, c, total, params))
            after = bhttp.batch_stats(bhttp.httpx.get(url + "/metrics").text, "defend")
            batch = min(c, max_batch)
            direct = bhttp.direct_throughput(engine, raw, batch, max(total, 2 * batch), defense, cfg, DATASET,
                                             "classifier_A")  # fmt: skip
            ms = np.array(lat) * 1e3
            merged = (after[0] - before[0]) / max(after[1] - before[1], 1)
            rows.append({"concurrency": c, "requests": total, "req_s": total / wall, "p50_ms": np.percentile(ms, 50),
                         "p99_ms": np.percentile(ms, 99), "merged": merged, "direct_img_s": direct,
                         "ratio": total / wall / direct})  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(20)
    return rows


def fmt(v: object, spec: str = ".1f") -> str:
    return "n/a" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def ratio(a: object, b: object) -> str:
    return fmt(a / b, ".2f") if isinstance(a, float) and isinstance(b, float) and b else "n/a"


def table(title: str, head: list[str], rows: list[list[str]], section: object) -> str:
    """A Markdown table; a skipped or failed section shows its reason instead."""
    if not isinstance(section, list):
        return f"## {title}\n\n{json.dumps(section)}\n"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    return f"## {title}\n\n" + "\n".join(lines) + "\n"


def markdown(r: dict) -> str:
    """The report as Markdown: the device, the tests' summary, one table per section."""
    env, pk = r["environment"], r.get("peak") if isinstance(r.get("peak"), dict) else {}
    ref = pk.get("tf32") or pk.get("fp32")
    proj = [[x["setting"], str(x["steps"]), str(x["restarts"]), str(x["batch"]), fmt(x.get("eager")),
             fmt(x.get("graphs")), ratio(x.get("graphs"), x.get("eager")),
             fmt(max(x.get("eager_flops") or 0.0, x.get("graphs_flops") or 0.0) / 1e12, ".3f"),
             ratio(max(x.get("eager_flops") or 0.0, x.get("graphs_flops") or 0.0), ref)]
            for x in _rows(r.get("projection"))]  # fmt: skip
    onnx_rows = [[x["classifier"], str(x["batch"]), fmt(x.get("cpu")), fmt(x.get("cuda")),
                  ratio(x.get("cuda"), x.get("cpu"))] for x in _rows(r.get("onnx"))]  # fmt: skip
    http_rows = [[str(x["concurrency"]), str(x["requests"]), fmt(x["req_s"]), fmt(x["p50_ms"], ".0f"),
                  fmt(x["p99_ms"], ".0f"), fmt(x["merged"]), fmt(x["direct_img_s"]), fmt(x["ratio"], ".2f")]
                 for x in _rows(r.get("http"))]  # fmt: skip
    peaks = ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in pk.items()) or json.dumps(r.get("peak"))
    return "\n".join([
        f"# bench/gpu.py on {env['device']}\n",
        f"torch {env['torch']} (CUDA {env['cuda']}), onnxruntime {env['onnxruntime']} {env['ort_providers']}, "
        f"TF32 convolutions {env['tf32_conv']}; {'dry run' if r['dry_run'] else 'full run'}, {r['seconds']:.0f} s\n",
        f"## CUDA tests\n\n{json.dumps(r.get('tests'))}\n",
        f"## Dense matmul peak\n\n{peaks} (the FLOP/s column's reference: TF32 where measured)\n",
        table("Projection (Engine.purify, transfers included)",
              ["setting", "L", "R", "batch", "eager img/s", "graphs img/s", "graphs/eager", "TFLOP/s (best)",
               "of peak"], proj, r.get("projection")),
        table("ONNX Runtime classifiers", ["classifier", "batch", "CPU img/s", "CUDA img/s", "CUDA/CPU"], onnx_rows,
              r.get("onnx")) + "".join(sorted({f"\nCUDA n/a: {x['cuda_note']}\n" for x in _rows(r.get("onnx"))
                                               if "cuda_note" in x})),
        table("HTTP /v1/classify against the engine called directly",
              ["clients", "requests", "req/s", "p50 ms", "p99 ms", "merged", "direct img/s", "HTTP/direct"],
              http_rows, r.get("http")),
    ])  # fmt: skip


def _rows(section: object) -> list[dict]:
    return section if isinstance(section, list) else []


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for gpu.json and gpu.md")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (batch 1 and 4, few steps): runs on CPU")
    p.add_argument("--timeout", type=float, default=450.0, help="seconds for the whole run (sections stop there)")
    p.add_argument("--models-dir", type=Path, default=Settings().models_dir, help="default: MG_MODELS_DIR, models/")
    p.add_argument("--sections", default="tests,projection,peak,onnx,http")
    p.add_argument("--threads", type=int, default=None, help="CPU threads here and in the server (dry run: 1)")
    p.add_argument("--device", default="auto", help="torch's device: auto (CUDA when present), cuda or cpu")
    a = p.parse_args(argv)
    if a.threads or a.dry_run:
        torch.set_num_threads(a.threads or 1)  # tiny ops on a busy CPU: more threads only wait on each other
    t0 = time.monotonic()
    device = pick_device(a.device)
    if device.type != "cuda" and not a.dry_run:
        print("bench.gpu: no CUDA device here; run with --dry-run for the CPU check", file=sys.stderr)
        return 2
    plan, reg = Plan.make(a.dry_run), Registry(a.models_dir)
    run = Run(t0 + a.timeout, {"environment": environment(device), "dry_run": a.dry_run, "plan": plan.__dict__})
    jobs = {
        "tests": lambda: cuda_tests(min(run.left(), 240)),
        "projection": lambda: projection(reg, device, plan, run),
        "peak": lambda: peak(device, plan),
        "onnx": lambda: onnx(reg, plan),
        "http": lambda: http(reg, device, plan, run),
    }
    for name in a.sections.split(","):
        run.section(name, jobs[name])
    run.results["seconds"] = time.monotonic() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu.json").write_text(json.dumps(run.results, indent=1, default=float) + "\n")
    (a.out / "gpu.md").write_text(markdown(run.results))
    print(markdown(run.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
