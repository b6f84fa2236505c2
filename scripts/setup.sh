#!/usr/bin/env bash
# Set up Manifold Guard in ./.venv on a fresh machine.
#   scripts/setup.sh          runtime: torch 2.13.0 (CPU wheel) first, then the project
#   scripts/setup.sh --dev    also the test and training tools, and Ray Serve (the .[ray] extra)
#   scripts/setup.sh --gpu    onnxruntime-gpu instead of onnxruntime (never both installed)
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0; gpu=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    --gpu) gpu=1 ;;
    *) echo "usage: scripts/setup.sh [--dev] [--gpu]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned: its CPU wheel is what the project's range resolves to without pulling a CUDA build;
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes it from PyTorch's CPU index (as the CPU image does)
pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
extras=""
[ "$dev" = 1 ] && extras="dev,test,ray"  # one pip command: one resolution over every extra
if [ "$gpu" = 1 ]; then
  pip install -q -e ".[${extras:+$extras,}train]"
  pip uninstall -q -y onnxruntime || true
  pip install -q "onnxruntime-gpu>=1.17"
else
  pip install -q -e ".${extras:+[$extras]}"
fi
if [ "$dev" = 1 ]; then
  # test-only reference implementation of FGSM/PGD; its declared dependencies (torchvision, ...) are not needed
  pip install -q --no-deps "torchattacks==3.5.1"
  # validates docker-compose.yml without a Docker engine (Debian's docker-compose 1.29)
  if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq docker-compose) >/dev/null 2>&1 || echo "note: docker-compose not installed"
  fi
fi
python -c "import torch, onnxruntime; print('torch', torch.__version__, '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
