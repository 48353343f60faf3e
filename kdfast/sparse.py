"""Sparse teacher targets: kdfast.SparseTargets, kdfast.sparse_distillation_loss and
kdfast.SparseKDLoss.

The teacher is given at k classes per row (e.g. its top-k logits, as a soft-target cache
stores them) instead of all C. CPU tensors (and CUDA tensors, in builds with the CUDA kernels) go
through the fused kernel (``torch.ops.kdfast.sparse_distill_fwd``, :mod:`kdfast.sparse_ops`);
other devices, and builds without the compiled module, through the pure-PyTorch reference
(:mod:`kdfast.reference_sparse`, autograd gives the gradient), with the same results.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdfast import reference
from kdfast._checks import KINDS, REDUCTIONS, check_distillation_args
from kdfast._ext import HAS_EXTENSION
from kdfast._sparse_checks import (
    TAILS,
    SparseTargets,
    check_index_values,
    check_sparse_args,
    check_sparse_scalars,
)
from kdfast.functional import check_inplace_memory
from kdfast.module import _check_bool, _check_ignore_index, _check_str

if HAS_EXTENSION:
    from kdfast.ops import is_eager
    from kdfast.sparse_ops import EagerSparseFunction, InplaceSparseFunction

__all__ = ["SparseKDLoss", "SparseTargets", "sparse_distillation_loss", "sparse_distillation_loss_inplace"]


def sparse_distillation_loss(
    student_logits: torch.Tensor,
    teacher: SparseTargets,
    target: torch.Tensor | None = None,
    *,
    tail: str = "renormalize",
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    alpha: float = 0.5,
    kind: str = "kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    scale_by_t2: bool = True,
) -> torch.Tensor:
    """Knowledge-distillation loss against a sparse teacher (its logits at k classes per row).

    Per row of the flattened ``(..., C)`` student logits s, with K the row's valid ids (not
    -1), z_K the teacher's logits there, T = ``temperature``, T_t = ``teacher_temperature``
    and q = softmax(s / T) over all C classes:

    - ``tail="renormalize"``: p~ = softmax(z_K / T_t) over K only;
      ``soft = sum_{i in K} p~_i (log p~_i - log q_i)`` (the student is not renormalized).
      ``kind="kl"`` only.
    - ``tail="bucket"``: the rest of the vocabulary is one more bin R.
      L = logsumexp(logsumexp(z_K / T_t), tail_logsumexp); p_i = exp(z_i / T_t - L),
      P_R = exp(tail_logsumexp - L); Q_R = sum_{j not in K} q_j. ``soft`` is ``kind``
      between (p_K, P_R) and (q_K, Q_R): the exact divergence of the coarsened distributions,
      a lower bound of the full one, equal to it when K holds every class.
    - ``soft`` is multiplied by T**2 when ``scale_by_t2`` (default), which keeps the soft
      gradients' magnitude independent of T; ``hard`` (softmax(s) at T = 1 over all C, with
      label smoothing), ``alpha`` and the reductions are those of
      :func:`kdfast.distillation_loss`.
    - Counting: a row counts if its target is not ``ignore_index``, or, with ``target=None``,
      if it has at least one valid id (rows of -1 only are padding). A counted row without
      valid ids has soft = 0 (its hard term still counts).

    With k = C (every id, any order) and T_t = T both tails equal
    :func:`kdfast.distillation_loss`, loss and gradient.

    Args:
        student_logits: ``(..., C)`` float32/bfloat16/float16/float64; receives the gradient.
        teacher: :class:`kdfast.SparseTargets` ``(indices, logits, tail_logsumexp)``:
            ``indices`` ``(..., k)`` int32/int64 distinct class ids in [0, C) per row, -1 for
            an empty slot; ``logits`` ``(..., k)`` float, the teacher's raw logits there;
            ``tail_logsumexp`` ``(...)`` float, log sum_{j not in K} exp(z_j / T_t) (-inf when
            K holds every class), or None (``tail="bucket"`` needs it). None may require grad.
        target: ``(...)`` integer class indices in [0, C) or ``ignore_index``, or None.
        tail: "renormalize" (default) or "bucket".
        temperature: T > 0, of the student softmax and of the T**2 factor, default 1.0.
        teacher_temperature: T_t > 0 applied to ``teacher.logits``; default None = T.
        alpha: weight of the soft term in [0, 1], default 0.5 (ignored without target).
        kind: "kl" (default), "reverse_kl" or "jsd" (the last two with ``tail="bucket"``).
        beta: jsd's teacher weight in (0, 1), default 0.5.
        ignore_index: target value marking padding rows, default -100.
        label_smoothing: eps in [0, 1] for the hard term, default 0.0.
        reduction: "mean" (default; sum over counted rows / their number, 0.0 if none),
            "batchmean" (alias of "mean"), "sum", or "none" (shape ``(...)``, 0 on rows that
            do not count).
        scale_by_t2: multiply the soft term by T**2, default True.

    Returns:
        The loss, float32 (float64 when any input is float64): bf16/fp16 inputs are widened
        to float32 before any arithmetic. The student's gradient has its dtype.

    Bad input raises naming the argument: ids outside [-1, C), an id twice in a row (checked
    for CPU tensors; on CUDA duplicates are not detected), shape, dtype or device mismatches,
    ``tail="bucket"`` without ``tail_logsumexp``, a teacher tensor requiring grad, unknown
    ``tail``/``kind``, and every check of :func:`kdfast.distillation_loss`.

    CPU tensors use the fused kernel: the student row is read once for all its normalizers,
    the gradient written once, nothing else N x C is allocated (double backward raises).
    CUDA tensors too in builds with the CUDA kernels (the student row read twice; the ids'
    range is checked here with a host sync). Other devices compute through
    :func:`kdfast.reference.sparse_distillation_loss`.
    :func:`sparse_distillation_loss_inplace` writes the gradient into the student's buffer.
    """
    return _sparse_loss(
        student_logits, teacher, target, inplace=False, tail=tail, temperature=temperature,
        teacher_temperature=teacher_temperature, alpha=alpha, kind=kind, beta=beta,
        ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
        scale_by_t2=scale_by_t2,
    )


def sparse_distillation_loss_inplace(
    student_logits: torch.Tensor, teacher: SparseTargets, target: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """:func:`sparse_distillation_loss` (same keyword arguments) that writes the gradient into
    ``student_logits``' buffer during forward, as ``distillation_loss(..., inplace=True)``
    does: saves one N x C buffer and destroys the logits' values. float32/bfloat16/float64
    CPU (or CUDA, with the CUDA kernels) students, eager mode, the compiled kernels; every
    row's ids and target are validated before any row is written, and a student sharing
    memory with a teacher tensor or the target raises ValueError. Backward scales the buffer
    in place and returns it as the gradient (the fused output layer's contract)."""
    return _sparse_loss(student_logits, teacher, target, inplace=True, **kwargs)


def _sparse_loss(
    student_logits: torch.Tensor, teacher: SparseTargets, target: torch.Tensor | None, *,
    inplace: bool, tail: str = "renormalize", temperature: float = 1.0,
    teacher_temperature: float | None = None, alpha: float = 0.5, kind: str = "kl",
    beta: float = 0.5, ignore_index: int = -100, label_smoothing: float = 0.0,
    reduction: str = "mean", scale_by_t2: bool = True,
) -> torch.Tensor:
    use_op = uses_sparse_op(student_logits)
    check_sparse_args(
        student_logits, teacher, target, tail=tail, temperature=temperature,
        teacher_temperature=teacher_temperature, alpha=alpha, kind=kind, beta=beta,
        label_smoothing=label_smoothing, reduction=reduction,
        # The CPU op validates the ids before writing; on CUDA the op's check is a device
        # assert, so the ValueError comes from here (a host sync).
        check_values=not (use_op and student_logits.is_cpu),
    )
    if not use_op:
        if inplace:
            raise RuntimeError("the in-place sparse loss needs the compiled kdfast._C kernels and CPU "
                               "or CUDA tensors")
        return reference.sparse_distillation_loss(
            student_logits, teacher, target, tail=tail, temperature=temperature,
            teacher_temperature=teacher_temperature, alpha=alpha, kind=kind, beta=beta,
            ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction,
            scale_by_t2=scale_by_t2,
        )
    def loss_rows_of_op() -> torch.Tensor:
        return _sparse_loss_rows(
            student_logits, teacher, target, tail=tail, temperature=temperature,
            teacher_temperature=teacher_temperature, alpha=alpha, kind=kind, beta=beta,
            ignore_index=ignore_index, label_smoothing=label_smoothing,
            average=reduction in ("mean", "batchmean"), scale_by_t2=scale_by_t2, inplace=inplace,
        )

    if torch.compiler.is_compiling():
        loss_rows = loss_rows_of_op()  # fake tensors: no values, no id errors to translate
    else:
        try:
            loss_rows = loss_rows_of_op()
        except ValueError as exc:
            if "teacher.indices" in str(exc):
                # The op names the flattened (N, k) position; the caller's shape may differ.
                check_index_values(teacher.indices, student_logits.shape[-1])
            raise
    if reduction == "none":
        return loss_rows.reshape(student_logits.shape[:-1])
    return loss_rows.sum()


def uses_sparse_op(student_logits: torch.Tensor) -> bool:
    """Whether :func:`sparse_distillation_loss` runs ``torch.ops.kdfast.sparse_distill_fwd`` for
    this student: the extension is built with a kernel for its device (CPU; CUDA when built
    with the CUDA kernels)."""
    if not HAS_EXTENSION or not isinstance(student_logits, torch.Tensor):
        return False
    if student_logits.is_cpu:
        return True
    return student_logits.is_cuda and torch._C._dispatch_has_kernel_for_dispatch_key(
        "kdfast::sparse_distill_fwd", "CUDA"
    )


def _sparse_loss_rows(
    student_logits: torch.Tensor, teacher: SparseTargets, target: torch.Tensor | None, *,
    tail: str, temperature: float, teacher_temperature: float | None, alpha: float, kind: str,
    beta: float, ignore_index: int, label_smoothing: float, average: bool, scale_by_t2: bool,
    inplace: bool,
) -> torch.Tensor:
    """The op's (N,) row losses of the flattened inputs, with the gradient wired to autograd."""
    n_cols, k = student_logits.shape[-1], teacher.indices.shape[-1]
    student = student_logits.reshape(-1, n_cols)
    tail_lse = teacher.tail_logsumexp.reshape(-1) if tail == "bucket" else None
    t_t = temperature if teacher_temperature is None else teacher_temperature
    args = (teacher.indices.reshape(-1, k), teacher.logits.reshape(-1, k), tail_lse,
            None if target is None else target.reshape(-1), float(temperature), float(t_t),
            float(alpha), kind, float(beta), int(ignore_index), float(label_smoothing),
            bool(scale_by_t2))
    if inplace:
        for name, other in (("teacher.indices", teacher.indices), ("teacher.logits", teacher.logits),
                            ("teacher.tail_logsumexp", teacher.tail_logsumexp)):
            check_inplace_memory(student_logits, other, None, teacher_name=name)
        check_inplace_memory(student_logits, None, target)
        if student.stride(-1) != 1 and n_cols > 1:
            student = student.contiguous()
        return InplaceSparseFunction.apply(student, *args, average)
    compute_grad = student.requires_grad and torch.is_grad_enabled()
    if compute_grad and is_eager(student):
        return EagerSparseFunction.apply(student, *args, average)
    loss_rows, _ = torch.ops.kdfast.sparse_distill_fwd(student, *args, compute_grad, average)
    return loss_rows


def check_sparse_kdloss_args(
    *, tail: str, temperature: float, teacher_temperature: float | None, alpha: float, kind: str,
    beta: float, ignore_index: int, label_smoothing: float, reduction: str, scale_by_t2: bool,
) -> None:
    """Checks every argument of :class:`SparseKDLoss`; raises a TypeError (wrong type) or a
    ValueError (out of range) naming the argument and what it expects."""
    _check_str("tail", tail, TAILS)
    _check_str("kind", kind, KINDS)
    _check_str("reduction", reduction, REDUCTIONS)
    _check_ignore_index(ignore_index)
    _check_bool("scale_by_t2", scale_by_t2)
    probe = torch.zeros(1, 1)  # the tensor checks need tensors; only the scalars are at stake
    check_distillation_args(
        probe, probe, None, temperature=temperature, alpha=alpha, kind=kind, beta=beta,
        label_smoothing=label_smoothing, reduction=reduction,
    )
    check_sparse_scalars(tail=tail, kind=kind, teacher_temperature=teacher_temperature)


class SparseKDLoss(nn.Module):
    """Sparse-teacher distillation loss module; arguments and defaults as in
    :func:`kdfast.sparse_distillation_loss` (tail="renormalize", temperature=1.0,
    teacher_temperature=None, alpha=0.5, kind="kl", beta=0.5, ignore_index=-100,
    label_smoothing=0.0, reduction="mean", scale_by_t2=True).

    ``forward(student_logits, teacher: SparseTargets, target=None)``. Every argument is
    checked when the module is built (a TypeError for a wrong type, a ValueError for a value
    out of range or an unsupported pairing such as ``tail="renormalize"`` with
    ``kind="jsd"``), each naming the argument. :meth:`config` implements kdfast's
    configuration protocol (see :class:`kdfast.KDLoss`): ``SparseKDLoss(**loss.config())``
    builds an equal loss.
    """

    def __init__(
        self,
        tail: str = "renormalize",
        temperature: float = 1.0,
        teacher_temperature: float | None = None,
        alpha: float = 0.5,
        kind: str = "kl",
        beta: float = 0.5,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        scale_by_t2: bool = True,
    ) -> None:
        super().__init__()
        check_sparse_kdloss_args(
            tail=tail, temperature=temperature, teacher_temperature=teacher_temperature,
            alpha=alpha, kind=kind, beta=beta, ignore_index=ignore_index,
            label_smoothing=label_smoothing, reduction=reduction, scale_by_t2=scale_by_t2,
        )
        self.tail = tail
        # Numbers stored as float: config() and the repr do not depend on 2 vs 2.0.
        self.temperature = float(temperature)
        self.teacher_temperature = None if teacher_temperature is None else float(teacher_temperature)
        self.alpha = float(alpha)
        self.kind = kind
        self.beta = float(beta)
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self.scale_by_t2 = scale_by_t2

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher: SparseTargets,
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return sparse_distillation_loss(student_logits, teacher, target, **self.config())

    def config(self) -> dict[str, Any]:
        """All constructor arguments, as a JSON-able dict: ``SparseKDLoss(**loss.config())``
        builds an equal loss."""
        return {
            "tail": self.tail, "temperature": self.temperature,
            "teacher_temperature": self.teacher_temperature, "alpha": self.alpha,
            "kind": self.kind, "beta": self.beta, "ignore_index": self.ignore_index,
            "label_smoothing": self.label_smoothing, "reduction": self.reduction,
            "scale_by_t2": self.scale_by_t2,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.config().items())
