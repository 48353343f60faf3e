"""The student's output layer fused with the distillation loss: kdfast.linear_distillation_loss
and kdfast.LinearKDLoss.

In language-model distillation the logits dominate memory (8192 tokens x a 128k vocabulary is
4 GiB in float32 for the student alone, more with the teacher's and autograd's copies). Here
the student's logits exist one chunk of rows at a time: a chunk's logits come from a matmul,
the fused row kernel turns them into their own gradient in place, and the chunk's hidden,
weight and bias gradients follow (csrc/linear_distill.cpp, one op for CPU and CUDA).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kdfast import reference
from kdfast._checks import KINDS, REDUCTIONS, check_distillation_args, reduce_rows
from kdfast._ext import HAS_EXTENSION
from kdfast._sparse_checks import SparseTargets, check_sparse_args
from kdfast.module import _check_bool, _check_ignore_index, _check_str
from kdfast.ops import once_differentiable_output
from kdfast.sparse import sparse_distillation_loss

__all__ = ["LinearKDLoss", "linear_distillation_loss"]


class _Teacher(NamedTuple):
    """The teacher forms, flattened to rows (the op's teacher arguments, in its order): dense
    logits (N, C); or hidden (N, H_t) with weight (C, H_t) and bias (C,) or None; or sparse
    ids (N, k) with their logits (N, k) and the tail's logsumexp (N,) or None."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    sparse_logits: torch.Tensor | None = None
    tail_logsumexp: torch.Tensor | None = None


def linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_sparse: SparseTargets | None = None,
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
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """:func:`kdfast.distillation_loss` of the student logits ``student_hidden @
    student_weight.T + student_bias``, without ever holding those (..., C) logits.

    Exactly one teacher form: ``teacher_logits`` (..., C) (e.g. from a soft-target cache), or
    ``teacher_hidden`` (..., H_t) with ``teacher_weight`` (C, H_t) and optional
    ``teacher_bias`` (C,), whose logits are then computed chunk by chunk too. The loss equals
    ``distillation_loss(F.linear(student_hidden, student_weight, student_bias), teacher logits,
    target, ...)`` for every argument, within float rounding; ``temperature`` .. ``scale_by_t2``
    mean what they mean there (T**2 factor included by default).

    Args:
        student_hidden: (..., H) float32/bfloat16/float16/float64, the last hidden states.
        student_weight: (C, H), the output layer's weight, same dtype (tied input embeddings
            work: the gradient is accumulated into the shared parameter by autograd).
        target: (...) class indices or ``ignore_index``, or None.
        student_bias: (C,) or None.
        teacher_sparse: the sparse teacher form, a :class:`kdfast.SparseTargets` ((..., k)
            ids and logits, (...) tail logsumexp): the loss then equals
            :func:`kdfast.sparse_distillation_loss` of the materialized logits, with ``tail``
            and ``teacher_temperature`` as there (CPU tensors: the fused sparse kernel is
            CPU-only for now). For the dense forms ``teacher_temperature`` must be None or
            equal ``temperature``, and ``tail`` is unused.
        chunk_rows: rows per chunk; None splits the rows evenly into as few chunks as keep
            each C-wide chunk buffer (the student's logits, the teacher's when computed, a
            separate gradient for float16) within 2^26 logits (256 MiB in float32); for
            bfloat16/float16 with a gradient, which also hold the weight gradient's float32
            sum, 512 rows or H / 2 when that is more. Up to 1/8 more to avoid a sliver of a
            last chunk; all rows when they fit. The budgets count rows or logits, not bytes,
            because the matmuls' speed depends on the rows per chunk. The
            logits buffer is allocated once per call and reused by every chunk (on CPU from
            kdfast's buffer pool, so already mapped on the next step).

    Gradients flow to ``student_hidden``, ``student_weight`` and ``student_bias``, never to a
    teacher tensor (one requiring grad raises). With reduction "mean"/"sum" they are computed
    during the forward pass (no second pass over the vocabulary) and scaled by grad_output in
    backward; with "none" backward recomputes the chunks with each row's grad_output. No
    gradient matmul runs under ``torch.no_grad()``. bfloat16/float16 layers: the weight and
    bias gradients are summed over the chunks in float32 and rounded once. On the CPU with
    bfloat16, where torch carries MKL (``kdfast.build_info()["mixed_bf16_gemm"]``; the
    x86-64 wheels), MKL's bf16 x bf16 -> float32 gemm computes the three gradient products
    straight into float32 (``KDFAST_MIXED_GEMM=0`` turns it off); elsewhere each chunk's
    product is a bf16/fp16 matmul, widened and summed. Inside
    ``torch.autocast`` the layers run in the autocast dtype, as ``F.linear`` would.
    Once-differentiable.
    """
    teacher = _teacher(teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
                       teacher_sparse, tail, temperature, teacher_temperature)
    scalars = {"temperature": temperature, "alpha": alpha, "kind": kind, "beta": beta,
               "label_smoothing": label_smoothing, "reduction": reduction}
    _check_args(student_hidden, student_weight, student_bias, target, teacher, teacher_sparse,
                tail=tail, teacher_temperature=teacher_temperature, chunk_rows=chunk_rows,
                **scalars)
    t_t = temperature if teacher_temperature is None else teacher_temperature
    op_args = (float(temperature), float(t_t), float(alpha), kind, float(beta),
               int(ignore_index), float(label_smoothing), bool(scale_by_t2))
    if not HAS_EXTENSION or (teacher_sparse is not None and not student_hidden.is_cpu):
        return _unfused(student_hidden, student_weight, student_bias, target, teacher_sparse,
                        teacher, op_args, reduction, tail)
    hidden, weight, bias, teacher = _autocast_inputs(student_hidden, student_weight, student_bias,
                                                     teacher)
    batch_shape = student_hidden.shape[:-1]
    flat = (hidden.reshape(-1, hidden.shape[-1]), weight, bias,
            None if target is None else target.reshape(-1), _flat_teacher(teacher))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    with torch.autocast(hidden.device.type, enabled=False):
        if needs_grad:
            loss = _LinearDistillFunction.apply(*flat, op_args, reduction, chunk_rows or 0)
        else:  # no gradient matmul at all
            loss_rows, *_ = _run_op(*flat, op_args, chunk_rows or 0, False, None)
            loss = reduce_rows(loss_rows, _counted_mask(flat[3], flat[4].ids, ignore_index),
                               reduction, loss_rows.shape)
    return loss.reshape(batch_shape) if reduction == "none" else loss


def _teacher(logits, hidden, weight, bias, sparse, tail, temperature, teacher_temperature):
    forms = [name for name, t in (("teacher_logits", logits), ("teacher_hidden", hidden),
                                  ("teacher_sparse", sparse)) if t is not None]
    if len(forms) != 1:
        raise ValueError(
            "exactly one teacher form is expected: teacher_logits, teacher_hidden (with "
            f"teacher_weight) or teacher_sparse; got {forms or 'none'}"
        )
    if (weight is None) != (hidden is None) or (bias is not None and hidden is None):
        raise ValueError("teacher_weight (and teacher_bias) go with teacher_hidden, and "
                         "teacher_hidden needs teacher_weight (C, H_t)")
    _check_str("tail", tail, ("renormalize", "bucket"))
    if sparse is not None:
        if not isinstance(sparse, SparseTargets):
            raise TypeError("teacher_sparse must be a kdfast.SparseTargets(indices, logits, "
                            f"tail_logsumexp), got {type(sparse).__name__}")
        tail_lse = sparse.tail_logsumexp if tail == "bucket" else None
        return _Teacher(ids=sparse.indices, sparse_logits=sparse.logits, tail_logsumexp=tail_lse)
    if teacher_temperature is not None and teacher_temperature != temperature:
        raise ValueError(
            f"teacher_temperature={teacher_temperature} differs from temperature={temperature}: "
            "a separate teacher temperature exists only for teacher_sparse"
        )
    return _Teacher(logits, hidden, weight, bias)


def _check_args(hidden, weight, bias, target, teacher: _Teacher, sparse, *, reduction, chunk_rows,
                tail, teacher_temperature, **scalars):
    for name, t in (("student_hidden", hidden), ("student_weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"student_weight must be (C, H) with H = student_hidden.shape[-1], got "
            f"{tuple(weight.shape)} for student_hidden {tuple(hidden.shape)}"
        )
    for name, t in (("teacher_hidden", teacher.hidden), ("teacher_weight", teacher.weight),
                    ("teacher_bias", teacher.bias)):
        if t is not None and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name} requires grad, but gradients flow to the student only: "
                             f"pass {name}.detach() (or compute it under torch.no_grad())")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be an int >= 1 or None, got {chunk_rows!r}")
    # The logits' checks (dtypes, target, the teacher's shapes and grad, every scalar) on
    # zero-byte stand-ins of the right shape, dtype and device.
    student_probe = hidden.new_zeros(()).expand((*hidden.shape[:-1], weight.shape[0]))
    if sparse is not None:
        # The op validates the ids' values (range, duplicates) before writing anything.
        check_sparse_args(student_probe, sparse, target, tail=tail,
                          teacher_temperature=teacher_temperature, check_values=False,
                          reduction=reduction, **scalars)
        return
    teacher_probe = teacher.logits
    if teacher_probe is None:
        teacher_probe = teacher.hidden.new_zeros(()).expand((*teacher.hidden.shape[:-1],
                                                             teacher.weight.shape[0]))
    check_distillation_args(student_probe, teacher_probe, target, reduction=reduction, **scalars)


def _autocast_inputs(hidden, weight, bias, teacher: _Teacher):
    """Under torch.autocast, the layers' floating inputs in the autocast dtype (what F.linear
    does there); unchanged otherwise."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight, bias, teacher
    dtype = torch.get_autocast_dtype(device)

    def cast(t):
        return t.to(dtype) if t is not None and t.dtype in (torch.float32, torch.float64) else t

    layer = teacher._replace(hidden=cast(teacher.hidden), weight=cast(teacher.weight),
                             bias=cast(teacher.bias))
    return cast(hidden), cast(weight), cast(bias), layer


def _flat_teacher(teacher: _Teacher) -> _Teacher:
    """Every row-indexed teacher tensor flattened to (N, ...) rows."""
    def rows(t, keep_last=True):
        if t is None:
            return None
        return t.reshape(-1, t.shape[-1]) if keep_last else t.reshape(-1)

    return teacher._replace(logits=rows(teacher.logits), hidden=rows(teacher.hidden),
                            ids=rows(teacher.ids), sparse_logits=rows(teacher.sparse_logits),
                            tail_logsumexp=rows(teacher.tail_logsumexp, keep_last=False))


def _unfused(hidden, weight, bias, target, sparse, teacher: _Teacher, op_args, reduction, tail):
    """Without the compiled module (or a sparse teacher off the CPU): the plain composition,
    which materializes the logits."""
    temperature, t_t, alpha, kind, beta, ignore_index, label_smoothing, scale_by_t2 = op_args
    common = {"temperature": temperature, "alpha": alpha, "kind": kind, "beta": beta,
              "ignore_index": ignore_index, "label_smoothing": label_smoothing,
              "reduction": reduction, "scale_by_t2": scale_by_t2}
    logits = F.linear(hidden, weight, bias)
    if sparse is not None:
        return sparse_distillation_loss(logits, sparse, target, tail=tail, teacher_temperature=t_t,
                                        **common)
    t = teacher.logits
    if t is None:
        with torch.no_grad():
            t = F.linear(teacher.hidden, teacher.weight, teacher.bias)
    return reference.distillation_loss(logits, t, target, **common)


def _counted_mask(target, ids, ignore_index):
    """The rows that count in the mean: target != ignore_index; without target every row, or
    for a sparse teacher the rows with at least one valid id (None = all)."""
    if target is not None:
        return target != ignore_index
    return None if ids is None else (ids >= 0).any(-1)


def _wide(hidden: torch.Tensor) -> torch.Tensor:
    """A zero-size tensor of the gradient scales' dtype (float32, float64 for float64)."""
    return hidden.new_empty(0, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)


def _counted_rows(target, ids, ignore_index, n_rows, like):
    """The mean's divisor as a one-element tensor (no host sync), at least 1."""
    mask = _counted_mask(target, ids, ignore_index)
    if mask is None:
        return torch.full((1,), max(n_rows, 1), dtype=like.dtype, device=like.device)
    return mask.sum().clamp(min=1).to(like.dtype).reshape(1)


def _run_op(hidden, weight, bias, target, teacher: _Teacher, op_args, chunk_rows, compute_grad,
            row_scale):
    return torch.ops.kdfast.linear_distill_fwd(
        hidden, weight, bias, target, *teacher, *op_args, chunk_rows, compute_grad, row_scale,
    )


class _LinearDistillFunction(torch.autograd.Function):
    """``apply(hidden (N, H), weight, bias, target, teacher: _Teacher, op_args, reduction,
    chunk_rows) -> loss``: the reduced loss, or the (N,) row losses for "none"."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, teacher, op_args, reduction, chunk_rows):
        ctx.save_for_backward(hidden, weight, bias, target, *teacher)
        ctx.op_args, ctx.chunk_rows, ctx.reduction = op_args, chunk_rows, reduction
        if reduction == "none":  # per-row grad_output: backward recomputes the chunks
            loss_rows, *_ = _run_op(hidden, weight, bias, target, teacher, op_args, chunk_rows,
                                    False, None)
            return loss_rows
        ctx.scale = None
        if reduction in ("mean", "batchmean"):
            counted = _counted_rows(target, teacher.ids, op_args[5], hidden.shape[0], _wide(hidden))
            ctx.scale = counted.reciprocal()
        loss_rows, *grads = _run_op(hidden, weight, bias, target, teacher, op_args, chunk_rows,
                                    True, ctx.scale)
        # Handed to the first backward, which gives them away (autograd then adopts them as
        # .grad without a copy); a later backward (retain_graph=True) recomputes them.
        ctx.grads = grads
        loss = loss_rows.sum()
        return loss if ctx.scale is None else loss * ctx.scale.to(loss.dtype).reshape(())

    @staticmethod
    def backward(ctx, grad_loss):
        with torch.no_grad():
            grads = _layer_grads(ctx, grad_loss)
        d_hidden, d_weight, d_bias = (once_differentiable_output(g) if g.numel() else None
                                      for g in grads)
        return d_hidden, d_weight, d_bias, None, None, None, None, None


def _layer_grads(ctx, grad_loss):
    """The hidden, weight and bias gradients (empty for no bias) for ``grad_loss``."""
    grads = getattr(ctx, "grads", None)
    ctx.grads = None
    if ctx.reduction == "none" or grads is None:
        hidden, weight, bias, target, *teacher = ctx.saved_tensors
        if ctx.reduction == "none":
            row_scale = grad_loss.reshape(-1).to(_wide(hidden).dtype)
        else:
            row_scale = ctx.scale
        _, *grads = _run_op(hidden, weight, bias, target, _Teacher(*teacher), ctx.op_args,
                            ctx.chunk_rows, True, row_scale)
        if ctx.reduction == "none":
            return grads
    # Skipping the multiply by exactly 1 needs the value: only for CPU tensors, in eager mode.
    if not torch.compiler.is_compiling() and grad_loss.is_cpu and grad_loss.item() == 1.0:
        return grads
    return [g.mul_(grad_loss.to(g.dtype)) if g.numel() else g for g in grads]


class LinearKDLoss(nn.Module):
    """:func:`kdfast.linear_distillation_loss` as a module holding the options (defaults as
    there: tail="renormalize", temperature=1.0, teacher_temperature=None, alpha=0.5,
    kind="kl", beta=0.5, ignore_index=-100, label_smoothing=0.0, reduction="mean",
    scale_by_t2=True, chunk_rows=None).

    ``forward(hidden, weight, target=None, *, teacher, bias=None)``: ``teacher`` is dense
    teacher logits (a Tensor), a :class:`kdfast.SparseTargets`, or a tuple
    ``(teacher_hidden, teacher_weight[, teacher_bias])``. Arguments are checked when the
    module is built; :meth:`config` returns them (``LinearKDLoss(**loss.config())`` builds an
    equal loss).
    """

    def __init__(self, tail: str = "renormalize", temperature: float = 1.0,
                 teacher_temperature: float | None = None, alpha: float = 0.5, kind: str = "kl",
                 beta: float = 0.5, ignore_index: int = -100, label_smoothing: float = 0.0,
                 reduction: str = "mean", scale_by_t2: bool = True,
                 chunk_rows: int | None = None) -> None:
        super().__init__()
        _check_str("tail", tail, ("renormalize", "bucket"))
        _check_str("kind", kind, KINDS)
        _check_str("reduction", reduction, REDUCTIONS)
        _check_ignore_index(ignore_index)
        _check_bool("scale_by_t2", scale_by_t2)
        probe = torch.zeros(1, 1)
        check_distillation_args(probe, probe, None, temperature=temperature, alpha=alpha,
                                kind=kind, beta=beta, label_smoothing=label_smoothing,
                                reduction=reduction)
        if chunk_rows is not None and (isinstance(chunk_rows, bool)
                                       or not isinstance(chunk_rows, int) or chunk_rows < 1):
            raise ValueError(f"chunk_rows must be an int >= 1 or None, got {chunk_rows!r}")
        self._config = {
            "tail": tail, "temperature": float(temperature),
            "teacher_temperature": None if teacher_temperature is None else float(teacher_temperature),
            "alpha": float(alpha), "kind": kind, "beta": float(beta), "ignore_index": ignore_index,
            "label_smoothing": float(label_smoothing), "reduction": reduction,
            "scale_by_t2": scale_by_t2, "chunk_rows": chunk_rows,
        }

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor,
                target: torch.Tensor | None = None, *, teacher: Any,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(teacher, SparseTargets):
            forms: dict[str, Any] = {"teacher_sparse": teacher}
        elif isinstance(teacher, torch.Tensor):
            forms = {"teacher_logits": teacher}
        elif isinstance(teacher, (tuple, list)) and len(teacher) in (2, 3):
            forms = dict(zip(("teacher_hidden", "teacher_weight", "teacher_bias"), teacher, strict=False))
        else:
            raise TypeError("teacher must be teacher logits (a Tensor), a kdfast.SparseTargets or "
                            f"(teacher_hidden, teacher_weight[, teacher_bias]), got {type(teacher).__name__}")
        return linear_distillation_loss(hidden, weight, target, student_bias=bias, **forms,
                                        **self._config)

    def config(self) -> dict[str, Any]:
        """All constructor arguments, as a JSON-able dict."""
        return dict(self._config)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self._config.items())
