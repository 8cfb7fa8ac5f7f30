#!/usr/bin/env bash
# Install mnist-dist, its trackers, its test tools and the benchmark's contenders into ./.venv
# (idempotent; about a minute).
#   bash launch/setup.sh && .venv/bin/mnist-dist train
# torch is pinned here, not resolved by pip from the dependency range, because an unpinned torch
# pulls a multi-GB CUDA build; set MNIST_DIST_TORCH to install another build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -z "${MNIST_DIST_TORCH:-}" ]; then
  case "$(uname -m)" in
    aarch64|arm64) MNIST_DIST_TORCH="torch==2.9.1 torchvision==0.24.1" ;;
    *) MNIST_DIST_TORCH="torch==2.14.1 torchvision==0.29.1" ;;
  esac
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# shellcheck disable=SC2086
"${pip[@]}" $MNIST_DIST_TORCH
"${pip[@]}" -e '.[test,bench]'
.venv/bin/mnist-dist --help >/dev/null
echo "installed: $(.venv/bin/python -c 'import torch, accelerate; print("torch", torch.__version__, "accelerate", accelerate.__version__)')"
