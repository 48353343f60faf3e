"""Low-precision and mixed dtypes (reference in float64 from the same values upcast), every CPU
instruction-set path, and the float16 gradient-underflow case."""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast import reference
from tests.conftest import (
    IGNORE,
    KINDS,
    REDUCTIONS,
    UNIT_ROUNDOFF,
    assert_within,
    batch_shape_for,
    case_id,
    check_case,
    gen,
    grad_error_bound,
    make_logits,
    make_target,
    mask_teacher_,
    missing_pairs,
    pairwise,
)

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
LOW = (F32, BF16, F16)
DTYPE_PAIRS = [(s, t) for s in LOW for t in LOW]
DTYPE_PAIRS += [(F64, F64), (F64, F32), (F32, F64), (BF16, F64), (F16, F64)]

INFO = kdfast.build_info()
COMPILED_ISAS = INFO.get("cpu_isas_compiled", [])
SUPPORTED_ISAS = INFO.get("cpu_isas_supported", [])
ALL_ISAS = ("avx512", "avx2", "baseline")


def _pair_id(pair):
    return "-".join(str(d).replace("torch.", "") for d in pair)


# --------------------------------------------------------------------------------------------
# Every CPU ISA path
# --------------------------------------------------------------------------------------------

ISA_PARAMS = [
    pytest.param(
        isa,
        marks=pytest.mark.skipif(isa not in SUPPORTED_ISAS, reason=f"this CPU cannot run the {isa} kernels"),
    )
    for isa in ALL_ISAS
]


def test_build_info_lists_isas():
    assert INFO["extension"] is True
    assert "cpu" in INFO["backends"]
    assert set(COMPILED_ISAS) == set(ALL_ISAS)
    assert "baseline" in SUPPORTED_ISAS
    assert set(SUPPORTED_ISAS) <= set(COMPILED_ISAS)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=[_pair_id(p) for p in DTYPE_PAIRS])
def test_isa_path_matches_reference(isa, kind, dtypes, monkeypatch):
    monkeypatch.setenv("KDFAST_CPU_ISA", isa)
    assert kdfast.build_info()["cpu_isa_selected"] == isa
    s_dtype, t_dtype = dtypes
    batch = (3, 13)
    # C not a multiple of 16 (nor of 8): the SIMD loops' tails; 13 < one AVX-512 vector.
    for n_cols in (13, 1003):
        for mode in ("ignored", "none"):
            student = make_logits(batch, n_cols, dtype=s_dtype, scale=3.0, seed=n_cols)
            teacher = make_logits(batch, n_cols, dtype=t_dtype, scale=3.0, seed=n_cols + 1).value
            if kind != "reverse_kl":
                mask_teacher_(teacher, fraction=0.2)
            target = make_target(batch, n_cols, mode)
            check_case(student, teacher, target, upstream=3.7, temperature=2.0, alpha=0.5, kind=kind,
                       beta=0.3, label_smoothing=0.1, reduction="mean")
            check_case(student, teacher, target, upstream="random", temperature=1.0, alpha=0.25, kind=kind,
                       reduction="none")


@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_isa_paths_agree_closely(isa, monkeypatch):
    """Same float32 inputs on two paths: only the SIMD summation order differs."""
    s = torch.randn(64, 1003, generator=gen(50))
    t = torch.randn(64, 1003, generator=gen(51))
    y = torch.randint(0, 1003, (64,), generator=gen(52))
    out = {}
    for which in ("baseline", isa):
        monkeypatch.setenv("KDFAST_CPU_ISA", which)
        for kind in KINDS:
            out[which, kind] = torch.ops.kdfast.distill_fwd(s, t, y, 2.0, 0.5, kind, 0.5, IGNORE, 0.1, True,
                                                            True)
    for kind in KINDS:
        (lb, gb), (li, gi) = out["baseline", kind], out[isa, kind]
        torch.testing.assert_close(li, lb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gi, gb, rtol=1e-4, atol=1e-7)


LANE_DTYPES = [(F32, F32), (BF16, BF16), (F16, F32), (BF16, F32)]


@pytest.mark.parametrize("n_cols", [1, 2, 10, 17, 32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtypes", LANE_DTYPES, ids=[_pair_id(p) for p in LANE_DTYPES])
def test_lane_loops_agree_with_row_loops(n_cols, kind, dtypes, monkeypatch):
    """Small C runs one row per SIMD lane (csrc/cpu/lanes.h); KDFAST_CPU_LANES_MAX_C=0 forces
    the row loops on the same values. 37 rows: two full blocks of 16 and a ragged one."""
    s_dtype, t_dtype = dtypes
    s = (3 * torch.randn(37, n_cols, generator=gen(60 + n_cols))).to(s_dtype)
    t = (3 * torch.randn(37, n_cols, generator=gen(61 + n_cols))).to(t_dtype)
    if kind != "reverse_kl" and n_cols > 1:
        mask_teacher_(t, fraction=0.2)
    y = torch.randint(0, n_cols, (37,), generator=gen(62))
    y[::5] = IGNORE
    out = {}
    for lanes_max in ("0", "32"):
        monkeypatch.setenv("KDFAST_CPU_LANES_MAX_C", lanes_max)
        for temperature, target in ((2.0, y), (1.0, y), (3.0, None)):
            out[lanes_max, temperature] = torch.ops.kdfast.distill_fwd(
                s, t, target, temperature, 0.5, kind, 0.3, IGNORE, 0.1, True, True, temperature == 2.0)
    for temperature in (2.0, 1.0, 3.0):
        (lr, gr), (ll, gl) = out["0", temperature], out["32", temperature]
        # atol: cancellation in log p - log q leaves a few ulps of |logits| (about 3) either way.
        torch.testing.assert_close(ll, lr, rtol=1e-5, atol=1e-5)
        grad_tol = dict(rtol=1e-4, atol=1e-6) if s_dtype != BF16 else dict(rtol=2**-7, atol=1e-5)
        torch.testing.assert_close(gl.float(), gr.float(), **grad_tol)
        if temperature != 3.0:  # with a target: ignored rows are exactly 0
            assert torch.equal(ll[::5], torch.zeros_like(ll[::5]))
            assert torch.equal(gl[::5], torch.zeros_like(gl[::5]))


@pytest.mark.parametrize("value", ["-1", "ten", "3.5"])
def test_invalid_lanes_max_raises(value, monkeypatch):
    monkeypatch.setenv("KDFAST_CPU_LANES_MAX_C", value)
    with pytest.raises(ValueError, match="KDFAST_CPU_LANES_MAX_C") as info:
        kdfast.distillation_loss(torch.randn(4, 7), torch.randn(4, 7))
    assert value in str(info.value)


UNSUPPORTED_ISAS = [isa for isa in COMPILED_ISAS if isa not in SUPPORTED_ISAS]


@pytest.mark.skipif(not UNSUPPORTED_ISAS, reason="this CPU supports every compiled ISA")
@pytest.mark.parametrize("isa", UNSUPPORTED_ISAS or ["none"])
def test_forcing_unsupported_isa_raises(isa, monkeypatch):
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    s0, t0 = s.clone(), t.clone()
    monkeypatch.setenv("KDFAST_CPU_ISA", isa)
    with pytest.raises(ValueError, match=f"KDFAST_CPU_ISA={isa}"):
        kdfast.distillation_loss(s, t)
    with pytest.raises(ValueError, match="KDFAST_CPU_ISA"):
        torch.ops.kdfast.distill_fwd(s, t, None, 1.0, 0.5, "kl", 0.5, IGNORE, 0.0, True, False)
    assert torch.equal(s, s0) and torch.equal(t, t0)


@pytest.mark.parametrize("value", ["sse9", "AVX2", "avx", "native"])
def test_invalid_isa_value_raises(value, monkeypatch):
    monkeypatch.setenv("KDFAST_CPU_ISA", value)
    with pytest.raises(ValueError, match="KDFAST_CPU_ISA") as info:
        kdfast.distillation_loss(torch.randn(4, 7), torch.randn(4, 7))
    assert value in str(info.value)


@pytest.mark.parametrize("value", ["auto", ""])
def test_auto_isa_picks_the_best_supported(value, monkeypatch):
    monkeypatch.setenv("KDFAST_CPU_ISA", value)
    assert kdfast.build_info()["cpu_isa_selected"] == SUPPORTED_ISAS[0]
    s, t = torch.randn(4, 7, dtype=F64), torch.randn(4, 7, dtype=F64)
    torch.testing.assert_close(kdfast.distillation_loss(s, t), reference.distillation_loss(s, t),
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Low-precision pairwise grid
# --------------------------------------------------------------------------------------------

LOWP_FACTORS = {
    "s_dtype": [F32, BF16, F16],
    "t_dtype": [F32, BF16, F16, F64],
    "kind": list(KINDS),
    "T": [0.05, 1.0, 4.0, 20.0, 100.0],
    "C": [2, 10, 515, 4099],
    "reduction": list(REDUCTIONS),
    "target": ["labels", "ignored", "none"],
    "layout": ["contiguous", "transposed", "row_strided", "col_strided"],
    "ndim": [2, 3],
    "upstream": [1.0, 3.7, "random"],
    "eps": [0.0, 0.1],
    "alpha": [0.0, 0.5, 1.0],
    "teacher_inf": [False, True],
    "logit_scale": [1.0, 4.0],
}


def lowp_allowed(row: dict) -> bool:
    return not (row.get("teacher_inf") and row.get("kind") == "reverse_kl")


LOWP_GRID = pairwise(LOWP_FACTORS, lowp_allowed, seed=1)


def test_lowp_grid_is_pairwise_covering():
    assert missing_pairs(LOWP_GRID, LOWP_FACTORS, lowp_allowed) == []


@pytest.mark.parametrize("row", LOWP_GRID, ids=[case_id(r) for r in LOWP_GRID])
def test_low_precision_matches_float64_reference(row):
    C = row["C"]
    batch = batch_shape_for(48, row["ndim"])
    student = make_logits(batch, C, dtype=row["s_dtype"], scale=row["logit_scale"], layout=row["layout"],
                          seed=60)
    teacher = make_logits(batch, C, dtype=row["t_dtype"], scale=row["logit_scale"], layout=row["layout"],
                          seed=61).value
    if row["teacher_inf"]:
        mask_teacher_(teacher)
    target = make_target(batch, C, row["target"])
    res = check_case(student, teacher, target, upstream=row["upstream"], temperature=row["T"],
                     alpha=row["alpha"], kind=row["kind"], label_smoothing=row["eps"],
                     reduction=row["reduction"])
    # The loss is float32 (float64 when an input is float64), the gradient the student's dtype.
    assert res.loss.dtype == (F64 if F64 in (row["s_dtype"], row["t_dtype"]) else F32)


@pytest.mark.parametrize("s_dtype", [BF16, F16])
def test_low_precision_reference_is_not_rerounded(s_dtype):
    """The oracle sees exactly the low-precision values the kernel sees (upcast, not rounded
    again), so the float32-accumulated fused loss agrees with it to float32 accuracy: a
    hundred times tighter than the input dtype's resolution (an oracle that re-rounded, or a
    kernel that accumulated in the input dtype, would be off by ~u_dtype * |loss|)."""
    s = (torch.randn(32, 100, generator=gen(70), dtype=F64) * 3).to(s_dtype)
    t = (torch.randn(32, 100, generator=gen(71), dtype=F64) * 3).to(s_dtype)
    y = torch.randint(0, 100, (32,), generator=gen(72))
    fused = kdfast.distillation_loss(s, t, y, temperature=2.0, reduction="none")
    ref = reference.distillation_loss(s.to(F64), t.to(F64), y, temperature=2.0, reduction="none")
    torch.testing.assert_close(fused.to(F64), ref, rtol=2e-6, atol=2e-6)
    assert (fused.to(F64) - ref).abs().max() < 1e-2 * UNIT_ROUNDOFF[s_dtype] * ref.abs().max()


# --------------------------------------------------------------------------------------------
# float16 gradients must not underflow
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fp16_gradient_does_not_underflow():
    """N = 4096, C = 32000, float16 student, grad_output = 65536 (loss scaling): the
    unnormalized per-row gradient (~1/C) lives in float16's subnormal range, so it must stay
    float32 until grad_output/N scales it back into the normal range. Compared with the float64
    reference gradient from the same float16 values (computed in row chunks to bound memory)."""
    N, C, T, scale = 4096, 32000, 2.0, 65536.0
    kw = dict(temperature=T, alpha=0.5, kind="kl", label_smoothing=0.0)
    s = (torch.randn(N, C, generator=gen(80)) * 2).to(F16)
    t = (torch.randn(N, C, generator=gen(81)) * 2).to(F16)
    y = torch.randint(0, C, (N,), generator=gen(82))
    y[::7] = IGNORE
    n_counted = int((y != IGNORE).sum())

    leaf = s.clone().requires_grad_()
    loss = kdfast.distillation_loss(leaf, t, y, **kw)
    (loss * scale).backward()
    grad = leaf.grad
    assert grad.dtype == F16 and torch.isfinite(grad).all()

    ref_total = torch.zeros((), dtype=F64)
    nonzero_fused = nonzero_ref = 0
    upstream = torch.tensor(scale, dtype=F64)
    for start in range(0, N, 256):
        rows = slice(start, start + 256)
        r_leaf = s[rows].to(F64).requires_grad_()
        r_sum = reference.distillation_loss(r_leaf, t[rows].to(F64), y[rows], reduction="sum", **kw)
        (r_grad,) = torch.autograd.grad(r_sum * (scale / n_counted), r_leaf)
        ref_total += r_sum.detach()
        # Each row of the full mean gets weight grad_output / n_counted: a "sum" with that upstream.
        bound, rtol = grad_error_bound(s[rows], t[rows], y[rows], upstream / n_counted, grad_dtype=F16,
                                       acc=F32, reduction="sum", **kw)
        assert_within(grad[rows], r_grad, bound, rtol, what=f"fp16 gradient rows {start}..")
        nonzero_fused += int((grad[rows] != 0).sum())
        nonzero_ref += int((r_grad.to(F16) != 0).sum())
    torch.testing.assert_close(loss.detach().to(F64), ref_total / n_counted, rtol=1e-5, atol=1e-5)
    total = N * C
    # Rows with target == ignore_index have an exactly zero gradient; all others nearly all nonzero.
    assert nonzero_fused / total > 0.8
    assert abs(nonzero_fused - nonzero_ref) <= 1e-5 * total, (nonzero_fused, nonzero_ref)
