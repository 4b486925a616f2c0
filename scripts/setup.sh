#!/usr/bin/env bash
# Create .venv (once) and install adapterhub with the given extras, torch pinned to the local CPU build.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh demo   or   scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: every later install sees it satisfied and pulls no CUDA wheels
.venv/bin/python -m pip install -q -c scripts/constraints.txt "torch==2.13.0"
target="."
[ -n "$extras" ] && target=".[$extras]"
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e "$target"
