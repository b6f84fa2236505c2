"""`python -m service [--host H] [--port P]`: verify the shipped models and serve the API with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from service.config import get_settings
from service.registry import ManifestError, Registry


def main(argv: list[str] | None = None) -> int:
    s = get_settings()
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    p.add_argument("--host", default=s.host, help=f"bind address (MG_HOST, default {s.host})")
    p.add_argument("--port", type=int, default=s.port, help=f"port (MG_PORT, default {s.port})")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        Registry(s.models_dir)  # fail fast, with the full list of problems, before binding the port
    except ManifestError as exc:
        print(f"manifold-guard: refusing to start: {exc}", file=sys.stderr)
        return 2
    from service.api.app import create_app

    uvicorn.run(create_app(s), host=a.host, port=a.port, log_level=a.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
