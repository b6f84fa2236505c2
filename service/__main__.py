"""`python -m service [--host H] [--port P]`: verify the shipped models and serve the API with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.config import get_settings
from service.registry import ManifestError, Registry


def main(argv: list[str] | None = None) -> int:
    try:
        s = get_settings()
    except (ValidationError, SettingsError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        print(f"manifold-guard: bad setting: {' '.join(first[:3])}", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    p.add_argument("--host", default=s.host, help=f"bind address (MG_HOST, default {s.host})")
    p.add_argument("--port", type=int, default=s.port, help=f"port (MG_PORT, default {s.port})")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # fail fast, with the full list of problems, before binding the port
        Registry(s.models_dir, ranking=s.default_ranking)
    except ManifestError as exc:
        print(f"manifold-guard: refusing to start: {exc}", file=sys.stderr)
        return 2
    from service.api.server import serve

    serve(s, a.host, a.port, a.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
