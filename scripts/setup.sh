#!/usr/bin/env bash
# Create .venv (once) and install adapterhub with the given extras, torch pinned to the local CPU build.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh demo   or   scripts/setup.sh test
#
# For `test`: if the package registries cannot serve every test dependency (a machine without
# network), each one is installed on its own and the ones that could not be are listed in
# .venv/missing-test-deps.txt; tests needing them say so in their skip reason (pytest -ra). Any
# other failure stops the setup.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip=(.venv/bin/python -m pip install -q -c scripts/constraints.txt)
# torch first and pinned: every later install sees it satisfied and pulls no CUDA wheels
"${pip[@]}" "torch==2.13.0"
if [ "$extras" != "test" ]; then
  target="."
  [ -n "$extras" ] && target=".[$extras]"
  "${pip[@]}" -e "$target"
  exit 0
fi
rm -f .venv/missing-test-deps.txt
if "${pip[@]}" --retries 2 -e ".[test]"; then
  exit 0
fi
echo "setup: the package registries could not serve every test dependency; installing them one by one" >&2
"${pip[@]}" -e .
missing=()
while IFS= read -r req; do
  "${pip[@]}" --retries 0 "$req" >/dev/null 2>&1 || missing+=("$req")
done < <(.venv/bin/python -c '
import tomllib
for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]:
    print(r)')
printf '%s\n' "${missing[@]}" > .venv/missing-test-deps.txt
for need in pytest peft transformers ruff; do
  if grep -q "^$need\b" .venv/missing-test-deps.txt; then
    echo "setup: cannot install $need, which every test needs; fix: run again where PyPI is reachable" >&2
    exit 1
  fi
done
echo "setup: NOT INSTALLED (tests needing them skip, naming them): ${missing[*]:-none}" >&2
