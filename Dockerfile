# Manifold Guard: the service on the shipped models.
#   docker build -t manifold-guard .                        CPU (the default: the last stage)
#   docker build --target gpu -t manifold-guard:gpu .       CUDA: onnxruntime-gpu, torch on the GPU
# Build arguments: TORCH_INDEX_URL (CPU stage; default PyTorch's CPU wheel index, so no CUDA build enters the image;
# a mirror of it works too), TORCH_GPU_INDEX_URL (GPU stage; default PyPI, whose Linux torch wheel is the CUDA
# build), TORCH_VERSION. torch goes in first, then the project's requirements from pyproject.toml
# (scripts/requirements.py), both before the source is copied: editing the source rebuilds only the last layers.
# The image runs as the numeric user 10001 (Kubernetes' runAsNonRoot accepts it) and reports healthy once /readyz
# answers 200 (models verified, loaded and warmed).

# ---- CUDA -------------------------------------------------------------------------------------------------------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS gpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_GPU_INDEX_URL=https://pypi.org/simple
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HOME=/tmp
WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_GPU_INDEX_URL" "torch==$TORCH_VERSION"
COPY pyproject.toml ./
COPY scripts/requirements.py scripts/
RUN python scripts/requirements.py --gpu | pip install --no-cache-dir -r /dev/stdin
COPY models/ models/
COPY service/ service/
ENV MG_HOST=0.0.0.0 MG_PORT=8000 MG_DEVICE=cuda MG_MODELS_DIR=/app/models
EXPOSE 8000
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=3)"]
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]

# ---- CPU (default) ----------------------------------------------------------------------------------------------
FROM python:3.11-slim AS cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HOME=/tmp
WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
COPY pyproject.toml ./
COPY scripts/requirements.py scripts/
RUN python scripts/requirements.py | pip install --no-cache-dir -r /dev/stdin
COPY models/ models/
COPY service/ service/
ENV MG_HOST=0.0.0.0 MG_PORT=8000 MG_DEVICE=cpu MG_MODELS_DIR=/app/models
EXPOSE 8000
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=3)"]
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
