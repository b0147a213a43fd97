#!/usr/bin/env bash
# Set up (if needed) and run the founding walkthrough on full MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
netshrink demo "$@"
