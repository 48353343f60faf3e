"""One row algorithm: every per-row formula lives in csrc/include/kdfast/kd_math.h (and, for
the sparse op, csrc/include/kdfast/sparse_math.h, built on it).

The backends (the CPU row loops, the CPU lane loops, the CUDA row code) own only their loops,
stashes and reductions. This test reads their sources and fails if one of them computes a
transcendental or calls one of kd_math.h's inner formula helpers itself, instead of the step
functions that combine them (elem_exps, part_scales, soft_from_cross, jsd_terms,
grad_element, ...). The host simulation (test_cuda_host_sim.py) checks that the CUDA rows
and the CPU rows agree numerically; this one that they cannot drift apart in their formulas.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["csrc/cpu/rows.h", "csrc/cpu/lanes.h", "csrc/cuda/distill_rows.cuh", "csrc/cpu/sparse_rows.h"]
SHARED = ROOT / "csrc" / "include" / "kdfast" / "kd_math.h"
# The sparse-cache builder's rows: their math is kdfast/topk_math.h's (ranks, tail terms).
BACKENDS += ["csrc/cpu/topk_rows.h", "csrc/cuda/topk_rows.cuh", "csrc/cuda/topk_targets.cu"]
# The sparse op's CUDA rows and kernel: their math is sparse_math.h's.
BACKENDS += ["csrc/cuda/sparse_rows.cuh", "csrc/cuda/sparse_distill.cu"]
TOPK_SHARED = ROOT / "csrc" / "include" / "kdfast" / "topk_math.h"
SPARSE_SHARED = ROOT / "csrc" / "include" / "kdfast" / "sparse_math.h"

# Calls only kd_math.h's step functions may make.
INNER_HELPERS = [
    "exp_nonpos", "kd_log", "log_mixture", "log1p_unit", "weighted", "soft_grad_kl",
    "soft_grad_mode_seeking", "hard_grad", "log_ratio_pq",
    "to_acc_float", "exp", "expf", "log", "logf", "log1p", "log1pf", "__expf", "__logf",
    # kd_math.h's and sparse_math.h's inner helpers of the sparse rows
    "log_add_exp", "hard_loss_from_lse", "hard_grad_combine", "hard_grad_from_prob", "part_lse",
    "make_bin", "hard_prob", "teacher_rescaled",
]
SPARSE_INNER_HELPERS = INNER_HELPERS[-8:]
# topk_math.h's inner helper: the backends read values back through rank_value.
TOPK_INNER_HELPERS = ["key_value"]
INNER_HELPERS += TOPK_INNER_HELPERS
# Normalizer fields: arithmetic on them is a formula (passing a RowNorm along is not).
NORMALIZER_FIELDS = ["inv_za", "inv_zb", "inv_zs", "lse_a", "lse_b", "lse_s", "lse_gap",
                     "lse_rest", "log_q_rest", "q_rest"]


def code_of(text: str) -> str:
    """The source without comments, extern declarations (libmvec's SIMD variants), the lane
    loops' normalizer container (copies in and out) and the bench's exp-rate probe (which
    times the kernels' exp itself)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'^extern "C"[^\n]*$', "", text, flags=re.M)
    text = re.sub(r"float exp_probe\(.*?\n}\n", "", text, flags=re.S)
    text = re.sub(r"struct LaneNorms \{.*?\n\};", "", text, flags=re.S)
    return text


def inner_calls(code: str) -> list[str]:
    return sorted({m for m in INNER_HELPERS if re.search(rf"(?<![\w.:]){re.escape(m)}\s*\(", code)})


def normalizer_uses(code: str) -> list[str]:
    fields = re.compile(r"\.(" + "|".join(NORMALIZER_FIELDS) + r")\b")
    return [ln.strip() for ln in code.splitlines() if fields.search(ln)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_calls_no_inner_formula(backend):
    calls = inner_calls(code_of((ROOT / backend).read_text()))
    assert not calls, f"{backend} computes formulas of its own with {calls}: call a kd_math.h step"


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_does_no_arithmetic_on_normalizers(backend):
    uses = normalizer_uses(code_of((ROOT / backend).read_text()))
    assert not uses, f"{backend} works on the row normalizers itself: {uses}"


def test_the_helpers_exist_in_the_shared_header():
    # The lists above name real kd_math.h functions (a rename must update this test).
    shared = SHARED.read_text()
    for name in INNER_HELPERS[:9]:
        assert re.search(rf"\b{name}\s*\(", shared), name
    shared += SPARSE_SHARED.read_text()
    for name in SPARSE_INNER_HELPERS:
        assert re.search(rf"\b{name}\s*\(", shared), name
    for field in NORMALIZER_FIELDS:
        assert re.search(rf"\b{field}\b", shared), field
    topk_shared = TOPK_SHARED.read_text()
    for name in TOPK_INNER_HELPERS:
        assert re.search(rf"\b{name}\s*\(", topk_shared), name


@pytest.mark.parametrize("line", [
    "    const A e = exp_nonpos(x - m);\n",
    "    soft += weighted(p, log_p - log_q);\n",
    "    const RowNorm<A> nc = n; nc.inv_za *= r;\n",
])
def test_the_checks_catch_a_formula_in_a_backend(line):
    rows = (ROOT / "csrc" / "cpu" / "rows.h").read_text()
    anchor = "    const RowNorm<A> n = row_norm("
    assert anchor in rows
    code = code_of(rows.replace(anchor, line + anchor, 1))
    assert inner_calls(code) or normalizer_uses(code)
