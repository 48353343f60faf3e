"""kind="logit_mse": logit matching (Caruana et al. 2006) in the fused dense op.

soft_i = (1/(2C)) * sum_j (s^_j - t^_j)**2 with s^, t^ the rows centred to zero mean; gradient
(s^_j - t^_j)/C. Checked against a float64 oracle (kdfast.reference, from the values the kernel
sees) over alpha, label smoothing, ignored rows, odd C (the CPU's lane loops for C < 64, its row
loops with one and several 1024-element chunks above), 3-D inputs, grad_output != 1, every
reduction, bf16/fp16 students and in-place mode; gradcheck and opcheck; the argument checks;
and Hinton et al.'s section 2.1 claim that it is the high-temperature limit of T**2 KL.
"""

from __future__ import annotations

import argparse

import pytest
import torch

import kdfast
from kdfast import reference
from kdfast.cli_distill import _train_loss
from tests.conftest import IGNORE, gen

F64 = torch.float64
# C = 7, 37: one row per SIMD lane; 101: the row loops, one chunk; 2051: three chunks.
COLS = (7, 37, 101, 2051)


def _problem(shape, *, seed, dtype=torch.float32, ignored=True, offset=0.0):
    """Student and teacher logits of `shape` (unit variance around `offset`, different per row)
    and targets with some ignored rows."""
    s = torch.randn(shape, generator=gen(seed), dtype=F64) * 2 + offset
    t = torch.randn(shape, generator=gen(seed + 1), dtype=F64) * 2 - offset
    y = torch.randint(0, shape[-1], shape[:-1], generator=gen(seed + 2))
    if ignored:
        y.view(-1)[:: 3] = IGNORE
    return s.to(dtype), t.to(dtype), y


def _fused_and_oracle(s, t, y, *, upstream=None, inplace=False, **kw):
    """Loss and student gradient of the fused op, and of the float64 oracle on the same values."""
    student = s.detach().clone().requires_grad_()
    loss = kdfast.distillation_loss(student, t, y, kind="logit_mse", inplace=inplace, **kw)
    up = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
    loss.backward(up)
    ref_s = s.detach().to(F64).requires_grad_()
    ref = reference.distillation_loss(ref_s, t.to(F64), y, kind="logit_mse", **kw)
    ref.backward(up.to(F64))
    return loss.detach(), student.grad, ref.detach(), ref_s.grad


def _grad_atol(ref_grad, rel):
    """An absolute tolerance per row: `rel` of the row's largest gradient entry."""
    return rel * ref_grad.abs().amax(-1, keepdim=True).clamp_min(1e-30)


@pytest.mark.parametrize("n_cols", COLS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_float32_matches_float64_oracle(n_cols, alpha, label_smoothing):
    s, t, y = _problem((19, n_cols), seed=10 * n_cols)
    for reduction in ("mean", "sum", "none"):
        upstream = torch.rand(19, generator=gen(5)) * 3 if reduction == "none" else torch.tensor(2.5)
        loss, grad, ref, ref_grad = _fused_and_oracle(s, t, y, alpha=alpha, label_smoothing=label_smoothing,
                                                      reduction=reduction, upstream=upstream)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=1e-6)
        bound = _grad_atol(ref_grad, 1e-5) + 1e-5 * ref_grad.abs()
        assert torch.all((grad.double() - ref_grad).abs() <= bound)
        if reduction == "none":
            assert torch.all(loss[y == IGNORE] == 0)
            assert torch.all(grad[y == IGNORE] == 0)


@pytest.mark.parametrize("n_cols", COLS)
def test_float64_kernel_is_exact(n_cols):
    s, t, y = _problem((2, 3, n_cols), seed=7 * n_cols, dtype=F64)  # 3-D input
    upstream = torch.rand(2, 3, generator=gen(6), dtype=F64) + 0.5
    loss, grad, ref, ref_grad = _fused_and_oracle(s, t, y, alpha=0.3, label_smoothing=0.05, reduction="none",
                                                  upstream=upstream)
    assert loss.shape == (2, 3) and grad.shape == s.shape
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_without_target_the_loss_is_the_soft_term():
    s, t, _ = _problem((9, 37), seed=3, dtype=F64)
    loss = kdfast.distillation_loss(s, t, kind="logit_mse", reduction="none")
    gap = (s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))
    torch.testing.assert_close(loss, gap.square().sum(-1) / (2 * 37), rtol=1e-12, atol=0)
    # The soft gradient is (s^ - t^)/C: centring adds no term.
    student = s.clone().requires_grad_()
    kdfast.distillation_loss(student, t, kind="logit_mse", reduction="sum").backward()
    torch.testing.assert_close(student.grad, gap / 37, rtol=1e-10, atol=1e-15)


def test_the_sum_is_of_centred_values():
    # Rows far from zero mean: a sum of squares minus C * mean**2 would lose every digit here
    # (float32 eps * 1000**2 * C >> the loss); centring first keeps the rounding of the means.
    s, t, y = _problem((8, 1001), seed=11, offset=1000.0)
    loss, grad, ref, ref_grad = _fused_and_oracle(s, t, y, alpha=0.7, reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=2e-3, atol=0)
    assert torch.all((grad.double() - ref_grad).abs() <= _grad_atol(ref_grad, 2e-3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_cols", [37, 2051])
def test_low_precision_students(dtype, n_cols):
    s, t, y = _problem((11, n_cols), seed=20 + n_cols, dtype=dtype)
    loss, grad, ref, ref_grad = _fused_and_oracle(s, t, y, alpha=0.5, label_smoothing=0.1, reduction="mean")
    # .grad has the student's dtype: one rounding of the float32 gradient (float16: plus its
    # subnormals' spacing).
    assert grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref, rtol=2e-5, atol=1e-6)
    rel, tiny = (2**-8, 0.0) if dtype == torch.bfloat16 else (2**-11, 2**-24)
    bound = _grad_atol(ref_grad, 1e-5) + rel * ref_grad.abs() + tiny
    assert torch.all((grad.double() - ref_grad).abs() <= bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("n_cols", [37, 2051])
def test_in_place_equals_out_of_place(dtype, n_cols):
    s, t, y = _problem((2, 5, n_cols), seed=30 + n_cols, dtype=dtype)
    upstream = torch.tensor(1.7, dtype=torch.float32 if dtype != F64 else F64)
    out = _fused_and_oracle(s, t, y, alpha=0.4, label_smoothing=0.1, upstream=upstream)
    inp = _fused_and_oracle(s, t, y, alpha=0.4, label_smoothing=0.1, upstream=upstream, inplace=True)
    assert torch.equal(inp[0], out[0])
    assert torch.equal(inp[1], out[1])


def test_scale_by_t2_has_no_effect():
    s, t, y = _problem((6, 37), seed=40)
    a = kdfast.distillation_loss(s, t, y, kind="logit_mse", scale_by_t2=True, reduction="none")
    b = kdfast.distillation_loss(s, t, y, kind="logit_mse", scale_by_t2=False, reduction="none")
    assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("with_target", [True, False])
def test_gradcheck(reduction, with_target):
    s = torch.randn(5, 6, generator=gen(50), dtype=F64, requires_grad=True)
    t = torch.randn(5, 6, generator=gen(51), dtype=F64)
    y = torch.tensor([0, IGNORE, 5, 2, 3]) if with_target else None

    def fn(student):
        return kdfast.distillation_loss(student, t, y, kind="logit_mse", alpha=0.6, label_smoothing=0.1,
                                        reduction=reduction)

    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


def _opcheck_samples():
    n, c = 6, 11
    y = torch.tensor([0, 3, IGNORE, 10, 7, 1])
    out = []
    for dtype, req in ((torch.float32, True), (torch.bfloat16, True), (F64, True), (torch.float16, True)):
        s = torch.randn(n, c, generator=gen(60)).to(dtype).requires_grad_(req)
        t = torch.randn(n, c, generator=gen(61)).to(dtype)
        out.append((s, t, y, 1.0, 0.5, "logit_mse", 0.5, IGNORE, 0.1, True, req))
    s = torch.randn(n, c, generator=gen(62), requires_grad=True)
    t = torch.randn(n, c, generator=gen(63))
    out.append((s, t, None, 1.0, 0.5, "logit_mse", 0.5, IGNORE, 0.0, False, True, True))  # average_rows
    out.append((s.detach(), t, y, 1.0, 0.0, "logit_mse", 0.5, IGNORE, 0.0, True, False))
    return out


@pytest.mark.parametrize("sample", range(len(_opcheck_samples())))
def test_opcheck_distill_fwd(sample):
    torch.library.opcheck(torch.ops.kdfast.distill_fwd.default, _opcheck_samples()[sample])


@pytest.mark.parametrize("with_target", [True, False])
def test_opcheck_distill_fwd_inplace(with_target):
    s = torch.randn(6, 11, generator=gen(64))
    t = torch.randn(6, 11, generator=gen(65))
    y = torch.tensor([0, 3, IGNORE, 10, 7, 1]) if with_target else None
    for average_rows in (False, True):
        torch.library.opcheck(torch.ops.kdfast.distill_fwd_inplace.default,
                              (s.clone(), t, y, 1.0, 0.5, "logit_mse", 0.5, IGNORE, 0.1, True, average_rows))


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_temperature_other_than_one_is_refused(temperature):
    s, t, y = _problem((4, 7), seed=70)
    match = r"temperature must be 1 with kind='logit_mse'.*got " + f"{temperature:g}"
    with pytest.raises(ValueError, match=match):
        kdfast.distillation_loss(s, t, y, kind="logit_mse", temperature=temperature)
    with pytest.raises(ValueError, match=match):
        kdfast.KDLoss(kind="logit_mse", temperature=temperature)
    with pytest.raises(ValueError, match=match):
        reference.distillation_loss(s, t, y, kind="logit_mse", temperature=temperature)
    # The op itself (the C++ API and the linear loss reach it without the Python checks).
    with pytest.raises(ValueError, match=match):
        torch.ops.kdfast.distill_fwd(s, t, y, temperature, 0.5, "logit_mse", 0.5, IGNORE, 0.0, True, False,
                                     False)


@pytest.mark.parametrize("bad", [float("-inf"), float("inf"), float("nan")])
@pytest.mark.parametrize("n_cols", [7, 101])
def test_non_finite_teacher_gives_nan(bad, n_cols):
    s, t, y = _problem((5, n_cols), seed=80, ignored=False)
    t[2, 3] = bad
    loss = kdfast.distillation_loss(s, t, y, kind="logit_mse", reduction="none")
    assert torch.isnan(loss[2])
    assert torch.isfinite(loss[[0, 1, 3, 4]]).all()
    assert torch.isnan(reference.distillation_loss(s, t, y, kind="logit_mse", reduction="none")[2])
    assert torch.isnan(kdfast.distillation_loss(s, t, y, kind="logit_mse"))


def test_sparse_losses_refuse_it():
    s, t, _ = _problem((4, 20), seed=90)
    ids = torch.topk(t, 5, dim=-1).indices
    teacher = kdfast.SparseTargets(ids, t.gather(-1, ids), torch.zeros(4))
    match = r"kind='logit_mse' is not supported by the sparse"
    for tail in ("renormalize", "bucket"):
        with pytest.raises(ValueError, match=match):
            kdfast.sparse_distillation_loss(s, teacher, tail=tail, kind="logit_mse")
        with pytest.raises(ValueError, match=match):
            kdfast.SparseKDLoss(tail=tail, kind="logit_mse")
    # The op too (its C++ check).
    with pytest.raises(ValueError, match=match):
        torch.ops.kdfast.sparse_distill_fwd(s, ids, t.gather(-1, ids), torch.zeros(4), None, 1.0, 1.0, 0.5,
                                            "logit_mse", 0.5, IGNORE, 0.0, True, False, False)


def test_linear_loss_with_dense_teacher():
    hidden = torch.randn(3, 7, 16, generator=gen(100), dtype=F64, requires_grad=True)
    weight = torch.randn(101, 16, generator=gen(101), dtype=F64, requires_grad=True)
    t = torch.randn(3, 7, 101, generator=gen(102), dtype=F64)
    y = torch.randint(0, 101, (3, 7), generator=gen(103))
    y[0, 2] = IGNORE
    loss = kdfast.linear_distillation_loss(hidden, weight, y, teacher_logits=t, kind="logit_mse", alpha=0.7,
                                           chunk_rows=5)
    g_hidden, g_weight = torch.autograd.grad(loss, (hidden, weight))
    want = reference.distillation_loss(hidden @ weight.T, t, y, kind="logit_mse", alpha=0.7)
    w_hidden, w_weight = torch.autograd.grad(want, (hidden, weight))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_hidden, w_hidden, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(g_weight, w_weight, rtol=1e-10, atol=1e-13)
    ids = torch.topk(t, 5, dim=-1).indices
    with pytest.raises(ValueError, match="kind='logit_mse' is not supported by the sparse"):
        kdfast.linear_distillation_loss(hidden, weight, y, kind="logit_mse", tail="bucket",
                                        teacher_sparse=kdfast.SparseTargets(ids, t.gather(-1, ids),
                                                                            torch.zeros(3, 7, dtype=F64)))


def test_cli_train_loss_defaults_to_temperature_one():
    args = argparse.Namespace(temperature=None, alpha=0.9, kind="logit_mse", tail="renormalize")
    loss = _train_loss(args, teacher=torch.nn.Identity())
    assert isinstance(loss, kdfast.KDLoss) and loss.kind == "logit_mse" and loss.temperature == 1.0
    args.kind = "kl"
    assert _train_loss(args, teacher=torch.nn.Identity()).temperature == 4.0


# --------------------------------------------------------------------------------------------
# Hinton et al. 2015, section 2.1: in the high-temperature limit, with zero-mean logits,
# distillation (T**2 KL) is logit matching. The gap shrinks like 1/T.
# --------------------------------------------------------------------------------------------


def _t2_kl_and_grad(s, t, temperature):
    """T**2 KL(p||q) per row and its gradient with respect to s (pure torch, float64)."""
    student = s.clone().requires_grad_()
    log_q = torch.log_softmax(student / temperature, -1)
    log_p = torch.log_softmax(t / temperature, -1)
    rows = temperature**2 * (log_p.exp() * (log_p - log_q)).sum(-1)
    (grad,) = torch.autograd.grad(rows.sum(), student)
    return rows.detach(), grad


def limit_gaps(temperature, *, n_rows=256, n_cols=10, seed=110):
    """Relative gaps between T**2 KL and logit_mse on unit-variance zero-mean logits: of the
    summed loss, and of the gradient (Frobenius norm); pure torch and the fused kernels."""
    s = torch.randn(n_rows, n_cols, generator=gen(seed), dtype=F64)
    t = torch.randn(n_rows, n_cols, generator=gen(seed + 1), dtype=F64)
    s, t = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    mse = (s - t).square().sum(-1) / (2 * n_cols)
    mse_grad = (s - t) / n_cols
    kl, kl_grad = _t2_kl_and_grad(s, t, temperature)
    torch_gaps = ((kl.sum() - mse.sum()).abs() / mse.sum(), (kl_grad - mse_grad).norm() / mse_grad.norm())
    fused = []
    for kind, temp in (("kl", temperature), ("logit_mse", 1.0)):
        student = s.clone().requires_grad_()
        loss = kdfast.distillation_loss(student, t, kind=kind, temperature=temp, reduction="sum")
        loss.backward()
        fused.append((loss.detach(), student.grad))
    (f_kl, f_kl_grad), (f_mse, f_mse_grad) = fused
    torch.testing.assert_close(f_mse, mse.sum(), rtol=1e-12, atol=0)
    fused_gaps = ((f_kl - f_mse).abs() / f_mse, (f_kl_grad - f_mse_grad).norm() / f_mse_grad.norm())
    return [float(g) for g in torch_gaps], [float(g) for g in fused_gaps]


def test_logit_mse_is_the_high_temperature_limit_of_t2_kl():
    torch_100, fused_100 = limit_gaps(100.0)
    torch_1000, fused_1000 = limit_gaps(1000.0)
    for at_100, at_1000 in ((torch_100, torch_1000), (fused_100, fused_1000)):
        for gap_100, gap_1000 in zip(at_100, at_1000, strict=True):  # loss, gradient
            assert 5.0 <= gap_100 / gap_1000 <= 20.0, (gap_100, gap_1000)
            assert gap_1000 < 5e-3
    # The fused kl and the pure-torch one agree on the gaps (float64 kernels).
    for a, b in zip(torch_1000, fused_1000, strict=True):
        assert abs(a - b) <= 1e-3 * a


# --------------------------------------------------------------------------------------------
# CUDA (skipped without a device; the host simulation, tests/test_cuda_host_sim.py, runs the
# CUDA row code against the CPU rows on every machine)
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("shape", [(64, 10), (9, 1000), (5, 4099), (2, 32003)])  # sub-warp, block, split
def test_cuda_matches_cpu(dtype, shape):
    s, t, y = _problem(shape, seed=120, dtype=dtype)
    for inplace in (False, True):
        results = []
        for device in ("cuda", "cpu"):
            student = s.to(device, copy=True).requires_grad_()
            loss = kdfast.distillation_loss(student, t.to(device), y.to(device), kind="logit_mse", alpha=0.6,
                                            label_smoothing=0.1, reduction="none", inplace=inplace)
            loss.backward(torch.full_like(loss, 1.5))
            results.append((loss.detach().cpu(), student.grad.cpu()))
        (loss_dev, grad_dev), (loss_cpu, grad_cpu) = results
        torch.testing.assert_close(loss_dev, loss_cpu, rtol=1e-12 if dtype == F64 else 2e-5, atol=1e-6)
        rel = 1e-10 if dtype == F64 else (2**-7 if dtype == torch.bfloat16 else 1e-5)
        diff = (grad_dev.double() - grad_cpu.double()).abs()
        assert torch.all(diff <= _grad_atol(grad_cpu.double(), rel) + rel * grad_cpu.double().abs())
