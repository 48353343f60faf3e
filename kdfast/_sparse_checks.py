"""SparseTargets, the sparse teacher's tensors, and the argument checks of the sparse losses.

Shared by kdfast.sparse (functional and module) and kdfast.reference_sparse (the oracle). Every
error names the argument and the value it expected, as in kdfast._checks, whose checks of
``distillation_loss``'s arguments are reused unchanged.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kdfast._checks import FLOAT_DTYPES, _check_number, check_distillation_args

TAILS = ("renormalize", "bucket")
INDEX_DTYPES = (torch.int32, torch.int64)
EMPTY_SLOT = -1


class SparseTargets(NamedTuple):
    """A sparse teacher: per row, its logits at k classes and (optionally) the mass of the rest.

    - ``indices``: ``(..., k)`` int32/int64 class ids in [0, C), distinct within a row;
      ``-1`` marks an empty slot (rows may hold fewer than k ids; a row of -1 only is empty).
    - ``logits``: ``(..., k)`` float, the teacher's raw logits z at those ids (any value at an
      empty slot: it is never read).
    - ``tail_logsumexp``: ``(...)`` float or None: log sum_{j not in K} exp(z_j / T_t) over
      the row's classes not in K, at the teacher temperature T_t; -inf when K holds every
      class. Needed by ``tail="bucket"`` only.

    None of them may require grad: gradients flow to the student only.
    """

    indices: torch.Tensor
    logits: torch.Tensor
    tail_logsumexp: torch.Tensor | None = None


def check_sparse_scalars(*, tail: str, kind: str, teacher_temperature: float | None) -> None:
    """The sparse-only hyper-parameters: ``tail``, its pairing with ``kind``, and
    ``teacher_temperature`` (``distillation_loss``'s are checked by kdfast._checks)."""
    if not isinstance(tail, str):
        raise TypeError(f"tail must be a str, one of {TAILS}, got {type(tail).__name__} {tail!r}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if kind == "logit_mse":
        raise ValueError(
            "kind='logit_mse' is not supported by the sparse losses: it centres the teacher's "
            "logits over all C classes, and sparse targets hold k of them; use "
            "kdfast.distillation_loss with dense teacher_logits"
        )
    if tail == "renormalize" and kind != "kl":
        raise ValueError(
            f"kind must be 'kl' with tail='renormalize' (the renormalized teacher is compared with "
            f"the full student softmax, which is a KL term only), got kind={kind!r}; use "
            "tail='bucket' (with teacher.tail_logsumexp) for 'reverse_kl' and 'jsd'"
        )
    if teacher_temperature is not None:
        _check_number("teacher_temperature", teacher_temperature)
        if not (math.isfinite(teacher_temperature) and teacher_temperature > 0):
            raise ValueError(
                f"teacher_temperature must be finite and > 0, or None (= temperature), got "
                f"{teacher_temperature}"
            )


def check_sparse_args(
    student_logits: torch.Tensor,
    teacher: SparseTargets,
    target: torch.Tensor | None,
    *,
    tail: str,
    temperature: float,
    teacher_temperature: float | None,
    alpha: float,
    kind: str,
    beta: float,
    label_smoothing: float,
    reduction: str,
    check_values: bool = True,
) -> None:
    """Every check of :func:`kdfast.sparse_distillation_loss`, before anything is computed.

    ``check_values=False`` skips the ids' values (range, duplicates): for callers whose kernel
    validates them itself before writing anything (the compiled CPU op)."""
    # distillation_loss's checks of the student, the target and the shared scalars; the
    # student's detached self stands in for the dense teacher, so no teacher error can fire.
    stand_in = student_logits.detach() if isinstance(student_logits, torch.Tensor) else student_logits
    check_distillation_args(
        student_logits, stand_in, target, temperature=temperature, alpha=alpha, kind=kind,
        beta=beta, label_smoothing=label_smoothing, reduction=reduction,
    )
    check_sparse_scalars(tail=tail, kind=kind, teacher_temperature=teacher_temperature)
    _check_teacher_tensors(student_logits, teacher)
    if tail == "bucket" and teacher.tail_logsumexp is None:
        raise ValueError(
            "tail='bucket' needs teacher.tail_logsumexp (the log-sum-exp of z / T_t over each "
            "row's classes not in teacher.indices), got None; pass it, or use tail='renormalize'"
        )
    if check_values:
        check_index_values(teacher.indices, student_logits.shape[-1])


def _check_teacher_tensors(student_logits: torch.Tensor, teacher: SparseTargets) -> None:
    if not isinstance(teacher, SparseTargets):
        raise TypeError(
            f"teacher must be a kdfast.SparseTargets(indices, logits, tail_logsumexp), got "
            f"{type(teacher).__name__}"
        )
    batch = tuple(student_logits.shape[:-1])
    indices, logits, tail = teacher
    if not isinstance(indices, torch.Tensor) or indices.dtype not in INDEX_DTYPES:
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise TypeError(f"teacher.indices must be an int32 or int64 tensor of class ids, got {got}")
    if indices.dim() != student_logits.dim() or tuple(indices.shape[:-1]) != batch:
        raise ValueError(
            f"teacher.indices shape {tuple(indices.shape)} must be (..., k) with (...) = "
            f"student_logits.shape[:-1] = {batch}"
        )
    if indices.shape[-1] < 1:
        raise ValueError("teacher.indices must have at least one slot per row (k >= 1), got k = 0")
    for name, t, shape in (("logits", logits, tuple(indices.shape)), ("tail_logsumexp", tail, batch)):
        if t is None and name == "tail_logsumexp":
            continue
        _check_teacher_tensor(f"teacher.{name}", t, shape, student_logits)
    if indices.device != student_logits.device:
        raise ValueError(
            f"teacher.indices is on {indices.device} but student_logits is on "
            f"{student_logits.device}; move them to one device"
        )


def _check_teacher_tensor(name: str, t: object, shape: tuple, student_logits: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} must be {shape} (from teacher.indices)")
    if t.device != student_logits.device:
        raise ValueError(
            f"{name} is on {t.device} but student_logits is on {student_logits.device}; move them "
            "to one device"
        )
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} requires grad, but gradients flow to the student only: pass {name}.detach() "
            "(or compute the teacher under torch.no_grad())"
        )


def check_index_values(indices: torch.Tensor, n_cols: int) -> None:
    """Ids in [-1, C) (any device but meta; syncs on CUDA) and, for CPU tensors, no id twice in
    a row. Skipped under torch.compile's tracing, which has no values to read."""
    if type(indices) is not torch.Tensor or indices.device.type == "meta" or indices.numel() == 0:
        return
    if torch.compiler.is_compiling():
        return
    bad = (indices < EMPTY_SLOT) | (indices >= n_cols)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"teacher.indices[{', '.join(map(str, where))}] = {int(indices[where])} is out of "
            f"range: expected a class id in [0, {n_cols}) or -1 (an empty slot)"
        )
    if indices.device.type != "cpu" or indices.shape[-1] < 2:
        return
    ids = indices.sort(dim=-1).values
    dup = (ids[..., 1:] == ids[..., :-1]) & (ids[..., 1:] != EMPTY_SLOT)
    if bool(dup.any()):
        where = tuple(int(i) for i in dup.nonzero()[0])
        row = f"[{', '.join(map(str, where[:-1]))}]" if len(where) > 1 else ""
        raise ValueError(
            f"teacher.indices{row} holds class id {int(ids[where])} more than once: expected "
            "distinct ids per row (-1 marks an empty slot)"
        )
