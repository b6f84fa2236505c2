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
  # system packages: docker-compose validates docker-compose.yml without a Docker engine (Debian's 1.29);
  # chromium and chromium-driver run the page's browser tests (tests/test_page.py; no browser download);
  # docker.io and debootstrap build and run the image in a private engine (tests/test_container.py)
  apt_pkgs=""
  command -v docker-compose >/dev/null 2>&1 || apt_pkgs="docker-compose"
  [ -x /usr/sbin/dockerd ] || apt_pkgs="$apt_pkgs docker.io"
  command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || apt_pkgs="$apt_pkgs debootstrap"
  { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || apt_pkgs="$apt_pkgs chromium chromium-driver"
  # redis-server: tests/test_guard.py starts one on a free loopback port (the shared per-client state)
  command -v redis-server >/dev/null 2>&1 || apt_pkgs="$apt_pkgs redis-server"
  if [ -n "$apt_pkgs" ] && [ "${MG_NO_APT:-0}" = 1 ]; then
    echo "note: MG_NO_APT=1, not installed:$apt_pkgs; tests/test_page.py skips without chromium, the Redis tests of tests/test_guard.py without redis-server"
  elif [ -n "$apt_pkgs" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing with apt-get:$apt_pkgs"
      # shellcheck disable=SC2086 # one word per package
      (apt-get update -qq && apt-get install -y -qq -o DPkg::Lock::Timeout=300 $apt_pkgs) >/dev/null 2>&1 \
        || echo "note: apt-get could not install:$apt_pkgs"
    else
      echo "note: not installed (needs root and apt-get):$apt_pkgs; tests/test_page.py skips without chromium, the Redis tests of tests/test_guard.py without redis-server"
    fi
  fi
  if [ -x /usr/bin/chromium ]; then echo "browser for the page's tests: $(/usr/bin/chromium --version 2>/dev/null)"; fi
fi
python -c "import torch, onnxruntime; print('torch', torch.__version__, '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"
