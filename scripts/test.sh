#!/usr/bin/env bash
# Set up the test environment and run the whole suite (what .ci/run calls).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
if scripts/setup_adapters_env.sh; then
  # the `adapters`-library oracle is installed: its tests must run, never skip
  export ADAPTERHUB_REQUIRE_ADAPTERS_ORACLE=1
else
  echo "setup: NOT INSTALLED: the \`adapters\` library oracle (.venv-adapters); its tests skip" >&2
  [ -L .venv-adapters ] || rm -rf .venv-adapters
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check adapterhub tests bench
.venv/bin/python -m pytest -q "$@"
