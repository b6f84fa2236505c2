# Manifold Guard: the service on the shipped models.
#   docker build -t manifold-guard .                        CPU (default target)
#   docker build --target gpu -t manifold-guard:gpu .       CUDA: onnxruntime-gpu, torch on the GPU
# Both run the README's setup (scripts/setup.sh: torch==2.13.0 first, then the project), then `python -m service`.

# ---- CUDA ----------------------------------------------------------------------------------------------
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS gpu
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN PYTHON=python3 scripts/setup.sh --gpu
ENV PATH=/app/.venv/bin:$PATH MG_HOST=0.0.0.0 MG_PORT=8000 MG_DEVICE=cuda PYTHONUNBUFFERED=1
EXPOSE 8000
USER nobody
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]

# ---- CPU (default) -------------------------------------------------------------------------------------
FROM python:3.11-slim AS cpu
WORKDIR /app
COPY . /app
RUN scripts/setup.sh
ENV PATH=/app/.venv/bin:$PATH MG_HOST=0.0.0.0 MG_PORT=8000 MG_DEVICE=cpu PYTHONUNBUFFERED=1
EXPOSE 8000
USER nobody
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
