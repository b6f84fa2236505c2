"""Docker files without a Docker engine: compose validates (`docker-compose config`), the Dockerfile's layout holds
(CPU last on a BASE_IMAGE argument, deps before source, no pip cache, pip's CA only as a secret, numeric user, /readyz
health), and the CPU stage's pip commands resolve in a clean venv to the CPU torch build and nothing else of torch
or CUDA. The image itself is built and run by tests/test_container.py (marker `container`)."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = shutil.which("docker-compose")
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# what reaches this machine in place of PyTorch's CPU index: PyPI, with pip's find-links holding the CPU wheel
TEST_TORCH_INDEX = os.environ.get("MG_TEST_TORCH_INDEX_URL", "https://pypi.org/simple")

sys.path.insert(0, str(ROOT / "scripts"))
from requirements import requirements  # noqa: E402


def compose(*args: str, env: dict[str, str] | None = None) -> str:
    assert COMPOSE is not None
    proc = subprocess.run([COMPOSE, "-f", str(ROOT / "docker-compose.yml"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def stages(text: str = DOCKERFILE) -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions, (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instr, _, rest = line.strip().partition(" ")
        if instr == "FROM":
            current = out.setdefault(rest.split(" AS ")[1].strip(), [])
        current.append((instr, rest.strip()))
    return out


RUN_FLAGS = re.compile(r"^((?:--\S+\s+)*)(.*)$", re.S)  # RUN --mount=... COMMAND


def pip_runs(stage: list[tuple[str, str]], flags: bool = False) -> list[str]:
    """The stage's RUN commands that call pip install: the shell command (`flags`: the RUN flags instead)."""
    runs = [RUN_FLAGS.match(rest).groups() for instr, rest in stage if instr == "RUN" and "pip install" in rest]
    return [f.strip() if flags else cmd for f, cmd in runs]


def arg_defaults(stage: list[tuple[str, str]]) -> dict[str, str]:
    return dict(rest.split("=", 1) for instr, rest in stage if instr == "ARG" and "=" in rest)


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed (apt-get install -y docker-compose)")
def test_compose_config_is_valid() -> None:
    out = compose("config")
    assert re.search(r"manifold-guard:\n(.*\n)*?\s+target: cpu", out)
    assert "http://127.0.0.1:8000/readyz" in out and "/healthz" not in out
    assert "TORCH_INDEX_URL: https://download.pytorch.org/whl/cpu" in out
    mirror = compose("config", env={"TORCH_INDEX_URL": "https://mirror.example/whl/cpu"})
    assert "TORCH_INDEX_URL: https://mirror.example/whl/cpu" in mirror
    gpu = compose("--profile", "gpu", "config")
    assert "driver: nvidia" in gpu and "capabilities:\n" in gpu and "- gpu" in gpu
    assert "MG_DEVICE: cuda" in gpu


def test_compose_rejects_a_broken_file(tmp_path: Path) -> None:
    if COMPOSE is None:
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose)")
    bad = tmp_path / "docker-compose.yml"
    bad.write_text((ROOT / "docker-compose.yml").read_text().replace("    ports:\n", "    portz:\n", 1))
    proc = subprocess.run([COMPOSE, "-f", str(bad), "config"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "portz" in proc.stderr


def test_dockerfile_layers_user_and_health() -> None:
    s = stages()
    assert list(s) == ["gpu", "cpu"], "cpu must be the last stage: the default `docker build` target"
    assert arg_defaults(s["cpu"])["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # the CPU stage's base is a build argument (a registry-less build imports its own: scripts/container-base.sh)
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", DOCKERFILE, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS cpu$", DOCKERFILE, re.M)
    for name, stage in s.items():
        runs = pip_runs(stage)
        assert runs and all("--no-cache-dir" in r for r in runs), (name, runs)
        assert "torch==$TORCH_VERSION" in runs[0] and "--index-url" in runs[0], "torch first, from the named index"
        first_source = next(i for i, (instr, rest) in enumerate(stage) if instr == "COPY" and "service/" in rest)
        last_pip = max(i for i, (instr, rest) in enumerate(stage) if instr == "RUN" and "pip install" in rest)
        assert last_pip < first_source, f"{name}: dependencies must be installed before the source is copied"
        users = [rest for instr, rest in stage if instr == "USER"]
        assert users and all(re.fullmatch(r"\d+(:\d+)?", u) and not u.startswith("0") for u in users), users
        health = " ".join(rest for instr, rest in stage if instr == "HEALTHCHECK")
        assert "/readyz" in health, name
        # pip's CA bundle (an intercepting proxy) only as a BuildKit secret, mounted while pip runs: never a layer
        assert all("--mount=type=secret,id=pip_cert" in f for f in pip_runs(stage, flags=True)), name
        assert not [r for i, r in stage if i in ("COPY", "ADD") and re.search(r"\.(crt|pem)\b|cert", r)], name
    assert "--gpu" in pip_runs(s["gpu"])[1] and "--gpu" not in pip_runs(s["cpu"])[1]


def test_the_image_copies_everything_the_service_imports() -> None:
    """The images copy service/ and models/ only: nothing in service/ may import another of the repo's packages."""
    copied = {rest.split()[0].rstrip("/") for instr, rest in stages()["cpu"] if instr == "COPY"}
    assert {"service", "models"} <= copied
    ours = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()} | {"bench", "tests"}
    for path in (ROOT / "service").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                top = name.split(".")[0]
                assert top not in ours - {"service"}, f"{path.relative_to(ROOT)} imports {name}"


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    """.dockerignore is an allowlist (`*`, then `!path`): every COPY source must be let back in."""
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()[:1] not in ("", "#")]
    assert "*" in lines
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    for name, stage in stages().items():
        for instr, rest in stage:
            if instr == "COPY" and not rest.startswith("--from"):
                src = rest.split()[0].rstrip("/")
                assert src in allowed, f"{name}: COPY {src} is not let back in by .dockerignore ({sorted(allowed)})"


def test_requirements_swap_onnxruntime_for_the_gpu_build() -> None:
    cpu = requirements(ROOT / "pyproject.toml", [], gpu=False)
    gpu = requirements(ROOT / "pyproject.toml", [], gpu=True)
    assert any(r.startswith("onnxruntime>") for r in cpu) and not any("onnxruntime-gpu" in r for r in cpu)
    assert any(r.startswith("onnxruntime-gpu") for r in gpu) and not any(r.startswith("onnxruntime>") for r in gpu)
    assert any(r.startswith("torch") for r in cpu)  # satisfied by the torch installed first, never replaced


def resolve(cmd: str, venv: Path, cwd: Path, env: dict[str, str], report: Path) -> list[dict[str, str]]:
    """Run a Dockerfile `RUN ... pip install ...` in `venv` as a dry run; what pip would install (name, version)."""
    cmd = cmd.replace("pip install", f"pip install --quiet --dry-run --report {report}", 1)
    full = {**os.environ, **env, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    proc = subprocess.run(["sh", "-c", cmd], cwd=cwd, env=full, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    items = json.loads(report.read_text())["install"]
    return [{"name": i["metadata"]["name"].lower(), "version": i["metadata"]["version"]} for i in items]


def test_the_cpu_stage_pip_commands_resolve_in_a_clean_venv(tmp_path: Path) -> None:
    """The CPU stage's own commands, with its build arguments (the torch index replaced by what reaches here): the
    torch step picks the CPU build, and the requirements step, run with that torch, adds no other torch and nothing
    of CUDA (dry runs: resolution only, nothing downloaded beyond metadata)."""
    stage = stages()["cpu"]
    for instr, rest in stage:  # the files the stage copies before its pip commands
        if instr == "COPY" and rest.split()[0] in ("pyproject.toml", "scripts/requirements.py"):
            src, dst = rest.split()
            if dst.endswith("/"):
                (tmp_path / dst).mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / src, tmp_path / dst)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {**arg_defaults(stage), "TORCH_INDEX_URL": TEST_TORCH_INDEX}
    torch_step, deps_step = pip_runs(stage)
    picked = resolve(torch_step, venv, tmp_path, env, tmp_path / "torch.json")
    torch = next(p for p in picked if p["name"] == "torch")
    assert torch["version"] == env["TORCH_VERSION"] + "+cpu", picked
    assert not [p for p in picked if p["name"].startswith(("nvidia-", "triton"))], picked
    (tmp_path / "torch.txt").write_text(f"torch=={torch['version']}\n")  # as installed by the previous layer
    deps = resolve(deps_step, venv, tmp_path, {**env, "PIP_CONSTRAINT": str(tmp_path / "torch.txt")},
                   tmp_path / "deps.json")  # fmt: skip
    names = {p["name"]: p["version"] for p in deps}
    assert names.get("torch") == torch["version"], "the requirements step must keep the CPU torch"
    assert {"onnxruntime", "fastapi", "uvicorn", "safetensors"} <= set(names) and "onnxruntime-gpu" not in names
    assert not [n for n in names if n.startswith(("nvidia-", "triton"))], names
