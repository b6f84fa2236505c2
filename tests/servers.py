"""The end-to-end tests' server: `python -m service` (uvicorn) on a free loopback port, with small caps.

    models, real = e2e_models(tmp / "models")         # tiny models, the shipped MNIST ones copied over where present
    with Server.running(models, real, MG_X="1") as srv:  # started and ready; stopped on leaving
        httpx.get(srv.url + "/v1/models")

The process is a `procs.Proc` (a lower priority, its output in a log file whose tail a failed start reports).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import MODELS, ROOT, write_tiny_models
from procs import Proc, free_port

STEPS, RESTARTS, UPLOAD_CAP = 3, 2, 200_000


def shipped(key: str) -> dict | None:
    path = MODELS / "manifest.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["artifacts"].get(key)


def e2e_models(dst: Path) -> tuple[Path, bool]:
    """Tiny models, with the shipped MNIST artifacts copied over them where present. Returns (dir, real_classifier)."""
    write_tiny_models(dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    real = False
    keys = ["mnist/classifier_A"]
    if shipped("mnist/generator") and shipped("mnist/encoder"):
        keys += ["mnist/generator", "mnist/encoder"]
    for key in keys:
        entry = shipped(key)
        if entry is None:
            continue
        for f in entry["files"].values():
            (dst / f["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(MODELS / f["path"], dst / f["path"])
        manifest["artifacts"][key] = entry
        real |= key == "mnist/classifier_A"
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst, real


class Server:
    """`python -m service` on CPU over `models` (`real`: its classifier A is the shipped one), with `env_overrides`
    over the test caps below."""

    def __init__(self, models: Path, real: bool, **env_overrides: str) -> None:
        self.models, self.real = models, real
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {"PYTHONPATH": str(ROOT), "MG_MODELS_DIR": str(models), "MG_DEVICE": "cpu",
               "MG_TORCH_THREADS": "1", "MG_DEFAULT_STEPS": str(STEPS), "MG_DEFAULT_RESTARTS": str(RESTARTS),
               "MG_ENCODER_STEPS": "2", "MG_MAX_STEPS": "50", "MG_MAX_RESTARTS": "4", "MG_MAX_WAIT_MS": "100",
               "MG_FAST_WAIT_MS": "100",
               "MG_MAX_UPLOAD_BYTES": str(UPLOAD_CAP), "MG_MAX_BATCH_SIZE": "64", **env_overrides}  # fmt: skip
        log = Path(tempfile.mkdtemp(prefix="mg-server-")) / "server.log"
        args = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port), "--log-level",
                "warning"]  # fmt: skip
        self._child = Proc(args, log, env)

    @property
    def proc(self) -> subprocess.Popen:
        return self._child.p

    def wait_ready(self, limit_s: float = 180) -> None:
        """Until /readyz answers 200 (RuntimeError with the log's tail if the server exits or time runs out)."""
        self._child.wait_http(self.url + "/readyz", limit_s)

    def stop(self) -> None:
        self._child.stop(20)

    @classmethod
    @contextmanager
    def running(cls, models: Path, real: bool, **env_overrides: str) -> Iterator[Server]:
        """A started, ready server; stopped on leaving."""
        srv = cls(models, real, **env_overrides)
        try:
            srv.wait_ready()
            yield srv
        finally:
            srv.stop()
