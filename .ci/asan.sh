#!/usr/bin/env bash
# CI: the CPU kernels under AddressSanitizer. Builds kdfast._C with -fsanitize=address in a
# temporary copy of the tree (the checkout's own build is untouched), then runs the fuzz,
# dtype/ISA and error tests against it with libasan preloaded into python, so any
# out-of-bounds read or write in the row loops, the lane loops or the buffer pool fails CI.
# torch itself is not instrumented; leak checking is off (CPython and torch keep allocations
# alive until exit by design).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="$ROOT/${KDFAST_VENV:-.venv}/bin/python"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kdfast-asan.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)

cp -r csrc kdfast tests setup.py pyproject.toml "$WORK/"
rm -f "$WORK"/kdfast/_C*.so
(cd "$WORK" && KDFAST_CUDA=0 MAX_JOBS=2 CFLAGS="-fsanitize=address -fno-omit-frame-pointer" \
  LDFLAGS="-fsanitize=address" "$PY" setup.py -q build_ext --inplace > build.log 2>&1) \
  || { tail -n 40 "$WORK/build.log"; exit 1; }
echo "-- [asan] built in $(( $(date +%s) - start )) s"

# libstdc++ is preloaded too: python does not link it, and ASan's __cxa_throw interceptor must
# find the real one when it starts, or the first C++ exception (a TORCH_CHECK) aborts.
PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
cd "$WORK"
# python -m puts the working directory first on sys.path: the instrumented copy is imported.
LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 "$PY" -c \
  "import kdfast, sys; assert kdfast.__file__.startswith('$WORK'), kdfast.__file__; print('asan build:', kdfast.__file__)"
LD_PRELOAD="$PRELOAD" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 "$PY" -m pytest -q -x -p no:cacheprovider \
  tests/test_fuzz_api.py tests/test_dtypes_isa.py tests/test_errors.py tests/test_inplace.py \
  tests/test_buffer_pool.py tests/test_backward_buffer.py
echo "asan.sh passed in $(( $(date +%s) - start )) s"
