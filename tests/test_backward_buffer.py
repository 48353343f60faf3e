"""The eager backward hands distill_fwd's gradient buffer to autograd instead of copying it,
and average_rows folds the "mean" reduction into the kernel. These tests pin down that the
saving never changes a result: retain_graph, in-place edits of the inputs, grad_output != 1."""

from __future__ import annotations

import pytest
import torch

import kdfast
from tests.conftest import IGNORE, gen

F64 = torch.float64
ARGS = (2.0, 0.5, "kl", 0.5, IGNORE, 0.1, True)  # temperature .. scale_by_t2


def _inputs(dtype=torch.float32, n=9, c=13, seed=400):
    s = torch.randn(n, c, generator=gen(seed)).to(dtype)
    t = torch.randn(n, c, generator=gen(seed + 1)).to(dtype)
    y = torch.randint(0, c, (n,), generator=gen(seed + 2))
    y[2] = IGNORE
    return s, t, y


@pytest.mark.parametrize("with_target", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_average_rows_divides_by_counted_rows(dtype, with_target):
    s, t, y = _inputs(dtype)
    y = y if with_target else None
    rows, grad = torch.ops.kdfast.distill_fwd(s, t, y, *ARGS, True, False)
    rows_avg, grad_avg = torch.ops.kdfast.distill_fwd(s, t, y, *ARGS, True, True)
    n = int((y != IGNORE).sum()) if with_target else s.shape[0]
    tol = dict(rtol=1e-12, atol=0) if dtype == F64 else dict(rtol=1e-5, atol=1e-7)
    if dtype == torch.bfloat16:  # the gradient is rounded into bfloat16 once, either way
        tol = dict(rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(rows_avg, rows / n, **tol)
    torch.testing.assert_close(grad_avg.to(F64), grad.to(F64) / n, **tol)


def test_average_rows_with_every_row_ignored_is_zero_not_nan():
    s, t, _ = _inputs()
    y = torch.full((s.shape[0],), IGNORE)
    rows, grad = torch.ops.kdfast.distill_fwd(s, t, y, *ARGS, True, True)
    assert torch.equal(rows, torch.zeros_like(rows)) and torch.equal(grad, torch.zeros_like(grad))
    loss = kdfast.distillation_loss(s.requires_grad_(), t, y)
    assert loss.item() == 0.0


def test_gradient_buffer_is_adopted_as_grad_without_a_copy(monkeypatch):
    """distillation_loss (EagerDistillFunction) never shows its gradient buffer to the caller,
    so backward hands that very buffer to autograd as .grad."""
    addresses = []
    keep = kdfast.ops._keep_for_eager_backward

    def record_address(ctx, student, teacher, target, op_args, grad):
        addresses.append(grad.data_ptr())  # the address only: holding grad would force a copy
        keep(ctx, student, teacher, target, op_args, grad)

    monkeypatch.setattr(kdfast.ops, "_keep_for_eager_backward", record_address)
    s, t, y = _inputs()
    leaf = s.clone().requires_grad_()
    kdfast.distillation_loss(leaf, t, y, temperature=2.0).backward()
    assert len(addresses) == 1 and leaf.grad.data_ptr() == addresses[0]


@pytest.mark.parametrize("upstream", [1.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, F64])
def test_op_called_directly_keeps_its_returned_gradient(dtype, upstream):
    """A direct caller of the op holds the returned `grad`: backward (grad_output != 1 on the
    loss rows, or 1) must leave it as it was and put d loss / d student into .grad."""
    s, t, y = _inputs(dtype)
    leaf = s.clone().requires_grad_()
    rows, grad = torch.ops.kdfast.distill_fwd(leaf, t, y, *ARGS, True, False)
    kept = grad.clone()
    weights = torch.full_like(rows, upstream)
    weights[::2] = 3.0
    rows.backward(weights)
    assert torch.equal(grad, kept), "backward changed the gradient the op returned"
    assert leaf.grad.data_ptr() != grad.data_ptr()
    expected = (kept * weights[:, None]).to(dtype)  # as documented: one rounding into dtype
    torch.testing.assert_close(leaf.grad, expected, rtol=0, atol=0)


def test_op_called_directly_refuses_backward_after_its_gradient_was_changed():
    """backward reads the returned `grad`: changing it in place first trips the version check
    instead of scaling the caller's edit into .grad."""
    s, t, y = _inputs()
    leaf = s.clone().requires_grad_()
    rows, grad = torch.ops.kdfast.distill_fwd(leaf, t, y, *ARGS, True, False)
    grad.zero_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        rows.sum().backward()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_retain_graph_backward_three_times_accumulates_exactly(dtype, reduction):
    """The first backward gives its buffer away (as .grad here, which later backwards add to
    in place); later backwards recompute it: every one must contribute the same gradient."""
    s, t, y = _inputs(dtype)
    upstreams = (1.0, 0.5, 1.0)
    leaf = s.clone().requires_grad_()
    loss = kdfast.distillation_loss(leaf, t, y, temperature=2.0, reduction=reduction)
    once = []
    for u in upstreams:
        fresh = s.clone().requires_grad_()
        out = kdfast.distillation_loss(fresh, t, y, temperature=2.0, reduction=reduction)
        out.backward(torch.full_like(out, u))
        once.append(fresh.grad.to(F64))
    for u in upstreams:
        loss.backward(torch.full_like(loss, u), retain_graph=True)
    tol = dict(rtol=2**-6, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(leaf.grad.to(F64), sum(once), **tol)


def test_inputs_modified_before_a_second_backward_raise():
    s, t, y = _inputs()
    leaf = s.clone().requires_grad_()
    teacher = t.clone()
    loss = kdfast.distillation_loss(leaf, teacher, y, temperature=2.0)
    loss.backward(retain_graph=True)
    teacher.add_(1.0)  # the recompute would read these values: autograd's version check
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_non_uniform_upstream_scales_rows():
    s, t, y = _inputs(F64)
    weights = torch.rand(s.shape[0], generator=gen(410), dtype=F64)
    leaf = s.clone().requires_grad_()
    (kdfast.distillation_loss(leaf, t, y, temperature=2.0, reduction="none") * weights).sum().backward()
    rows, grad = torch.ops.kdfast.distill_fwd(s, t, y, *ARGS[:5], 0.0, True, True, False)
    torch.testing.assert_close(leaf.grad, grad * weights[:, None], rtol=1e-12, atol=0)


def test_op_called_directly_supports_retain_graph():
    """Direct callers of the op go through its registered autograd (distillation_loss takes a
    leaner autograd.Function in eager mode), which reads the returned gradient each time."""
    s, t, y = _inputs()
    leaf = s.clone().requires_grad_()
    rows, grad = torch.ops.kdfast.distill_fwd(leaf, t, y, *ARGS, True, True)
    expected = grad.clone()
    del grad
    rows.sum().backward(retain_graph=True)
    rows.sum().backward()
    torch.testing.assert_close(leaf.grad, 2 * expected, rtol=1e-6, atol=0)


def test_eager_calls_skip_the_op_level_autograd_wrapper():
    """torch.library's Python autograd wrapper costs ~150 us per step; eager calls use
    EagerDistillFunction, torch.compile'd ones the op (tests/test_autograd_compile.py)."""
    s, t, y = _inputs()
    loss = kdfast.distillation_loss(s.clone().requires_grad_(), t, y, reduction="sum")
    node = loss.grad_fn.next_functions[0][0]
    assert type(node).__name__ == "EagerDistillFunctionBackward"
