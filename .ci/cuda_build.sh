#!/usr/bin/env bash
# CI without a GPU: builds the CUDA kernels (KDFAST_CUDA=1) against a CUDA build of
# torch, checks that the module links and imports, that the CUDA kernels are registered, that
# the CPU path still works in that build, and that the module holds sm_80/sm_90 code + PTX.
# Nothing here runs a kernel on a GPU (tests/test_cuda.py does, where there is one); the CUDA
# row code runs on host threads in the default test suite (tests/test_cuda_host_sim.py).
#
# The build is out of tree (a copy of the working tree in a temporary directory, installed
# non-editable into .venv-cuda), so it never writes kdfast/_C*.so into the checkout, whose
# CPU build .venv uses.
#
# Env: KDFAST_CUDA_VENV (default .venv-cuda), KDFAST_CUDA_TORCH (default torch==2.14.1),
# KDFAST_CUDA_ARCHS (default "80;90", read by setup.py), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${KDFAST_CUDA_VENV:-.venv-cuda}
TORCH_SPEC=${KDFAST_CUDA_TORCH:-torch==2.14.1}
export MAX_JOBS=${MAX_JOBS:-2}
export KDFAST_CUDA_ARCHS=${KDFAST_CUDA_ARCHS:-80;90}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -n "${CUDA_HOME:-}" ]; then
  export PATH="$CUDA_HOME/bin:$PATH"
fi

script_start=$(date +%s)
step_start=$script_start
step() {
  local now
  now=$(date +%s)
  echo "-- [cuda_build] $1 (previous step $((now - step_start)) s, total $((now - script_start)) s)"
  step_start=$now
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kdfast-cuda-ci.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
trap 'echo "cuda_build.sh: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

step "venv $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch, ninja, numpy, setuptools" 2>/dev/null; then
  "$VENV/bin/pip" install -q "$TORCH_SPEC" ninja numpy "setuptools>=64"
fi
"$VENV/bin/python" - <<'EOF'
import torch
assert torch.version.cuda is not None, f"need a CUDA build of torch, got {torch.__version__}"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF
command -v nvcc >/dev/null || { echo "nvcc not found (set CUDA_HOME)"; exit 1; }
nvcc --version | tail -n 2

step "copy the working tree to $WORK/src (tracked + untracked, not ignored)"
mkdir -p "$WORK/src"
# Tracked and untracked-but-not-ignored files that exist (.gitignore keeps .venv*, build/ and
# *.so out): the uncommitted working tree is what gets built.
git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do if [ -f "$f" ]; then printf '%s\0' "$f"; fi; done |
  tar --null -T - -cf - | tar -xf - -C "$WORK/src"
ls "$WORK/src/csrc/cuda"

step "build + install (KDFAST_CUDA=1, archs $KDFAST_CUDA_ARCHS, MAX_JOBS=$MAX_JOBS)"
# Non-editable: the .so lands in the venv's site-packages, not in the checkout.
(cd "$WORK" && KDFAST_CUDA=1 "$ROOT/$VENV/bin/pip" install -q --no-build-isolation --no-deps \
  --force-reinstall "$WORK/src")

step "import check (from $WORK, outside the checkout)"
(cd "$WORK" && KDFAST_REPO="$ROOT" "$ROOT/$VENV/bin/python" - <<'EOF'
import json
import os

import torch

import kdfast

repo = os.path.realpath(os.environ["KDFAST_REPO"])
where = os.path.realpath(kdfast.__file__)
checkout_pkg = os.path.join(repo, "kdfast") + os.sep
assert not where.startswith(checkout_pkg), f"imported the checkout's kdfast ({where}), not the build"
info = kdfast.build_info()
print("kdfast from", os.path.dirname(where))
print("build_info:", json.dumps(info))
assert info.get("extension"), info
assert "cuda" in info["backends"], info
so = kdfast._ext._C.__file__
print("module:", so)
for op in ("kdfast::distill_fwd", "kdfast::distill_fwd_inplace", "kdfast::topk_targets"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), f"{op} has no {key} kernel"
print("CPU and CUDA kernels registered for distill_fwd, distill_fwd_inplace and topk_targets")
print("torch.cuda.is_available():", torch.cuda.is_available())

# The CPU path in this build: forward + backward against the pure-PyTorch reference.
gen = torch.Generator().manual_seed(0)
s = torch.randn(6, 10, generator=gen, requires_grad=True)
t = torch.randn(6, 10, generator=gen)
y = torch.randint(0, 10, (6,), generator=gen)
y[2] = -100
for kind in ("kl", "reverse_kl", "jsd"):
    kw = dict(temperature=2.0, alpha=0.7, kind=kind, label_smoothing=0.1)
    a = kdfast.distillation_loss(s, t, y, **kw)
    b = kdfast.reference.distillation_loss(s, t, y, **kw)
    torch.testing.assert_close(a, b)
    (ga,) = torch.autograd.grad(a, s)
    (gb,) = torch.autograd.grad(b, s)
    torch.testing.assert_close(ga, gb)
    print(f"CPU {kind}: loss {a.item():.6f} matches the reference, grad too")
EOF
)

step "device code in the module (sm_80, sm_90 cubins + PTX)"
CUOBJDUMP=$(command -v cuobjdump || true)
if [ -z "$CUOBJDUMP" ]; then
  # triton ships one with the CUDA build of torch
  CUOBJDUMP=$("$VENV/bin/python" -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))" 2>/dev/null || true)
fi
SO=$(cd "$WORK" && "$ROOT/$VENV/bin/python" -c "import kdfast._C as m; print(m.__file__)")
if [ -n "$CUOBJDUMP" ] && [ -x "$CUOBJDUMP" ]; then
  elf=$("$CUOBJDUMP" --list-elf "$SO")
  ptx=$("$CUOBJDUMP" --list-ptx "$SO")
  echo "$elf"
  echo "$ptx"
  IFS=';' read -r -a archs <<<"$KDFAST_CUDA_ARCHS"
  for a in "${archs[@]}"; do
    grep -q "sm_${a}" <<<"$elf" || { echo "no sm_${a} cubin in $SO"; exit 1; }
  done
  last=${archs[${#archs[@]}-1]}
  grep -q "sm_${last}" <<<"$ptx" || { echo "no compute_${last} PTX in $SO"; exit 1; }
  usage=$("$CUOBJDUMP" --dump-resource-usage "$SO")
  echo "kernels per arch, registers, stack (register spills land there):"
  awk '/arch =/{a=$3} /REG:/{print "  " a, $1, $2}' <<<"$usage" | sort | uniq -c
  n_spill=$(grep "REG:" <<<"$usage" | grep -vc "STACK:0 " || true)
  echo "kernels with a stack frame (spills): $n_spill"
  if [ "$n_spill" != "0" ]; then
    echo "FAILED: $n_spill kernels spill registers (ptxas -v shows which; distill.cu's launch bounds)"
    exit 1
  fi
else
  echo "cuobjdump not found: skipping the cubin/PTX listing"
fi
# (no `nm | grep -q`: under pipefail grep -q's early exit fails the pipeline with SIGPIPE)
syms=$(nm -C "$SO")
n_kernels=$(grep -c "__device_stub.*distill_rows_" <<<"$syms" || true)
echo "symbols of kernel host stubs: $n_kernels"
[ "$n_kernels" -ge 20 ] || { echo "expected the 20 kernel instantiations in $SO"; exit 1; }

step "done"
echo "cuda_build.sh passed in $(( $(date +%s) - script_start )) s"
