"""The CUDA sparse rows (csrc/cuda/sparse_rows.cuh) on host threads, against the CPU rows, in
every test run (no GPU needed); tests/sparse_host_sim.cpp has what it covers and models. The
mutation tests show that it fails when the row code is broken: a removed barrier (the bitmap of
K built, the bitmap reused by the next row, in place K's columns after the rest's), a reduction
step dropped (a shuffle step, the teacher's merge, the rest's bin in the bins' sums).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SIM_SOURCE = "tests/sparse_host_sim.cpp"
SIM_HEADER = "tests/host_sim_common.h"  # shared with tests/cuda_host_sim.cpp
# The CPU rows the simulation compares with, compiled once per version of the CPU sources.
CPU_SOURCE = "csrc/cpu/isa/baseline.cpp"
CACHE = ROOT / "build" / "sparse_host_sim"
CXX = os.environ.get("CXX", "g++")
FLAGS = ["-std=c++20", "-O2", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall",
         "-Wno-unknown-pragmas"]
# Random configurations of the default run (each one row set, one dtype, one launch).
CASES = int(os.environ.get("KDFAST_SPARSE_SIM_CASES", "40"))

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs a C++ compiler ({CXX})")


def _digest(root: Path, folders: list[str], extra: list[str]) -> str:
    h = hashlib.sha256(" ".join([CXX, *FLAGS]).encode())
    paths = [p for f in folders for p in (root / f).rglob("*")] + [root / e for e in extra]
    for path in sorted(paths):
        if path.is_file() and path.suffix in {".h", ".cuh", ".cpp"}:
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:20]


def _compile(cmd: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    subprocess.run([*cmd, "-o", str(tmp)], check=True, capture_output=True, text=True)
    tmp.replace(out)


def build_simulation(root: Path = ROOT) -> Path:
    """Compiles the simulation from the tree at `root` (cached by the sources' digests)."""
    include = f"-I{root / 'csrc' / 'include'}"
    cpu_obj = CACHE / "cpu" / _digest(root, ["csrc/cpu", "csrc/include"], []) / "baseline.o"
    if not cpu_obj.exists():
        _compile([CXX, *FLAGS, include, "-c", str(root / CPU_SOURCE)], cpu_obj)
    binary = CACHE / _digest(root, ["csrc"], [SIM_SOURCE, SIM_HEADER]) / "sparse_host_sim"
    if not binary.exists():
        _compile([CXX, *FLAGS, include, str(root / SIM_SOURCE), str(cpu_obj), "-lmvec", "-lpthread"], binary)
    return binary


def run_simulation(binary: Path, cases: int, seed: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), str(cases), str(seed)], capture_output=True, text=True, timeout=1800)


def test_cuda_sparse_rows_match_the_cpu_rows():
    result = run_simulation(build_simulation(), CASES, seed=1)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.strip().endswith(f"{CASES} cases, 0 failures"), result.stdout[-2000:]


MUTATIONS = {
    # sparse_rows.cuh: the barrier after the bitmap of K is built (pass 2 reads it)
    "removed barrier after the bitmap": ("  g.barrier();  // the bitmap is complete\n", "\n"),
    # sparse_rows.cuh: the barrier at the end of a row (the next row clears the bitmap)
    "removed barrier before the next row": ("  g.barrier();  // 5. the next row clears the bitmap\n", "\n"),
    # sparse_rows.cuh: the teacher parts of the threads not merged (only the thread's own)
    "teacher reduction dropped": (
        "const TeacherPart<A> t = merge_teacher_parts(TeacherPart<A>{p.teacher_max, p.teacher_z},\n"
        "                                                     TeacherPart<A>{q.teacher_max, q.teacher_z});",
        "const TeacherPart<A> t = TeacherPart<A>{p.teacher_max, p.teacher_z}; (void)q;",
    ),
    # sparse_rows.cuh: the rest's bin left out of the bins' sums
    "rest bin dropped": ("const A row_kl = bins_row_kl(bins.q + rest_b.term_q);",
                         "const A row_kl = bins_row_kl(bins.q);"),
    # distill_rows.cuh (group_allreduce, shared): one butterfly step of the warp reduction skipped
    "dropped shuffle step": ("for (int offset = g.lanes >> 1; offset > 0; offset >>= 1)",
                             "for (int offset = g.lanes >> 1; offset > 1; offset >>= 1)"),
    # distill_rows.cuh (group_allreduce): the barrier between the warps' writes and the reads
    "removed reduction barrier": ("  g.barrier();\n  auto load = [&](int warp) {",
                                  "\n  auto load = [&](int warp) {"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_the_simulation_catches_a_broken_row(tmp_path, name):
    old, new = MUTATIONS[name]
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / SIM_SOURCE, tmp_path / SIM_SOURCE)
    shutil.copy(ROOT / SIM_HEADER, tmp_path / SIM_HEADER)
    shared_reduction = name in ("dropped shuffle step", "removed reduction barrier")
    rows_file = "distill_rows.cuh" if shared_reduction else "sparse_rows.cuh"
    rows = tmp_path / "csrc" / "cuda" / rows_file
    text = rows.read_text()
    assert text.count(old) == 1, f"mutation site not found once: {old!r}"
    rows.write_text(text.replace(old, new))
    result = run_simulation(build_simulation(tmp_path), 20, seed=3)
    assert result.returncode != 0, f"{name} went unnoticed:\n{result.stdout[-2000:]}"
    assert "FAIL" in result.stdout
