"""Child servers on loopback: the evaluations, benchmarks and end-to-end tests start real processes through this."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's choice)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Child:
    """A child process run from the repository root with its output in `log`; `stop()` ends it (and only it).

    `nice` lowers its priority (tests beside a busy machine); `env` is added to this process's environment.
    """

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, nice: int = 0) -> None:
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._f = log.open("wb")
        prefix = ["nice", "-n", str(nice)] if nice else []
        self.p = subprocess.Popen([*prefix, *args], cwd=ROOT, stdout=self._f, stderr=subprocess.STDOUT,
                                  env={**os.environ, **(env or {})})  # fmt: skip

    def wait_http(self, url: str, timeout_s: float = 180.0) -> None:
        """Poll `url` until it answers 200; RuntimeError (with the log's tail) if the process exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{url}: the process exited\n{self.tail()}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{url} not ready after {timeout_s:g} s\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM (uvicorn and KServe drain on it), SIGKILL after `grace_s`."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._f.close()


class Server(Child):
    """A child HTTP server on `port`, ready (its `ready` path answers 200) when the constructor returns."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str], ready: str, port: int,
                 timeout_s: float = 300.0) -> None:  # fmt: skip
        super().__init__(args, log, env)
        self.url = f"http://127.0.0.1:{port}"
        try:
            self.wait_http(self.url + ready, timeout_s)
        except RuntimeError:
            self.stop()
            raise
