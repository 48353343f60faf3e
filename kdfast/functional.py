"""The functional API: kdfast.distillation_loss, shaped like torch.nn.functional."""

from __future__ import annotations

import torch

from kdfast import reference
from kdfast._checks import check_distillation_args
from kdfast._ext import HAS_EXTENSION
from kdfast.ops import once_differentiable_output, scale_rows_in_place

if HAS_EXTENSION:
    from kdfast.ops import EagerDistillFunction, is_eager

__all__ = ["distillation_loss", "DistillationLossFunction"]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    kind: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    scale_by_t2: bool = True,
    inplace: bool = False,
) -> torch.Tensor:
    """Fused knowledge-distillation loss (Hinton et al. 2015), forward and gradient in one pass.

    Per row i of the flattened ``(..., C)`` logits, with p = softmax(teacher/T),
    q = softmax(student/T) and r = softmax(student):

    - ``soft_i``: ``kind="kl"`` KL(p||q); ``"reverse_kl"`` KL(q||p); ``"jsd"``
      beta*KL(p||m) + (1-beta)*KL(q||m), m = beta*p + (1-beta)*q (in log space).
      Multiplied by T**2 when ``scale_by_t2`` (default), which keeps the soft gradients'
      magnitude independent of T, as the paper recommends.
      ``"logit_mse"``: logit matching (Caruana et al. 2006), (1/(2C)) * sum_j (s^_j - t^_j)**2
      with s^, t^ the student's and teacher's raw logits centred to zero mean over the row;
      the limit of T**2 * KL(p||q) as T -> infinity (the paper's section 2.1), its gradient
      (s^_j - t^_j)/C. It takes ``temperature=1`` only (ValueError otherwise) and T**2 is not
      applied (``scale_by_t2`` has no effect).
    - ``hard_i``: cross-entropy of r against ``target`` with ``label_smoothing`` eps:
      (1-eps)*(-log r_y) + eps*mean_j(-log r_j).
    - ``loss_i = alpha*soft_i + (1-alpha)*hard_i``; rows whose target is ``ignore_index`` count
      in neither term. With ``target=None`` (unlabeled transfer set) ``loss_i = soft_i``.

    Args:
        student_logits: ``(..., C)`` float32/bfloat16/float16/float64; receives the gradient.
        teacher_logits: same shape (a vocabulary mismatch raises: slice explicitly), any of
            those dtypes, must not require grad (detach it).
        target: ``(...)`` integer class indices in [0, C) or ``ignore_index``, or None.
        temperature: T > 0, default 1.0; must be 1 for ``kind="logit_mse"``.
        alpha: weight of the soft term in [0, 1], default 0.5 (ignored without target).
        kind: "kl" (default), "reverse_kl", "jsd" or "logit_mse".
        beta: jsd's teacher weight in (0, 1), default 0.5.
        ignore_index: target value marking padding rows, default -100.
        label_smoothing: eps in [0, 1] for the hard term, default 0.0.
        reduction: "mean" (default; sum over counted rows / their number, 0.0 if none),
            "batchmean" (alias of "mean"), "sum", or "none" (shape ``(...)``, 0 on ignored rows).
        scale_by_t2: multiply the soft term by T**2, default True.
        inplace: write the gradient into ``student_logits``' buffer during forward (saves one
            N x C buffer; the logits' values are destroyed). float32/bfloat16/float64 only,
            eager mode only. The student must have memory of its own: an ``expand()``ed one,
            or one sharing memory with ``teacher_logits`` or ``target``, raises ValueError.
            A leaf student (``logits.detach().requires_grad_()``) whose ``.grad`` is None gets
            as ``.grad`` its own buffer, without a copy: the leaf then holds the gradient too,
            and a later in-place change of either changes both (an existing ``.grad`` is added
            to as usual). Another ``inplace=True`` call on a leaf whose ``.grad`` is its
            buffer raises: set ``.grad = None`` first.

    Returns:
        The loss, float32 (float64 for float64 inputs): accumulated in float32 whatever the
        input dtype.

    Masked vocabulary: -inf teacher entries contribute nothing for "kl" and "jsd" (0 log 0 = 0);
    for "reverse_kl" the loss is +inf wherever the student puts mass on them; for "logit_mse"
    any non-finite teacher logit (-inf, +inf or NaN) makes its row's loss NaN (the row mean it is
    centred by is not finite). NaN inputs give NaN. Double backward is not supported.
    """
    check_distillation_args(
        student_logits, teacher_logits, target, temperature=temperature, alpha=alpha,
        kind=kind, beta=beta, label_smoothing=label_smoothing, reduction=reduction,
    )
    if not HAS_EXTENSION:
        if inplace:
            raise RuntimeError("inplace=True needs the compiled kdfast._C kernels")
        return reference.distillation_loss(
            student_logits, teacher_logits, target, temperature=temperature, alpha=alpha,
            kind=kind, beta=beta, ignore_index=ignore_index, label_smoothing=label_smoothing,
            reduction=reduction, scale_by_t2=scale_by_t2,
        )
    n_cols = student_logits.shape[-1]
    batch_shape = student_logits.shape[:-1]
    student = student_logits.reshape(-1, n_cols)
    teacher = teacher_logits.reshape(-1, n_cols)
    flat_target = target.reshape(-1) if target is not None else None
    # "mean": the op divides each row loss (and its gradient) by the counted rows itself, so
    # the loss is a plain sum and backward does no work when grad_output is 1.
    average = reduction in ("mean", "batchmean")
    args = (teacher, flat_target, float(temperature), float(alpha), kind, float(beta),
            int(ignore_index), float(label_smoothing), bool(scale_by_t2))
    if inplace:
        check_inplace_memory(student_logits, teacher_logits, target)
        # The kernel needs unit stride along C. A copy (here or in reshape) still gets the
        # gradient right, through the copy's backward; it only loses the memory saving.
        if student.stride(-1) != 1 and n_cols > 1:
            student = student.contiguous()
        loss_rows = DistillationLossFunction.apply(student, *args, average)
    else:
        compute_grad = student.requires_grad and torch.is_grad_enabled()
        if compute_grad and is_eager(student):
            loss_rows = EagerDistillFunction.apply(student, *args, average)
        else:
            loss_rows, _ = torch.ops.kdfast.distill_fwd(student, *args, compute_grad, average)
    if reduction == "none":
        return loss_rows.reshape(batch_shape)
    return loss_rows.sum()


def check_inplace_memory(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor | None,
    *, teacher_name: str = "teacher_logits",
) -> None:
    """inplace=True writes the gradient over ``student_logits``: refuses a student whose
    elements share memory with each other (expand()), with ``teacher_logits`` or ``target``,
    or with its own ``.grad`` (left by an earlier in-place backward on a leaf).

    Checked on the caller's tensors, before a reshape or a unit-stride copy could hide the
    sharing from the op (which checks the tensors it gets too, row by row, exactly). Here any
    intersection of the address ranges counts, so two disjoint interleaved slices of one
    buffer are refused as well.
    """
    if not is_eager(student_logits):
        return  # in-place mode is eager-only; fake tensors have no addresses
    broadcast = [dim for dim, (size, stride) in enumerate(zip(student_logits.shape,
                                                              student_logits.stride(), strict=True))
                 if stride == 0 and size > 1]
    if broadcast:
        raise ValueError(
            f"inplace=True needs student_logits whose elements do not share memory, got strides "
            f"{student_logits.stride()} for shape {tuple(student_logits.shape)} (stride 0 in dim "
            f"{broadcast[0]}: from expand() or broadcasting); the gradients of all those "
            "elements would be written to the same memory. Pass student_logits.contiguous() or "
            "use inplace=False"
        )
    for name, other in ((teacher_name, teacher_logits), ("target", target)):
        if other is not None and _address_ranges_meet(student_logits, other):
            raise ValueError(
                f"inplace=True writes the gradient over student_logits, but {name} shares memory "
                f"with it (the same tensor, or views of one buffer): expected separate buffers. "
                f"Pass {name}.clone() or use inplace=False"
            )
    grad = student_logits.grad if student_logits.is_leaf else None
    if grad is not None and _address_ranges_meet(student_logits, grad):
        raise ValueError(
            "inplace=True would overwrite student_logits.grad, which is student_logits' own "
            "buffer (an earlier inplace=True backward made it so): expected a .grad of its own. "
            "Set student_logits.grad = None (after using it) first, or use inplace=False"
        )


def _address_ranges_meet(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two plain tensors lie in one storage with intersecting address ranges."""
    if type(b) is not torch.Tensor or a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    storage = a.untyped_storage().data_ptr()
    if storage == 0 or storage != b.untyped_storage().data_ptr():
        return False
    a_begin, a_end = _address_range(a)
    b_begin, b_end = _address_range(b)
    return a_begin < b_end and b_begin < a_end


def _address_range(t: torch.Tensor) -> tuple[int, int]:
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


class DistillationLossFunction(torch.autograd.Function):
    """The autograd Function behind ``inplace=True``: per-row losses of ``student`` (N, C).

    ``apply(student, teacher, target, temperature, alpha, kind, beta, ignore_index,
    label_smoothing, scale_by_t2, average_rows) -> loss_rows (N,)``. Forward writes d loss_i / d student into
    ``student``'s buffer; backward scales that buffer in place by grad_loss_rows and returns
    it, so no N x C buffer is allocated at all. Calling backward twice raises (the saved buffer
    was already consumed).
    """

    @staticmethod
    def forward(ctx, student, teacher, target, temperature, alpha, kind, beta, ignore_index,
                label_smoothing, scale_by_t2, average_rows=False):
        loss_rows = torch.ops.kdfast.distill_fwd_inplace(
            student, teacher, target, temperature, alpha, kind, beta, ignore_index,
            label_smoothing, scale_by_t2, average_rows,
        )
        # The op writes through a raw pointer; tell autograd the buffer changed so any other
        # saved reference to the logits fails loudly instead of reading the gradient.
        torch.autograd.graph.increment_version(student)
        ctx.save_for_backward(student)
        return loss_rows

    @staticmethod
    def backward(ctx, grad_loss_rows):
        (grad,) = ctx.saved_tensors
        with torch.no_grad():
            grad = scale_rows_in_place(grad, grad_loss_rows, grad.dtype)
        # Consumed: a second backward must fail on the version check even when the scale was 1
        # and the buffer was left untouched (its new owner may modify it).
        torch.autograd.graph.increment_version(grad)
        # Detached: the buffer is the student's, whose graph must not be differentiated into.
        return (once_differentiable_output(grad.detach()),) + (None,) * 10
