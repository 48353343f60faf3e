#!/usr/bin/env bash
# The README's main command: install, fetch MNIST (MD5-checked; a no-op once it is there),
# then run the paper's MNIST experiment on the quick preset (<= 10 min on 2 cores).
# Extra arguments go to `kdfast mnist` (e.g. --preset paper, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh >/dev/null
VENV=${KDFAST_VENV:-.venv}
# Idle OpenMP threads sleep instead of spinning: on a 2-core machine shared with other jobs,
# spinning threads made training up to 10x slower; on an idle machine it costs a few percent.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
"$VENV/bin/kdfast" data mnist
exec "$VENV/bin/kdfast" mnist --preset quick "$@"
