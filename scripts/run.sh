#!/usr/bin/env bash
# The README's main command: install, then run the main job on its embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh >/dev/null
VENV=${KDFAST_VENV:-.venv}
exec "$VENV/bin/kdfast" demo "$@"
