"""Docker files: compose validates (docker-compose config, no engine needed) and the images use the README's setup."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = shutil.which("docker-compose")


def compose(*args: str) -> str:
    assert COMPOSE is not None
    proc = subprocess.run([COMPOSE, "-f", str(ROOT / "docker-compose.yml"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose is not installed (apt-get install -y docker-compose)")
def test_compose_config_is_valid() -> None:
    out = compose("config")
    assert re.search(r"manifold-guard:\n(.*\n)*?\s+target: cpu", out)
    assert "http://127.0.0.1:8000/healthz" in out
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


def test_dockerfile_runs_the_readme_setup_and_the_service() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, flags=re.M)
    assert stages == ["gpu", "cpu"], "cpu must be the last stage: the default `docker build` target"
    assert "RUN PYTHON=python3 scripts/setup.sh --gpu" in text and "RUN scripts/setup.sh\n" in text
    assert text.count('CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]') == 2
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "pip install -q torch==2.13.0" in setup  # torch first, pinned, as the README says
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()
