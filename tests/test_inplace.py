"""inplace=True: the gradient is written into the logits' buffer during forward."""

from __future__ import annotations

import pytest
import torch

import kdfast
from tests.conftest import IGNORE, KINDS, gen

F64 = torch.float64


def _linear_student(dtype, n=24, d=16, c=37, seed=300, batch=None):
    w = (torch.randn(d, c, generator=gen(seed)) * 0.5).to(dtype).requires_grad_()
    shape = (n, d) if batch is None else (*batch, d)
    x = torch.randn(shape, generator=gen(seed + 1)).to(dtype)
    t = torch.randn((*shape[:-1], c), generator=gen(seed + 2)).to(dtype)
    y = torch.randint(0, c, shape[:-1], generator=gen(seed + 3))
    y.view(-1)[::5] = IGNORE
    return w, x, t, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction,upstream", [("mean", 1.0), ("sum", 3.7), ("none", "random"),
                                                ("batchmean", 3.7)])
@pytest.mark.parametrize("with_target", [True, False])
def test_inplace_matches_out_of_place(dtype, kind, reduction, upstream, with_target):
    w, x, t, y = _linear_student(dtype, batch=(4, 6))
    target = y if with_target else None
    kw = dict(temperature=2.0, alpha=0.6, kind=kind, label_smoothing=0.1, reduction=reduction)
    grads, losses = {}, {}
    for inplace in (False, True):
        w.grad = None
        logits = x @ w
        loss = kdfast.distillation_loss(logits, t, target, inplace=inplace, **kw)
        if upstream == "random":
            go = torch.randn(loss.shape, generator=gen(310), dtype=loss.dtype)
        else:
            go = torch.full(loss.shape, upstream, dtype=loss.dtype)
        loss.backward(go)
        losses[inplace], grads[inplace] = loss.detach(), w.grad.clone()
        assert not w.grad.requires_grad
    # Same kernel arithmetic and the same roundings (per-row gradient stored in the student's
    # dtype, then scaled by grad_loss_rows and rounded once more): bit-identical.
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=0)
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_inplace_overwrites_logits_with_the_gradient(dtype):
    w, x, t, y = _linear_student(dtype)
    kw = dict(temperature=3.0, alpha=0.5, kind="jsd", label_smoothing=0.0)
    logits = x @ w
    original = logits.detach().clone()
    rows, grad = torch.ops.kdfast.distill_fwd(original, t, y, 3.0, 0.5, "jsd", 0.5, IGNORE, 0.0, True, True,
                                              True)
    loss = kdfast.distillation_loss(logits, t, y, inplace=True, **kw)
    assert not torch.equal(logits.detach(), original)
    # The buffer now holds d loss_i / d logits_i, divided by the counted rows ("mean"), bit for bit.
    torch.testing.assert_close(logits.detach(), grad, rtol=0, atol=0)
    torch.testing.assert_close(loss.detach(), rows.sum(), rtol=0, atol=0)
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_inplace_fp16_student_raises_and_leaves_it_untouched():
    s = torch.randn(8, 10, generator=gen(320)).half()
    t = torch.randn(8, 10, generator=gen(321)).half()
    s0 = s.clone()
    with pytest.raises(ValueError, match=r"inplace=True.*float16"):
        kdfast.distillation_loss(s, t, inplace=True)
    assert torch.equal(s, s0)
    with pytest.raises(ValueError, match=r"float16"):
        torch.ops.kdfast.distill_fwd_inplace(s, t, None, 1.0, 0.5, "kl", 0.5, IGNORE, 0.0, True)
    assert torch.equal(s, s0)


def test_inplace_float64_teacher_needs_float64_student():
    s = torch.randn(8, 10, generator=gen(322))
    s0 = s.clone()
    with pytest.raises(ValueError, match=r"teacher_logits"):
        kdfast.distillation_loss(s, torch.randn(8, 10, dtype=F64), inplace=True)
    assert torch.equal(s, s0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_twice_raises(dtype):
    w, x, t, y = _linear_student(dtype)
    loss = kdfast.distillation_loss(x @ w, t, y, temperature=2.0, inplace=True)
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    with pytest.raises(RuntimeError):
        loss.backward()
    torch.testing.assert_close(w.grad, first, rtol=0, atol=0)


def test_inplace_on_logits_saved_by_another_op_fails_loudly():
    """exp saves its output for backward; overwriting that output with the gradient must make
    backward raise, not compute exp's gradient from the wrong values."""
    w, x, t, y = _linear_student(torch.float32)
    logits = (x @ w).exp()
    loss = kdfast.distillation_loss(logits, t, y, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("layout", ["transposed", "col_strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_with_class_strided_logits(layout, dtype):
    """README: any strides. A student whose class dimension is not contiguous (e.g. logits
    computed as (w^T x^T)^T) must work with inplace=True, giving the out-of-place result."""
    w, x, t, y = _linear_student(dtype)
    kw = dict(temperature=2.0, alpha=0.5, kind="kl")
    out = {}
    for inplace in (False, True):
        w.grad = None
        if layout == "transposed":
            logits = (w.t() @ x.t()).t()
        else:
            logits = torch.repeat_interleave(x @ w, 2, dim=-1)[:, ::2]
        assert logits.stride(-1) != 1
        loss = kdfast.distillation_loss(logits, t, y, inplace=inplace, **kw)
        loss.backward()
        out[inplace] = (loss.detach(), w.grad.clone())
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=0)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=0)


def test_inplace_without_grad_mode_gives_the_same_loss():
    w, x, t, y = _linear_student(torch.float32)
    expected = kdfast.distillation_loss(x @ w, t, y, temperature=2.0)
    with torch.no_grad():
        loss = kdfast.distillation_loss(x @ w, t, y, temperature=2.0, inplace=True)
    torch.testing.assert_close(loss, expected.detach(), rtol=0, atol=0)


def test_inplace_kdloss_module():
    w, x, t, y = _linear_student(torch.float32)
    kd = kdfast.KDLoss(temperature=2.0, alpha=0.3, kind="reverse_kl", inplace=True)
    kd_ref = kdfast.KDLoss(temperature=2.0, alpha=0.3, kind="reverse_kl")
    loss = kd(x @ w, t, y)
    loss.backward()
    g = w.grad.clone()
    w.grad = None
    ref = kd_ref(x @ w, t, y)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    torch.testing.assert_close(g, w.grad, rtol=0, atol=0)
