"""Python registrations for the compiled ops: fake (meta) kernels and autograd.

``torch.ops.kdfast.distill_fwd(student, teacher, target, temperature, alpha, kind, beta,
ignore_index, label_smoothing, scale_by_t2, compute_grad, average_rows=False)
-> (loss_rows, grad)``

- ``student``, ``teacher``: (N, C) float32/bfloat16/float16/float64 (float64 pairs only with
  float64: the op upcasts the other side), the class dimension may have any stride.
- ``target``: (N,) integer class indices or None (unlabeled transfer set).
- ``loss_rows``: (N,) float32 (float64 for float64 inputs), ``loss_i`` of the README, 0 on rows
  whose target is ``ignore_index``.
- ``grad``: (N, C) d loss_i / d student_i, not yet scaled by the reduction or by grad_output;
  the student's dtype except float16 -> float32 (the unnormalized gradient would underflow
  float16). Empty when ``compute_grad`` is False, which skips all gradient work.
- ``average_rows``: both outputs are divided by the number of counted rows (target !=
  ignore_index; N without target; at least 1), counted by the op itself (on the device for
  CUDA: no host sync). Then ``loss_rows.sum()`` is the "mean" reduction and its backward,
  with grad_output 1, scales by exactly 1.

The autograd formula is the chain rule through the row losses: d student = grad *
grad_loss_rows[:, None], computed in float32 (or float64) and rounded once into the
student's dtype. The op's registered autograd (torch.compile, direct callers of the op) writes
the product to a fresh buffer (``torch.ops.kdfast.scale_rows``): the caller holds ``grad``,
which backward therefore never changes (and autograd's version check refuses a backward after
the caller changed it in place). In eager mode kdfast.distillation_loss calls the kernel
through ``EagerDistillFunction`` instead, whose ``grad`` no caller ever sees: its first
backward scales that buffer in place (nothing at all when every row's scale is 1) and returns
it, and autograd adopts it as ``.grad`` without a copy: no second N x C buffer. A later
backward through the same graph (retain_graph=True) recomputes it from the saved inputs. It
also skips torch.library's per-call Python autograd layers.

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


def scale_rows_in_place(grad: torch.Tensor, row_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad * row_scale[:, None]`` as ``dtype``, reusing ``grad``'s buffer when the dtypes
    match; nothing is done when the scale is 1 everywhere (the "mean"/"sum" loss with
    grad_output 1). The product is computed in float32 (or float64) and rounded once."""
    if grad.dtype != dtype:
        return torch.ops.kdfast.scale_rows(grad, row_scale, dtype)
    if row_scale.numel() == 0:
        return grad
    if row_scale.stride(0) == 0 or row_scale.numel() == 1:
        # One value for every row (the backward of a sum). Reading it syncs, so only on CPU.
        if grad.is_cpu:
            value = row_scale[0].item()
            if value != 1.0:
                grad.mul_(value)
            return grad
        return grad.mul_(row_scale[:1].unsqueeze(-1))
    return grad.mul_(row_scale.unsqueeze(-1))


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
        label_smoothing, scale_by_t2, compute_grad, average_rows=False,
    ):
        n_rows, n_cols = student.shape
        loss_rows = student.new_empty((n_rows,), dtype=loss_dtype(student, teacher))
        grad_shape = (n_rows, n_cols) if compute_grad else (0,)
        grad = student.new_empty(grad_shape, dtype=grad_dtype(student, teacher))
        return loss_rows, grad

    @torch.library.register_fake("kdfast::distill_fwd_inplace")
    def _distill_fwd_inplace_fake(
        student, teacher, target, temperature, alpha, kind, beta, ignore_index,
        label_smoothing, scale_by_t2, average_rows=False,
    ):
        return student.new_empty((student.shape[0],), dtype=loss_dtype(student, teacher))

    @torch.library.register_fake("kdfast::scale_rows")
    def _scale_rows_fake(grad, row_scale, dtype):
        return grad.new_empty(grad.shape, dtype=dtype)

    @torch.library.register_fake("kdfast::linear_distill_fwd")
    def _linear_distill_fwd_fake(
        hidden, weight, bias, target, teacher_logits, teacher_hidden, teacher_weight,
        teacher_bias, teacher_ids, teacher_sparse_logits, tail_logsumexp, temperature,
        teacher_temperature, alpha, kind, beta, ignore_index, label_smoothing, scale_by_t2,
        chunk_rows, compute_grad, row_scale,
    ):
        teacher_floats = (teacher_logits, teacher_sparse_logits, tail_logsumexp)
        wide = torch.float64 in (hidden.dtype, *(getattr(t, "dtype", None) for t in teacher_floats))
        loss_rows = hidden.new_empty((hidden.shape[0],), dtype=torch.float64 if wide else torch.float32)
        if not compute_grad:
            return loss_rows, *(hidden.new_empty((0,)) for _ in range(3))
        d_bias = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty((0,))
        return loss_rows, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), d_bias

    def is_eager(t: torch.Tensor) -> bool:
        # A plain tensor outside torch.compile's tracing: its buffer may be handed to autograd.
        return type(t) is torch.Tensor and not torch.compiler.is_compiling()

    def _keep_for_eager_backward(ctx, student, teacher, target, op_args, grad):
        # Only for a `grad` that no caller holds (EagerDistillFunction): the first backward
        # scales the buffer in place and hands it to autograd (which adopts it as .grad: no
        # second N x C buffer, no second pass when the scale is 1). A later backward
        # (retain_graph=True) recomputes from the inputs, which autograd checks were not
        # modified in place. op_args: temperature .. scale_by_t2, average_rows.
        ctx.student_dtype = student.dtype
        ctx.grad_buffer = grad
        ctx.save_for_backward(student, teacher, target)
        ctx.op_args = op_args

    def _eager_grad(ctx, grad_loss_rows):
        grad, ctx.grad_buffer = ctx.grad_buffer, None
        if grad is None:
            student, teacher, target = ctx.saved_tensors
            with torch._C._AutoDispatchBelowADInplaceOrView():
                _, grad = torch.ops.kdfast.distill_fwd.default(
                    student.detach(), teacher, target, *ctx.op_args[:-1], True, ctx.op_args[-1]
                )
        d_student = scale_rows_in_place(grad, grad_loss_rows, ctx.student_dtype)
        del grad  # autograd adopts d_student as .grad only if it holds the last reference
        return d_student

    def _setup_context(ctx, inputs, output):
        student = inputs[0]
        _, grad = output
        ctx.student_dtype = student.dtype
        ctx.has_grad = grad.numel() == student.numel()
        # The stored gradient is an output only to carry it to backward: never differentiated,
        # and autograd must not materialize an N x C zero tensor as its incoming gradient.
        ctx.mark_non_differentiable(grad)
        ctx.set_materialize_grads(False)
        # The caller holds `grad` (it is the op's output): backward reads it and writes a
        # fresh buffer, never scaling it in place.
        ctx.save_for_backward(grad)

    def _backward(ctx, grad_loss_rows, _grad_of_grad):
        if grad_loss_rows is None:
            return (None,) * 12  # no gradient flowed into the loss (not materialized)
        if not ctx.has_grad:
            raise RuntimeError(
                "kdfast: the forward ran with compute_grad=False (student did not require grad "
                "or grad mode was off), so there is no gradient to return"
            )
        with torch.no_grad():
            (grad,) = ctx.saved_tensors
            d_student = torch.ops.kdfast.scale_rows(grad, grad_loss_rows, ctx.student_dtype)
        # Outside no_grad: with create_graph=True the result must carry the error node.
        return (once_differentiable_output(d_student),) + (None,) * 11

    class EagerDistillFunction(torch.autograd.Function):
        """``distill_fwd`` with its gradient, for plain tensors outside torch.compile.

        Same results and buffer hand-over as the op's registered autograd, without the Python
        layers torch.library puts around every call of an op with a Python autograd kernel
        (about 150 us per forward+backward on this project's CPU machine, most of a small
        batch's step). ``apply(student, teacher, target, temperature, alpha, kind, beta,
        ignore_index, label_smoothing, scale_by_t2, average_rows) -> loss_rows``.
        """

        @staticmethod
        def forward(ctx, student, teacher, target, *op_args):
            # Straight to the backend kernel: this Function is the autograd.
            with torch._C._AutoDispatchBelowADInplaceOrView():
                loss_rows, grad = torch.ops.kdfast.distill_fwd.default(
                    student, teacher, target, *op_args[:-1], True, op_args[-1]
                )
            _keep_for_eager_backward(ctx, student, teacher, target, op_args, grad)
            return loss_rows

        @staticmethod
        def backward(ctx, grad_loss_rows):
            with torch.no_grad():
                d_student = _eager_grad(ctx, grad_loss_rows)
            return (once_differentiable_output(d_student),) + (None,) * 10

    torch.library.register_autograd(
        "kdfast::distill_fwd", _backward, setup_context=_setup_context
    )
