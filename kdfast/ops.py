"""Python registrations for the compiled ops: fake (meta) kernels and autograd.

``torch.ops.kdfast.distill_fwd(student, teacher, target, temperature, alpha, kind, beta,
ignore_index, label_smoothing, scale_by_t2, compute_grad) -> (loss_rows, grad)``

- ``student``, ``teacher``: (N, C) float32/bfloat16/float16/float64 (float64 pairs only with
  float64: the op upcasts the other side), the class dimension may have any stride.
- ``target``: (N,) integer class indices or None (unlabeled transfer set).
- ``loss_rows``: (N,) float32 (float64 for float64 inputs), ``loss_i`` of the README, 0 on rows
  whose target is ``ignore_index``.
- ``grad``: (N, C) d loss_i / d student_i, not yet scaled by the reduction or by grad_output;
  the student's dtype except float16 -> float32 (the unnormalized gradient would underflow
  float16). Empty when ``compute_grad`` is False, which skips all gradient work.

The autograd formula is the chain rule through the row losses: d student = grad *
grad_loss_rows[:, None] (``torch.ops.kdfast.scale_rows``, one pass into a fresh buffer).
Reductions (mean/sum) are ordinary torch ops on ``loss_rows``, so
1/n and grad_output arrive in float32 and the product is rounded once into the student's
dtype. Backward recomputes nothing and never syncs with the host.

``torch.ops.kdfast.distill_fwd_inplace(student, ...) -> loss_rows`` writes ``grad`` into
``student`` instead (float32/bfloat16/float64 students only); see kdfast.functional.
"""

from __future__ import annotations

import torch

from kdfast._ext import HAS_EXTENSION

ONCE_DIFFERENTIABLE = (
    "kdfast.distillation_loss is once-differentiable: double backward (create_graph=True "
    "through the loss) is not supported"
)


def once_differentiable_output(grad: torch.Tensor) -> torch.Tensor:
    """With create_graph=True, attach a node that raises if anything differentiates through
    ``grad`` (what @once_differentiable does for autograd.Function)."""
    if not torch.is_grad_enabled():
        return grad
    return torch._C._functions.DelayedError(ONCE_DIFFERENTIABLE, 1)(grad.requires_grad_())


def loss_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    wide = torch.float64 in (student.dtype, teacher.dtype)
    return torch.float64 if wide else torch.float32


def grad_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    if torch.float64 in (student.dtype, teacher.dtype):
        return torch.float64
    return torch.float32 if student.dtype == torch.float16 else student.dtype


if HAS_EXTENSION:

    @torch.library.register_fake("kdfast::distill_fwd")
    def _distill_fwd_fake(
        student, teacher, target, temperature, alpha, kind, beta, ignore_index,
        label_smoothing, scale_by_t2, compute_grad,
    ):
        n_rows, n_cols = student.shape
        loss_rows = student.new_empty((n_rows,), dtype=loss_dtype(student, teacher))
        grad_shape = (n_rows, n_cols) if compute_grad else (0,)
        grad = student.new_empty(grad_shape, dtype=grad_dtype(student, teacher))
        return loss_rows, grad

    @torch.library.register_fake("kdfast::distill_fwd_inplace")
    def _distill_fwd_inplace_fake(
        student, teacher, target, temperature, alpha, kind, beta, ignore_index,
        label_smoothing, scale_by_t2,
    ):
        return student.new_empty((student.shape[0],), dtype=loss_dtype(student, teacher))

    @torch.library.register_fake("kdfast::scale_rows")
    def _scale_rows_fake(grad, row_scale, dtype):
        return grad.new_empty(grad.shape, dtype=dtype)

    def _setup_context(ctx, inputs, output):
        student = inputs[0]
        _, grad = output
        ctx.student_dtype = student.dtype
        ctx.has_grad = grad.numel() == student.numel()
        ctx.save_for_backward(grad)
        # The stored gradient is an output only to carry it to backward: never differentiated,
        # and autograd must not materialize an N x C zero tensor as its incoming gradient.
        ctx.mark_non_differentiable(grad)
        ctx.set_materialize_grads(False)

    def _backward(ctx, grad_loss_rows, _grad_of_grad):
        if grad_loss_rows is None:
            return (None,) * 11  # no gradient flowed into the loss (not materialized)
        if not ctx.has_grad:
            raise RuntimeError(
                "kdfast: the forward ran with compute_grad=False (student did not require grad "
                "or grad mode was off), so there is no gradient to return"
            )
        (grad,) = ctx.saved_tensors
        with torch.no_grad():
            d_student = torch.ops.kdfast.scale_rows(grad, grad_loss_rows, ctx.student_dtype)
        return (once_differentiable_output(d_student),) + (None,) * 10

    torch.library.register_autograd(
        "kdfast::distill_fwd", _backward, setup_context=_setup_context
    )
