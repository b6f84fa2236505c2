"""The HTTP layer: thin FastAPI routes (v1: classify, purify, detect; v2: Open Inference Protocol; attack)."""

from service.api.app import create_app

__all__ = ["create_app"]
