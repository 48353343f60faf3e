#!/usr/bin/env bash
# CI step: the LibTorch (CMake) build. Configures and builds the `kdfast` shared library
# against the torch in the venv, installs it into a staging prefix, builds examples/cpp
# against that install (find_package(kdfast)) and runs it: the example checks the C++ entry
# point's loss and gradient against a float64 autograd reference and exits 1 on a mismatch.
# Run from anywhere; needs the venv with torch (scripts/test.sh makes it; KDFAST_VENV picks
# another one). Out of tree: everything goes to ${KDFAST_CMAKE_BUILD:-build/cmake}.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${KDFAST_VENV:-.venv}
BUILD=${KDFAST_CMAKE_BUILD:-build/cmake}
JOBS=${KDFAST_CMAKE_JOBS:-2}
case "$BUILD" in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac

step_start=0
step() { step_start=$(date +%s); echo "-- $*"; }
done_step() { echo "-- done in $(( $(date +%s) - step_start )) s"; }
total_start=$(date +%s)

TORCH_PREFIX=$("$VENV/bin/python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
echo "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') at $TORCH_PREFIX"
cmake --version | head -n 1

rm -rf "$BUILD"
step "configure the library ($BUILD/lib)"
cmake -S "$ROOT" -B "$BUILD/lib" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$TORCH_PREFIX"
done_step

step "build the library (-j$JOBS)"
cmake --build "$BUILD/lib" -j "$JOBS"
done_step

step "install into $BUILD/install"
cmake --install "$BUILD/lib" --prefix "$BUILD/install"
done_step

step "configure + build examples/cpp against the installed package"
cmake -S "$ROOT/examples/cpp" -B "$BUILD/example" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$BUILD/install;$TORCH_PREFIX"
if [ -d "$BUILD/example/kdfast" ]; then
  echo "examples/cpp did not find the installed kdfast package (it fell back to add_subdirectory)" >&2
  exit 1
fi
cmake --build "$BUILD/example" -j "$JOBS"
done_step

# No LD_LIBRARY_PATH: the example and libkdfast.so carry torch's lib dir on their rpath.
step "run the example (CPU row loops: best ISA, then baseline)"
"$BUILD/example/kdfast_example"
KDFAST_CPU_ISA=baseline "$BUILD/example/kdfast_example"
done_step

echo "cmake build OK in $(( $(date +%s) - total_start )) s"
