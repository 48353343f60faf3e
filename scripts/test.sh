#!/usr/bin/env bash
# The README's test command: install everything, lint, run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
VENV=${KDFAST_VENV:-.venv}
"$VENV/bin/ruff" check kdfast tests setup.py $([ -d benchmarks ] && echo benchmarks)
"$VENV/bin/python" -m pytest -q -ra --durations=15 tests "$@"
