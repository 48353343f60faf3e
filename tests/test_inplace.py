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


# --------------------------------------------------------------------------------------------
# Memory the gradient must not be written over: each refusal names the argument, says what
# is expected, and leaves every input untouched.
# --------------------------------------------------------------------------------------------

OP_ARGS = (2.0, 0.5, "kl", 0.5, IGNORE, 0.0, True)  # temperature .. scale_by_t2


def _op_inplace(student, teacher, target=None):
    return torch.ops.kdfast.distill_fwd_inplace(student, teacher, target, *OP_ARGS)


def _buffer(n=64, c=40, seed=330, dtype=torch.float32):
    return torch.randn(n, c, generator=gen(seed)).to(dtype)


# Each case: () -> (student, teacher, target) passed to the op and to distillation_loss, and a
# regex the error must match.
OVERLAP_CASES = {
    "expanded_rows": (lambda: (_buffer(1).expand(64, 40), _buffer(), None),
                      r"student_logits whose (rows|elements) do not (overlap in|share) memory.*strides"),
    "same_tensor": (lambda: (lambda s: (s, s, None))(_buffer()),
                    r"teacher_logits shares memory with it.*expected separate.*teacher_logits\.clone\(\)"),
    "vocab_slices_of_one_buffer": (lambda: (lambda b: (b[:, :30], b[:, :30], None))(_buffer(c=50)),
                                   r"teacher_logits shares memory"),
    "teacher_shifted_by_one_class": (lambda: (lambda b: (b[:, :20], b[:, 19:39], None))(_buffer()),
                                     r"teacher_logits shares memory"),
    "teacher_transposed_view": (lambda: (lambda b: (b, b.t(), None))(_buffer(40)),
                                r"teacher_logits shares memory"),
    "target_in_student_memory": (
        lambda: (lambda b: (b[:, :6], _buffer(8, 6, dtype=F64), b.view(torch.int64)[:, 3].fill_(1)))(
            torch.zeros(8, 8, dtype=F64)),
        r"target shares memory with it.*target\.clone\(\)"),
}


@pytest.mark.parametrize("case", list(OVERLAP_CASES))
@pytest.mark.parametrize("api", ["op", "distillation_loss"])
def test_inplace_refuses_student_memory_shared_with_anything(case, api):
    make, pattern = OVERLAP_CASES[case]
    student, teacher, target = make()
    saved = [x.clone() if x is not None else None for x in (student, teacher, target)]
    with pytest.raises(ValueError, match=pattern):
        if api == "op":
            _op_inplace(student, teacher, target)
        else:
            kdfast.distillation_loss(student, teacher, target, inplace=True)
    for x, x0 in zip((student, teacher, target), saved, strict=True):
        if x is not None:
            assert torch.equal(x, x0), "an input was modified by a call that raised"


def test_inplace_expanded_student_of_the_issue_is_refused_not_wrong():
    """The issue's report: an expanded (64, 1000) student in place returned 5.83 instead of
    9.45, silently. Out of place the loss is right; in place it must raise."""
    row = torch.randn(1, 1000, generator=gen(331)) * 4
    teacher = torch.randn(64, 1000, generator=gen(332)) * 4
    expected = kdfast.distillation_loss(row.expand(64, 1000).contiguous(), teacher)
    torch.testing.assert_close(kdfast.distillation_loss(row.expand(64, 1000), teacher), expected,
                               rtol=0, atol=0)
    for student in (row.clone().expand(64, 1000), row.clone().expand(4, 16, 1000)):
        with pytest.raises(ValueError, match=r"inplace=True needs student_logits.*expand\(\)"):
            kdfast.distillation_loss(student, teacher.reshape(student.shape), inplace=True)
        with torch.no_grad():
            with pytest.raises(ValueError, match=r"inplace=True needs student_logits"):
                kdfast.distillation_loss(student, teacher.reshape(student.shape), inplace=True)


def test_inplace_disjoint_slices_of_one_buffer_pass_the_op_check():
    """The op's check is exact: student and teacher interleaved in one (N, 2C) buffer share
    no byte, so the op computes them (distillation_loss, which checks address ranges on the
    caller's N-D tensors, refuses them: tested above through the shifted slice)."""
    both = _buffer(c=80)
    expected = torch.ops.kdfast.distill_fwd(both[:, :40], both[:, 40:], None, *OP_ARGS, True)
    teacher_before = both[:, 40:].clone()
    rows = _op_inplace(both[:, :40], both[:, 40:])
    torch.testing.assert_close(rows, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(both[:, :40], expected[1], rtol=0, atol=0)
    assert torch.equal(both[:, 40:], teacher_before)


def test_inplace_leaf_grad_is_its_own_buffer_and_a_second_call_raises():
    """Documented (README, docstring): a leaf student with .grad None gets its own buffer as
    .grad, holding the right gradient; a second in-place call would overwrite that .grad, so
    it raises until .grad is reset."""
    s, t = _buffer(8, 10, seed=333), _buffer(8, 10, seed=334)
    reference_leaf = s.clone().requires_grad_()
    kdfast.distillation_loss(reference_leaf, t).backward()
    leaf = s.clone().requires_grad_()
    kdfast.distillation_loss(leaf, t, inplace=True).backward()
    assert leaf.grad.data_ptr() == leaf.data_ptr()
    torch.testing.assert_close(leaf.grad, reference_leaf.grad, rtol=0, atol=0)
    before = leaf.grad.clone()
    with pytest.raises(ValueError, match=r"overwrite student_logits\.grad.*\.grad = None"):
        kdfast.distillation_loss(leaf, t, inplace=True)
    assert torch.equal(leaf.grad, before)
    leaf.grad = None
    kdfast.distillation_loss(leaf, t, inplace=True).backward()  # allowed again


def test_inplace_leaf_with_an_existing_grad_accumulates():
    s, t = _buffer(8, 10, seed=335), _buffer(8, 10, seed=336)
    reference_leaf = s.clone().requires_grad_()
    kdfast.distillation_loss(reference_leaf, t).backward()
    leaf = s.clone().requires_grad_()
    leaf.grad = torch.ones_like(leaf)
    kdfast.distillation_loss(leaf, t, inplace=True).backward()
    assert leaf.grad.data_ptr() != leaf.data_ptr()
    torch.testing.assert_close(leaf.grad, reference_leaf.grad + 1, rtol=0, atol=0)
