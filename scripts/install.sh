#!/usr/bin/env bash
# Install lowrank (editable) with the given extras into the current Python.
# Where torch is missing, install the CPU build 2.13.0 first: an unpinned torch would pull
# a multi-GB CUDA build. Elsewhere, point pip at the CPU wheels with
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# Usage: bash scripts/install.sh [extras]   (default: test; e.g. examples, test,examples)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet -e ".[${1:-test}]"
