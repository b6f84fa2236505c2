# Manifold Guard: the service on the shipped models.
#   docker build -t manifold-guard .                        CPU (the default: the last stage)
#   docker build --target gpu -t manifold-guard:gpu .       CUDA: onnxruntime-gpu, torch on the GPU
# BuildKit builds it (Docker >= 23 by default; DOCKER_BUILDKIT=1 on Docker 20.10): it builds only the stages the
# target needs and mounts the pip_cert secret below. Build arguments: TORCH_INDEX_URL (CPU stage; default PyTorch's
# CPU wheel index, so no CUDA build enters the image; a mirror of it works too), TORCH_GPU_INDEX_URL (GPU stage;
# default PyPI, whose Linux torch wheel is the CUDA build), TORCH_VERSION; BASE_IMAGE (CPU stage; default
# python:3.11-slim; a base without python, e.g. Debian made by scripts/container-base.sh, gets Debian's python3 and
# python3-venv with apt first); PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST (pip's own
# settings, for a mirror; unset by default; build arguments are recorded in the image's history, so no credentials
# in them). Behind a TLS-intercepting proxy give pip its CA bundle as a secret:
#   docker build --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt -t manifold-guard .
# (mounted only while pip runs: never in a layer). torch goes in first, then the project's requirements from
# pyproject.toml (scripts/requirements.py), both before the source is copied: editing the source rebuilds only the
# last layers. The image runs as the numeric user 10001 (Kubernetes' runAsNonRoot accepts it) and reports healthy
# once /readyz answers 200 (models verified, loaded and warmed).
ARG BASE_IMAGE=python:3.11-slim

# ---- CUDA -------------------------------------------------------------------------------------------------------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS gpu
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HOME=/tmp
WORKDIR /app
ARG TORCH_VERSION=2.13.0
ARG TORCH_GPU_INDEX_URL=https://pypi.org/simple
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
RUN --mount=type=secret,id=pip_cert { [ ! -s /run/secrets/pip_cert ] || export PIP_CERT=/run/secrets/pip_cert; } \
    && pip install --no-cache-dir --index-url "$TORCH_GPU_INDEX_URL" "torch==$TORCH_VERSION"
COPY pyproject.toml ./
COPY scripts/requirements.py scripts/
RUN --mount=type=secret,id=pip_cert { [ ! -s /run/secrets/pip_cert ] || export PIP_CERT=/run/secrets/pip_cert; } \
    && python scripts/requirements.py --gpu | pip install --no-cache-dir -r /dev/stdin
COPY models/ models/
COPY service/ service/
# the query-attack detector's kernels (numba) compiled at build time; the cache stays writable (numba checks that)
ENV NUMBA_CACHE_DIR=/app/.numba
RUN python -c "from service.guard import kernels; kernels.warm()" && chmod -R a+rwX /app/.numba
ENV MG_HOST=0.0.0.0 MG_PORT=8000 MG_DEVICE=cuda MG_MODELS_DIR=/app/models
EXPOSE 8000
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=3)"]
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]

# ---- CPU (default) ----------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS cpu
# python3 with venv from the base (python:3.11-slim), else Debian's (apt; the lists are removed again)
RUN { python3 -c "import ensurepip, venv" 2>/dev/null || { apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; }; } \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HOME=/tmp
WORKDIR /app
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
RUN --mount=type=secret,id=pip_cert { [ ! -s /run/secrets/pip_cert ] || export PIP_CERT=/run/secrets/pip_cert; } \
    && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
COPY pyproject.toml ./
COPY scripts/requirements.py scripts/
RUN --mount=type=secret,id=pip_cert { [ ! -s /run/secrets/pip_cert ] || export PIP_CERT=/run/secrets/pip_cert; } \
    && python scripts/requirements.py | pip install --no-cache-dir -r /dev/stdin
COPY models/ models/
COPY service/ service/
# the query-attack detector's kernels (numba) compiled at build time; the cache stays writable (numba checks that)
ENV NUMBA_CACHE_DIR=/app/.numba
RUN python -c "from service.guard import kernels; kernels.warm()" && chmod -R a+rwX /app/.numba
ENV MG_HOST=0.0.0.0 MG_PORT=8000 MG_DEVICE=cpu MG_MODELS_DIR=/app/models
EXPOSE 8000
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=3)"]
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
