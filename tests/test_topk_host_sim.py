"""The CUDA builder rows (csrc/cuda/topk_rows.cuh) on host threads, against the CPU rows, in
every test run (no GPU needed); tests/topk_host_sim.cpp has what it covers. The mutation tests
show that it fails when the row code is broken: an off-by-one in the tie collection, an
ascending sort, a dropped shuffle step."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["tests/topk_host_sim.cpp", "csrc/cpu/isa/topk_baseline.cpp"]
CACHE = ROOT / "build" / "topk_host_sim"
CXX = os.environ.get("CXX", "g++")
FLAGS = ["-std=c++20", "-O2", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
CASES = int(os.environ.get("KDFAST_TOPK_SIM_CASES", "60"))

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs a C++ compiler ({CXX})")


def _digest(root: Path) -> str:
    h = hashlib.sha256(" ".join([CXX, *FLAGS]).encode())
    for path in sorted([*(root / "csrc").rglob("*"), root / SOURCES[0]]):
        if path.is_file() and path.suffix in {".h", ".cuh", ".cpp"}:
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:20]


def build_simulation(root: Path = ROOT) -> Path:
    """Compiles the simulation from the tree at `root` (cached by the sources' digest)."""
    out_dir = CACHE / _digest(root)
    binary = out_dir / "topk_host_sim"
    if not binary.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"topk_host_sim.{os.getpid()}.tmp"
        cmd = [CXX, *FLAGS, f"-I{root / 'csrc' / 'include'}", *(str(root / s) for s in SOURCES),
               "-lpthread", "-o", str(tmp)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        tmp.replace(binary)
    return binary


def run_simulation(binary: Path, cases: int, seed: int) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), str(cases), str(seed)], capture_output=True, text=True, timeout=1800)


def test_cuda_rows_match_the_cpu_rows():
    result = run_simulation(build_simulation(), CASES, seed=1)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert f"{CASES} cases, 0 failed" in result.stdout


MUTATIONS = {
    "tie collection off by one": ("(tie && tie_index < wanted)", "(tie && tie_index <= wanted)"),
    "ascending sort": ("const bool descending = (lo & size) == 0;",
                       "const bool descending = (lo & size) != 0;"),
    "dropped shuffle step": ("for (int o = 16; o > 0; o >>= 1)", "for (int o = 16; o > 1; o >>= 1)"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_the_simulation_catches_a_broken_row(tmp_path, name):
    old, new = MUTATIONS[name]
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    (tmp_path / "tests").mkdir()
    shutil.copy(ROOT / SOURCES[0], tmp_path / SOURCES[0])
    rows = tmp_path / "csrc" / "cuda" / "topk_rows.cuh"
    text = rows.read_text()
    assert old in text
    rows.write_text(text.replace(old, new, 1))
    result = run_simulation(build_simulation(tmp_path), 30, seed=3)
    assert result.returncode != 0
