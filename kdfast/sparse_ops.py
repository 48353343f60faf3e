"""Python registrations of the sparse op: fake (meta) kernels and autograd.

``torch.ops.kdfast.sparse_distill_fwd(student, teacher_ids, teacher_logits, tail_logsumexp,
target, temperature, teacher_temperature, alpha, kind, beta, ignore_index, label_smoothing,
scale_by_t2, compute_grad, average_rows=False) -> (loss_rows, grad)``

- ``student``: (N, C) float32/bfloat16/float16/float64, any stride along C.
- ``teacher_ids``: (N, k) int32/int64 class ids in [0, C), distinct per row, -1 = empty slot;
  ``teacher_logits``: (N, k) any float dtype; ``tail_logsumexp``: (N,) any float dtype, or
  None for ``tail="renormalize"`` (the rest bin then has no teacher mass). The CPU op checks
  every id (range and duplicates) before computing anything and raises a ValueError naming
  ``teacher.indices``.
- ``target``: (N,) integer class indices or None.
- ``loss_rows``: (N,) float32 (float64 when any float input is float64): ``loss_i`` of the
  README, 0 on rows that do not count (target == ignore_index, or without target no valid id).
- ``grad``: (N, C) d loss_i / d student_i, unscaled; the dtype rule of ``distill_fwd``
  (the student's dtype, float16 -> float32, float64 when any float input is float64). Empty
  when ``compute_grad`` is False.
- ``average_rows``: both outputs divided by the number of counted rows (at least 1).

``torch.ops.kdfast.sparse_distill_fwd_inplace(student, ...) -> loss_rows`` writes ``grad`` into
``student`` instead (float32/bfloat16/float64 students), after validating every row.

The autograd formula and the eager buffer hand-over are those of :mod:`kdfast.ops`: the op's
registered autograd (torch.compile, direct callers) writes ``grad * grad_loss_rows[:, None]``
to a fresh buffer, and :class:`EagerSparseFunction` (eager calls) scales the buffer no caller
sees in place and hands it to autograd without a copy.
"""

from __future__ import annotations

import torch

from kdfast._ext import HAS_EXTENSION
from kdfast.ops import once_differentiable_output, scale_rows_in_place

# Inputs of sparse_distill_fwd after the student, up to compute_grad (exclusive).
N_OP_INPUTS = 15


def sparse_loss_dtype(student, teacher_logits, tail) -> torch.dtype:
    dtypes = {student.dtype, teacher_logits.dtype, *(() if tail is None else (tail.dtype,))}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def sparse_grad_dtype(student, teacher_logits, tail) -> torch.dtype:
    if sparse_loss_dtype(student, teacher_logits, tail) == torch.float64:
        return torch.float64
    return torch.float32 if student.dtype == torch.float16 else student.dtype


if HAS_EXTENSION:

    @torch.library.register_fake("kdfast::sparse_distill_fwd")
    def _sparse_distill_fwd_fake(
        student, teacher_ids, teacher_logits, tail_logsumexp, target, temperature,
        teacher_temperature, alpha, kind, beta, ignore_index, label_smoothing, scale_by_t2,
        compute_grad, average_rows=False,
    ):
        n_rows, n_cols = student.shape
        loss_rows = student.new_empty(
            (n_rows,), dtype=sparse_loss_dtype(student, teacher_logits, tail_logsumexp))
        grad_shape = (n_rows, n_cols) if compute_grad else (0,)
        grad = student.new_empty(
            grad_shape, dtype=sparse_grad_dtype(student, teacher_logits, tail_logsumexp))
        return loss_rows, grad

    @torch.library.register_fake("kdfast::sparse_distill_fwd_inplace")
    def _sparse_distill_fwd_inplace_fake(
        student, teacher_ids, teacher_logits, tail_logsumexp, target, temperature,
        teacher_temperature, alpha, kind, beta, ignore_index, label_smoothing, scale_by_t2,
        average_rows=False,
    ):
        return student.new_empty(
            (student.shape[0],), dtype=sparse_loss_dtype(student, teacher_logits, tail_logsumexp))

    def _setup_context(ctx, inputs, output):
        student = inputs[0]
        _, grad = output
        ctx.student_dtype = student.dtype
        ctx.has_grad = grad.numel() == student.numel()
        # As in kdfast.ops: the gradient output only carries the gradient to backward.
        ctx.mark_non_differentiable(grad)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad)

    def _backward(ctx, grad_loss_rows, _grad_of_grad):
        if grad_loss_rows is None:
            return (None,) * N_OP_INPUTS
        if not ctx.has_grad:
            raise RuntimeError(
                "kdfast: the forward ran with compute_grad=False (student did not require grad "
                "or grad mode was off), so there is no gradient to return"
            )
        with torch.no_grad():
            (grad,) = ctx.saved_tensors
            d_student = torch.ops.kdfast.scale_rows(grad, grad_loss_rows, ctx.student_dtype)
        return (once_differentiable_output(d_student),) + (None,) * (N_OP_INPUTS - 1)

    torch.library.register_autograd(
        "kdfast::sparse_distill_fwd", _backward, setup_context=_setup_context
    )

    class EagerSparseFunction(torch.autograd.Function):
        """``sparse_distill_fwd`` with its gradient, for plain tensors outside torch.compile.

        ``apply(student, teacher_ids, teacher_logits, tail_logsumexp, target, temperature,
        teacher_temperature, alpha, kind, beta, ignore_index, label_smoothing, scale_by_t2,
        average_rows) -> loss_rows``. The first backward scales the op's gradient buffer in
        place (nothing when every row's scale is 1) and hands it to autograd, which adopts it
        as ``.grad`` without a copy; a second backward (retain_graph=True) recomputes it.
        """

        @staticmethod
        def forward(ctx, student, teacher_ids, teacher_logits, tail, target, *op_args):
            with torch._C._AutoDispatchBelowADInplaceOrView():
                loss_rows, grad = torch.ops.kdfast.sparse_distill_fwd.default(
                    student, teacher_ids, teacher_logits, tail, target, *op_args[:-1], True,
                    op_args[-1],
                )
            ctx.student_dtype = student.dtype
            ctx.grad_buffer = grad
            ctx.save_for_backward(student, teacher_ids, teacher_logits, tail, target)
            ctx.op_args = op_args
            return loss_rows

        @staticmethod
        def backward(ctx, grad_loss_rows):
            with torch.no_grad():
                grad, ctx.grad_buffer = ctx.grad_buffer, None
                if grad is None:
                    student, *teacher = ctx.saved_tensors
                    with torch._C._AutoDispatchBelowADInplaceOrView():
                        _, grad = torch.ops.kdfast.sparse_distill_fwd.default(
                            student.detach(), *teacher, *ctx.op_args[:-1], True, ctx.op_args[-1]
                        )
                d_student = scale_rows_in_place(grad, grad_loss_rows, ctx.student_dtype)
                del grad  # autograd adopts d_student as .grad only if it holds the last reference
            return (once_differentiable_output(d_student),) + (None,) * (N_OP_INPUTS - 2)

    class InplaceSparseFunction(torch.autograd.Function):
        """The autograd Function behind ``inplace=True``: forward writes d loss_i / d student
        into ``student``'s buffer (``sparse_distill_fwd_inplace``), backward scales that buffer
        in place and returns it; no N x C buffer is allocated. Arguments as
        :class:`EagerSparseFunction`."""

        @staticmethod
        def forward(ctx, student, *op_args):
            loss_rows = torch.ops.kdfast.sparse_distill_fwd_inplace(student, *op_args)
            torch.autograd.graph.increment_version(student)
            ctx.save_for_backward(student)
            return loss_rows

        @staticmethod
        def backward(ctx, grad_loss_rows):
            (grad,) = ctx.saved_tensors
            with torch.no_grad():
                grad = scale_rows_in_place(grad, grad_loss_rows, grad.dtype)
            torch.autograd.graph.increment_version(grad)
            return (once_differentiable_output(grad.detach()),) + (None,) * (N_OP_INPUTS - 2)
