"""Fused kernels vs kdfast.reference in float64 (pairwise grid), parity with torch.nn.functional,
and the README's semantics (ignored rows, masked vocabulary, reductions, NaN propagation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import reference
from tests.conftest import (
    IGNORE,
    KINDS,
    LAYOUTS,
    REDUCTIONS,
    TARGET_MODES,
    batch_shape_for,
    case_id,
    check_case,
    gen,
    make_logits,
    make_target,
    mask_teacher_,
    missing_pairs,
    pairwise,
)

# --------------------------------------------------------------------------------------------
# The float64 pairwise grid
# --------------------------------------------------------------------------------------------

GRID_FACTORS = {
    "T": [0.05, 1.0, 4.0, 20.0, 100.0],
    "C": [1, 2, 10, 1000, 32003],
    "N": [0, 1, 7, 4096],
    "kind": list(KINDS),
    "alpha": [0.0, 0.5, 1.0],
    "eps": [0.0, 0.1],
    "target": list(TARGET_MODES),
    "reduction": list(REDUCTIONS),
    "layout": list(LAYOUTS),
    "ndim": [2, 3],
    "upstream": [1.0, 3.7, "random"],
    "teacher_inf": [False, True],
    "scale_by_t2": [True, False],
    "beta": [0.5, 0.2],
    "logit_scale": [1.0, 8.0],
    "inplace": [False, True],
}


def grid_allowed(row: dict) -> bool:
    # Keep big cases cheap: C = 32003 only with small N, N = 4096 only with moderate C.
    if row.get("N") == 4096 and row.get("C", 0) > 1000:
        return False
    # -inf teacher entries make reverse_kl +inf by definition: tested separately below.
    if row.get("teacher_inf") and row.get("kind") == "reverse_kl":
        return False
    # inplace=True with a class-strided student is tested on its own (tests/test_inplace.py).
    if row.get("inplace") and row.get("layout") in ("transposed", "col_strided"):
        return False
    return True


GRID = pairwise(GRID_FACTORS, grid_allowed, seed=0)


def test_grid_is_pairwise_covering():
    assert missing_pairs(GRID, GRID_FACTORS, grid_allowed) == []
    assert all(grid_allowed(row) for row in GRID)
    # Far smaller than the full product, which is what makes the grid affordable.
    assert len(GRID) < 60


def test_pairwise_helper_respects_constraints():
    factors = {"a": [0, 1, 2], "b": ["x", "y"], "c": [True, False], "d": [1, 2, 3, 4]}

    def allowed(p):
        return not (p.get("a") == 2 and p.get("d") == 4)

    rows = pairwise(factors, allowed, seed=5)
    assert missing_pairs(rows, factors, allowed) == []
    assert not any(r["a"] == 2 and r["d"] == 4 for r in rows)
    assert len(rows) < 3 * 2 * 2 * 4


@pytest.mark.parametrize("row", GRID, ids=[case_id(r) for r in GRID])
def test_fused_matches_reference_float64_grid(row):
    C, N = row["C"], row["N"]
    batch = batch_shape_for(N, row["ndim"])
    student = make_logits(batch, C, dtype=torch.float64, scale=row["logit_scale"], layout=row["layout"],
                          seed=10)
    teacher = make_logits(batch, C, dtype=torch.float64, scale=row["logit_scale"], layout=row["layout"],
                          seed=11).value
    if row["teacher_inf"]:
        mask_teacher_(teacher)
    target = make_target(batch, C, row["target"])
    kwargs = dict(temperature=row["T"], alpha=row["alpha"], kind=row["kind"], beta=row["beta"],
                  label_smoothing=row["eps"], reduction=row["reduction"], scale_by_t2=row["scale_by_t2"])
    res = check_case(student, teacher, target, upstream=row["upstream"], inplace=row["inplace"], **kwargs)
    if row["reduction"] == "none":
        assert res.loss.shape == batch
        if target is not None:
            assert (res.loss[target == IGNORE] == 0).all()
    else:
        assert res.loss.shape == ()
    assert torch.isfinite(res.loss).all()
    if row["target"] == "all_ignored" and row["reduction"] != "none":
        assert res.loss.item() == 0.0


# --------------------------------------------------------------------------------------------
# Parity with torch.nn.functional
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
@pytest.mark.parametrize("with_target", [True, False])
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_kl_alpha1_equals_kl_div_batchmean_times_t2(dtype, reduction, with_target, T):
    N, C = 33, 77
    s = (torch.randn(N, C, generator=gen(1), dtype=torch.float64) * 3).to(dtype).requires_grad_()
    t = (torch.randn(N, C, generator=gen(2), dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, C, (N,), generator=gen(3)) if with_target else None
    loss = kdfast.distillation_loss(s, t, y, temperature=T, alpha=1.0, kind="kl", reduction=reduction)
    s2 = s.detach().clone().requires_grad_()
    expected = F.kl_div(F.log_softmax(s2 / T, dim=-1), F.softmax(t / T, dim=-1), reduction="batchmean") * T**2
    # float64: both exact to a few ulps; float32: both accumulate in float32 in different orders.
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(loss, expected, **tol)
    (g,) = torch.autograd.grad(loss, s)
    (g2,) = torch.autograd.grad(expected, s2)
    torch.testing.assert_close(g, g2, rtol=tol["rtol"], atol=tol["atol"] * float(g2.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("ignore_index", [IGNORE, -1, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_alpha0_equals_cross_entropy(dtype, eps, ignore_index, reduction, kind):
    N, C = 40, 9
    s = (torch.randn(N, C, generator=gen(4), dtype=torch.float64) * 2).to(dtype).requires_grad_()
    t = torch.randn(N, C, generator=gen(5), dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (N,), generator=gen(6))
    y[::3] = ignore_index  # also with ignored rows (class 4 is "ignored" when ignore_index=4)
    loss = kdfast.distillation_loss(s, t, y, temperature=3.0, alpha=0.0, kind=kind, label_smoothing=eps,
                                    ignore_index=ignore_index, reduction=reduction)
    s2 = s.detach().clone().requires_grad_()
    expected = F.cross_entropy(s2, y, label_smoothing=eps, ignore_index=ignore_index, reduction=reduction)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, expected, **tol)
    go = torch.randn(loss.shape, generator=gen(7), dtype=loss.dtype)
    (g,) = torch.autograd.grad(loss, s, go)
    (g2,) = torch.autograd.grad(expected, s2, go)
    torch.testing.assert_close(g, g2, **tol)


# --------------------------------------------------------------------------------------------
# Ignored rows, reductions, target=None
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_all_ignored_batch_is_zero_not_nan(kind, dtype, impl):
    fn = kdfast.distillation_loss if impl == "fused" else reference.distillation_loss
    s = torch.randn(6, 5, 11, dtype=dtype, requires_grad=True)
    t = torch.randn(6, 5, 11, dtype=dtype)
    y = torch.full((6, 5), IGNORE)
    for reduction in ("mean", "batchmean", "sum"):
        loss = fn(s, t, y, kind=kind, alpha=0.3, label_smoothing=0.1, temperature=2.0, reduction=reduction)
        assert loss.shape == ()
        assert loss.item() == 0.0, (reduction, loss)
        (g,) = torch.autograd.grad(loss * 2.5, s)
        assert torch.isfinite(g).all() and (g == 0).all()
    rows = fn(s, t, y, kind=kind, reduction="none")
    assert rows.shape == (6, 5) and (rows == 0).all()


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum"])
def test_empty_batch_is_zero(impl, reduction):
    fn = kdfast.distillation_loss if impl == "fused" else reference.distillation_loss
    s = torch.randn(0, 7, requires_grad=True)
    for y in (None, torch.zeros(0, dtype=torch.long)):
        loss = fn(s, torch.randn(0, 7), y, reduction=reduction)
        assert loss.item() == 0.0
        (g,) = torch.autograd.grad(loss, s)
        assert g.shape == (0, 7)


def test_mean_counts_only_unignored_rows():
    N, C = 20, 6
    s = torch.randn(N, C, dtype=torch.float64)
    t = torch.randn(N, C, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=gen(8))
    y[[1, 4, 5, 13]] = IGNORE
    kw = dict(temperature=2.0, alpha=0.4, kind="jsd", label_smoothing=0.05)
    rows = kdfast.distillation_loss(s, t, y, reduction="none", **kw)
    assert (rows[y == IGNORE] == 0).all() and (rows[y != IGNORE] > 0).all()
    total = kdfast.distillation_loss(s, t, y, reduction="sum", **kw)
    mean = kdfast.distillation_loss(s, t, y, reduction="mean", **kw)
    batchmean = kdfast.distillation_loss(s, t, y, reduction="batchmean", **kw)
    torch.testing.assert_close(total, rows.sum(), rtol=1e-14, atol=0.0)
    torch.testing.assert_close(mean, rows.sum() / 16, rtol=1e-14, atol=0.0)
    torch.testing.assert_close(batchmean, mean, rtol=0.0, atol=0.0)
    # The ignored rows' values do not matter at all.
    s2, t2 = s.clone(), t.clone()
    s2[y == IGNORE] = 1e4
    t2[y == IGNORE] = float("-inf")
    torch.testing.assert_close(kdfast.distillation_loss(s2, t2, y, reduction="none", **kw), rows,
                               rtol=0.0, atol=0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_target_none_is_soft_only_and_ignores_alpha(kind):
    s = torch.randn(9, 13, dtype=torch.float64)
    t = torch.randn(9, 13, dtype=torch.float64)
    y = torch.randint(0, 13, (9,))
    a = kdfast.distillation_loss(s, t, None, kind=kind, alpha=0.0, temperature=3.0)
    b = kdfast.distillation_loss(s, t, None, kind=kind, alpha=1.0, temperature=3.0)
    c = kdfast.distillation_loss(s, t, y, kind=kind, alpha=1.0, temperature=3.0)
    torch.testing.assert_close(a, b, rtol=0.0, atol=0.0)
    torch.testing.assert_close(a, c, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_scale_by_t2(kind, alpha):
    T = 5.0
    s = torch.randn(9, 13, dtype=torch.float64)
    t = torch.randn(9, 13, dtype=torch.float64)
    y = torch.randint(0, 13, (9,))
    scaled = kdfast.distillation_loss(s, t, y, kind=kind, alpha=alpha, temperature=T, scale_by_t2=True)
    plain = kdfast.distillation_loss(s, t, y, kind=kind, alpha=alpha, temperature=T, scale_by_t2=False)
    hard = kdfast.distillation_loss(s, t, y, kind=kind, alpha=0.0, temperature=T)
    soft_plain = (plain - (1 - alpha) * hard) / alpha
    torch.testing.assert_close(scaled, alpha * T**2 * soft_plain + (1 - alpha) * hard, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int16, torch.uint8, torch.int64])
def test_target_integer_dtypes_and_strides(target_dtype):
    N, C = 12, 7
    s = torch.randn(N, C, dtype=torch.float64)
    t = torch.randn(N, C, dtype=torch.float64)
    y64 = torch.randint(0, C, (2 * N,), generator=gen(9))[::2]  # non-contiguous target
    ignore = 255 if target_dtype == torch.uint8 else IGNORE
    y64[3] = ignore
    y = y64.to(target_dtype)[:]
    assert not y64.is_contiguous()
    kw = dict(temperature=2.0, alpha=0.5, label_smoothing=0.1, ignore_index=ignore, reduction="none")
    out = kdfast.distillation_loss(s, t, y, **kw)
    expected = reference.distillation_loss(s, t, y64.contiguous(), **kw)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out[3] == 0


# --------------------------------------------------------------------------------------------
# Masked vocabulary (-inf teacher entries) and non-finite inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [0.5, 1.0, 8.0])
def test_masked_teacher_is_finite_for_kl_and_jsd(kind, dtype, T):
    batch, C = (5, 6), 37
    student = make_logits(batch, C, dtype=dtype, scale=2.0, seed=20)
    teacher = make_logits(batch, C, dtype=dtype, scale=2.0, seed=21).value
    mask = mask_teacher_(teacher, fraction=0.5)
    assert mask.any()
    target = make_target(batch, C, "ignored")
    for reduction in ("mean", "none"):
        res = check_case(student, teacher, target, temperature=T, alpha=0.7, kind=kind, reduction=reduction,
                         label_smoothing=0.1, upstream=1.0 if reduction == "mean" else "random")
        assert torch.isfinite(res.loss).all()
        assert torch.isfinite(res.grad).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_masked_teacher_reverse_kl_is_inf_where_student_has_mass(dtype):
    N, C = 8, 10
    s = torch.randn(N, C, generator=gen(22), dtype=torch.float64).to(dtype)
    t = torch.randn(N, C, generator=gen(23), dtype=torch.float64).to(dtype)
    t[[1, 4, 6], 3] = float("-inf")
    for impl in (kdfast.distillation_loss, reference.distillation_loss):
        rows = impl(s, t, temperature=2.0, kind="reverse_kl", reduction="none")
        assert not torch.isnan(rows).any()
        masked = torch.zeros(N, dtype=torch.bool)
        masked[[1, 4, 6]] = True
        assert (rows[masked] == float("inf")).all(), rows
        assert torch.isfinite(rows[~masked]).all()
        assert impl(s, t, temperature=2.0, kind="reverse_kl").item() == float("inf")
    fused = kdfast.distillation_loss(s, t, temperature=2.0, kind="reverse_kl", reduction="none")
    ref = reference.distillation_loss(s.double(), t.double(), temperature=2.0, kind="reverse_kl",
                                      reduction="none")
    torch.testing.assert_close(fused.double(), ref, rtol=2e-5, atol=1e-6)


NONFINITE_CASES = {
    # README: "NaN inputs give NaN outputs."
    "nan_student": ("student", float("nan")),
    "nan_teacher": ("teacher", float("nan")),
    # softmax of a row with a +inf logit is undefined (inf - inf): the reference gives NaN.
    "pos_inf_teacher": ("teacher", float("inf")),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(NONFINITE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nonfinite_inputs_give_nan_like_reference(kind, case, dtype):
    which, value = NONFINITE_CASES[case]
    s = torch.randn(3, 6, generator=gen(24), dtype=dtype)
    t = torch.randn(3, 6, generator=gen(25), dtype=dtype)
    (s if which == "student" else t)[1, 2] = value
    for target in (None, torch.tensor([0, 1, 2])):
        for alpha in (1.0, 0.5):
            kw = dict(temperature=2.0, kind=kind, alpha=alpha, reduction="none")
            ref = reference.distillation_loss(s, t, target, **kw)
            fused = kdfast.distillation_loss(s, t, target, **kw)
            assert torch.isnan(ref[1]), ref
            assert torch.isnan(fused[1]), (f"{case}: row 1 has a non-finite {which} entry; "
                                          f"fused gives {fused.tolist()}, reference {ref.tolist()}")
            torch.testing.assert_close(fused[[0, 2]], ref[[0, 2]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_fully_masked_teacher_row_matches_reference(kind):
    """A teacher row that is entirely -inf has no distribution; the reference gives NaN (so
    does torch's softmax). The fused op must not silently turn it into a finite loss."""
    s = torch.randn(3, 6, generator=gen(26), dtype=torch.float64)
    t = torch.randn(3, 6, generator=gen(27), dtype=torch.float64)
    t[1] = float("-inf")
    ref = reference.distillation_loss(s, t, temperature=2.0, kind=kind, reduction="none")
    fused = kdfast.distillation_loss(s, t, temperature=2.0, kind=kind, reduction="none")
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_spanning_chunks_with_distant_maxima(kind, T, dtype):
    """The CPU row loops take each row in chunks of 1024 elements with chunk-local maxima and
    rescale them at the end (csrc/cpu/rows.h). Rows built so that the chunk maxima differ
    widely, a teacher chunk is entirely masked, and the maxima sit in the last, partial chunk
    must still match the reference. T = 1, 2, 4 and 3 take the three ways of forming
    softmax(s)."""
    N, C = 6, 4100  # four full chunks and a partial one
    s = torch.randn(N, C, generator=gen(40), dtype=torch.float64)
    t = torch.randn(N, C, generator=gen(41), dtype=torch.float64)
    s[0, 4096:] += 30.0  # student maximum in the partial chunk
    t[0, :1024] -= 30.0  # a teacher chunk far below the row maximum
    s[1, 1024:2048] -= 40.0  # a student chunk whose scale underflows float at T = 1
    t[1, 2048:3072] += 25.0
    if kind != "reverse_kl":  # -inf teacher entries make reverse_kl +inf by definition
        t[2, :1024] = float("-inf")  # a whole masked teacher chunk
        t[3, 1024:] = float("-inf")  # only the first chunk has teacher mass
    s[4, 3000] = 20.0  # a single peak
    t[5, C - 1] = 20.0
    target = torch.tensor([4099, 1500, 0, 1030, 3000, 2])  # labels in scaled-down chunks too
    student = make_logits((N,), C, dtype=dtype, seed=0)
    student.base.copy_(s.to(dtype))
    res = check_case(student, t.to(dtype), target, temperature=T, alpha=0.5, kind=kind,
                     label_smoothing=0.1, reduction="none", upstream="random")
    assert torch.isfinite(res.loss).all()
    assert torch.isfinite(res.grad).all()


# --------------------------------------------------------------------------------------------
# Shapes, upstream gradients, grad-disabled paths, the module
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_3d_inputs_equal_flattened_2d(kind, reduction):
    B, Tq, V = 3, 5, 29
    s = torch.randn(B, Tq, V, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, Tq, V, dtype=torch.float64)
    y = torch.randint(0, V, (B, Tq))
    y[0, 1] = IGNORE
    kw = dict(temperature=2.0, alpha=0.6, kind=kind, label_smoothing=0.1, reduction=reduction)
    out3 = kdfast.distillation_loss(s, t, y, **kw)
    out2 = kdfast.distillation_loss(s.reshape(-1, V), t.reshape(-1, V), y.reshape(-1), **kw)
    assert out3.shape == ((B, Tq) if reduction == "none" else ())
    torch.testing.assert_close(out3.reshape(-1) if reduction == "none" else out3, out2, rtol=0, atol=0)
    res = check_case(make_logits((B, Tq), V, seed=30), t, y, upstream="random", **kw)
    assert res.grad.shape == (B, Tq, V)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_grad_output_scales_gradient(kind, dtype):
    s = torch.randn(16, 21, dtype=torch.float64).to(dtype).requires_grad_()
    t = torch.randn(16, 21, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 21, (16,))
    kw = dict(temperature=2.0, alpha=0.5, kind=kind)
    (g1,) = torch.autograd.grad(kdfast.distillation_loss(s, t, y, **kw), s)
    (g37,) = torch.autograd.grad(kdfast.distillation_loss(s, t, y, **kw) * 3.7, s)
    # Same per-row gradient, different scalar factor, one rounding into the gradient's dtype.
    rtol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.bfloat16: 2**-8}[dtype]
    torch.testing.assert_close(g37.double(), 3.7 * g1.double(), rtol=2 * rtol, atol=0.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", ["student_no_grad", "no_grad", "inference_mode"])
def test_loss_without_grad_equals_grad_enabled(kind, dtype, mode):
    s = torch.randn(10, 300, dtype=torch.float64).to(dtype)
    t = torch.randn(10, 300, dtype=torch.float64).to(dtype)
    y = torch.randint(0, 300, (10,))
    y[2] = IGNORE
    kw = dict(temperature=3.0, alpha=0.5, kind=kind, label_smoothing=0.1)
    ref = kdfast.distillation_loss(s.clone().requires_grad_(), t, y, **kw)
    assert ref.requires_grad
    if mode == "student_no_grad":
        out = kdfast.distillation_loss(s, t, y, **kw)
    elif mode == "no_grad":
        with torch.no_grad():
            out = kdfast.distillation_loss(s.clone().requires_grad_(), t, y, **kw)
    else:
        with torch.inference_mode():
            out = kdfast.distillation_loss(s, t, y, **kw)
    assert not out.requires_grad
    # The no-gradient loop may vectorize its row sums differently: a few float32 ulps.
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(out, ref.detach(), rtol=tol, atol=tol)


def test_kdloss_module_matches_functional():
    kd = kdfast.KDLoss(temperature=3.0, alpha=0.7, kind="jsd", beta=0.3, ignore_index=-1,
                       label_smoothing=0.05, reduction="sum", scale_by_t2=False)
    assert "jsd" in repr(kd) and "temperature=3.0" in repr(kd)
    s = torch.randn(4, 6, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, 11, dtype=torch.float64)
    y = torch.randint(0, 11, (4, 6))
    y[1, 1] = -1
    out = kd(s, t, y)
    expected = kdfast.distillation_loss(s, t, y, temperature=3.0, alpha=0.7, kind="jsd", beta=0.3,
                                        ignore_index=-1, label_smoothing=0.05, reduction="sum",
                                        scale_by_t2=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    ref = reference.distillation_loss(s, t, y, temperature=3.0, alpha=0.7, kind="jsd", beta=0.3,
                                      ignore_index=-1, label_smoothing=0.05, reduction="sum",
                                      scale_by_t2=False)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_large_magnitude_logits_stay_finite():
    for dtype in (torch.float32, torch.float64):
        student = make_logits((8,), 100, dtype=dtype, scale=1e4, seed=40)
        t = make_logits((8,), 100, dtype=dtype, scale=1e4, seed=41).value
        y = torch.randint(0, 100, (8,), generator=gen(42))
        for kind in KINDS:
            res = check_case(student, t, y, temperature=0.5, alpha=0.5, kind=kind, label_smoothing=0.1)
            assert torch.isfinite(res.loss).all() and torch.isfinite(res.grad).all()
