"""Child processes of the end-to-end tests: the project's one helper for servers on loopback, at a lower priority."""

from __future__ import annotations

from pathlib import Path

from training.processes import Child, free_port

__all__ = ["Proc", "free_port"]


class Proc(Child):
    """A test's child process (nice 10, so the test runner and the servers it drives keep their share)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(args, log, env, nice=10)

    def stop(self, grace_s: float = 10.0) -> None:
        super().stop(grace_s)
