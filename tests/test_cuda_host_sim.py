"""The CUDA row code on host threads, against the CPU rows, in every test run (no GPU needed).

tests/cuda_host_sim.cpp compiles csrc/cuda/distill_rows.cuh (the per-row passes and group
reductions the CUDA kernels run) as host C++ with csrc/cpu/isa/baseline.cpp (the CPU rows) and
compares them over random configurations; see its header for what it covers and models. The
mutation tests show that it fails when the CUDA row code is broken: a removed barrier, a
dropped shuffle step, a lost online rescaling.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SIM_SUMMARY

ROOT = Path(__file__).resolve().parent.parent
SIM_SOURCE = ROOT / "tests" / "cuda_host_sim.cpp"
SIM_HEADER = ROOT / "tests" / "host_sim_common.h"  # shared with tests/sparse_host_sim.cpp
ROW_SOURCES = [ROOT / "csrc" / "cpu" / "isa" / "baseline.cpp"]
CACHE = ROOT / "build" / "cuda_host_sim"
CXX = os.environ.get("CXX", "g++")
FLAGS = ["-std=c++20", "-O2", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall",
         "-Wno-unknown-pragmas"]
# Random configurations of the full run: about 560 cases (each one dtype pair), ~45 s on 2 cores.
CASES = int(os.environ.get("KDFAST_CUDA_SIM_CASES", "200"))

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs a C++ compiler ({CXX})")


def _tree_digest(root: Path) -> str:
    """Digest of the headers and sources the simulation compiles (csrc/ and the simulation)."""
    h = hashlib.sha256(" ".join([CXX, *FLAGS]).encode())
    for path in sorted([*(root / "csrc").rglob("*"), root / "tests" / "cuda_host_sim.cpp",
                        root / "tests" / "host_sim_common.h"]):
        if path.is_file() and path.suffix in {".h", ".cuh", ".cpp"}:
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:20]


def build_simulation(root: Path = ROOT) -> Path:
    """Compiles the simulation from the tree at `root` (cached by the sources' digest)."""
    out_dir = CACHE / _tree_digest(root)
    binary = out_dir / "cuda_host_sim"
    if binary.exists():
        return binary
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"cuda_host_sim.{os.getpid()}.tmp"
    cmd = [CXX, *FLAGS, f"-I{root / 'csrc' / 'include'}", str(root / "tests" / "cuda_host_sim.cpp"),
           *(str(root / p.relative_to(ROOT)) for p in ROW_SOURCES), "-lmvec", "-lpthread", "-o", str(tmp)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    tmp.replace(binary)
    return binary


def run_simulation(binary: Path, cases: int, seed: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), str(cases), str(seed)], capture_output=True, text=True, timeout=1800)


def _check_simulation(request, cases: int, seed: int) -> None:
    result = run_simulation(build_simulation(), cases, seed)
    summary = result.stdout.strip().splitlines()[-1]
    request.config.stash.setdefault(SIM_SUMMARY, []).append(summary)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert summary.endswith(" 0 failures"), summary


def test_cuda_rows_match_cpu_rows_quick(request):
    # The fast subset's share (-m "not slow"): ~170 cases, a few seconds once compiled.
    _check_simulation(request, 60, 99)


@pytest.mark.slow
def test_cuda_rows_match_cpu_rows_on_host_threads(request):
    _check_simulation(request, CASES, 1234)


MUTATIONS = {
    # __syncthreads between the warps' shared-memory writes and the reads
    "removed barrier": ("  g.barrier();\n", "\n"),
    # one butterfly step of the warp shuffle reduction skipped
    "dropped shuffle step": ("for (int offset = g.lanes >> 1; offset > 0; offset >>= 1)",
                             "for (int offset = g.lanes >> 1; offset > 1; offset >>= 1)"),
    # a thread's sums not rescaled when its maxima rise
    "lost online rescaling": (
        "part = raise_part(part, nan_max(part.max_s, sk), nan_max(part.max_t, tk), x.inv_t, x.hx, x.kind);",
        "part.max_s = nan_max(part.max_s, sk), part.max_t = nan_max(part.max_t, tk);",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_simulation_fails_on_broken_cuda_rows(mutation, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    (tree / "tests").mkdir()
    shutil.copy(SIM_SOURCE, tree / "tests" / "cuda_host_sim.cpp")
    shutil.copy(SIM_HEADER, tree / "tests" / "host_sim_common.h")
    rows = tree / "csrc" / "cuda" / "distill_rows.cuh"
    old, new = MUTATIONS[mutation]
    text = rows.read_text()
    assert text.count(old) == 1, f"mutation site not found once: {old!r}"
    rows.write_text(text.replace(old, new))
    result = run_simulation(build_simulation(tree), 60, 1234)
    assert result.returncode != 0, f"{mutation} went unnoticed:\n{result.stdout[-2000:]}"
    assert "FAIL" in result.stdout
