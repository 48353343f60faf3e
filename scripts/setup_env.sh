#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and the test tools, then builds kdfast in it.
# Idempotent: a second run rebuilds the extension only when its inputs changed
# (scripts/build_stamp.py).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KDFAST_VENV:-.venv}
TORCH_SPEC=${KDFAST_TORCH:-torch==2.13.0}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade "setuptools>=64" wheel
"$VENV/bin/pip" install -q "$TORCH_SPEC" ninja numpy pytest expecttest hypothesis ruff tqdm \
  pytest-benchmark matplotlib scikit-learn
# Against the torch just installed: an isolated build would fetch another multi-GB torch.
# Skipped (minutes saved) when the build stamp says csrc/, setup.py, pyproject.toml, torch and
# the build environment are unchanged since the module in place was built.
if ! "$VENV/bin/python" scripts/build_stamp.py check --root . --venv "$VENV"; then
  "$VENV/bin/pip" install -q -e . --no-build-isolation
  "$VENV/bin/python" scripts/build_stamp.py record --root . --venv "$VENV"
fi
# The optional LM extra (transformers, gguf, accelerate, safetensors; about a minute of
# downloads the first time), so that CI runs the tests needing it. Its requirements are read
# from pyproject.toml (one place) and installed without reinstalling kdfast.
"$VENV/bin/python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))
  ["project"]["optional-dependencies"]["lm"]))' > "$VENV/lm-requirements.txt"
"$VENV/bin/pip" install -q -r "$VENV/lm-requirements.txt"
"$VENV/bin/python" -c "import kdfast, json; print(json.dumps(kdfast.build_info()))"
