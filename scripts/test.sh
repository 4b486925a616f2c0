#!/usr/bin/env bash
# Set up the test environment and run the whole suite (what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
scripts/setup_adapters_env.sh
export ADAPTERHUB_REQUIRE_ADAPTERS_ORACLE=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check adapterhub tests bench
.venv/bin/python -m pytest -q "$@"
