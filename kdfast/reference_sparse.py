"""Pure-PyTorch sparse-target distillation: the float64 oracle and the benchmark baseline.

Re-exported from :mod:`kdfast.reference`. ``sparse_distillation_loss`` has
kdfast.sparse_distillation_loss's signature and semantics (README, "Sparse teacher targets"),
in any float dtype: it computes in the inputs' promoted dtype, at least float32, from exactly
the values it is given (a bf16 student is widened, never re-rounded). The fused kernels will
be tested against it.

``sparse_eager_baseline`` is what a user writes by hand: gather the student's log-probs at
the teacher's ids, ``F.kl_div`` against the teacher's softmax, T**2 and ``F.cross_entropy``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdfast._checks import reduce_rows
from kdfast._sparse_checks import SparseTargets, check_sparse_args, check_sparse_scalars
from kdfast.reference import _weighted, hard_rows, target_rows

__all__ = ["sparse_distillation_loss", "sparse_eager_baseline"]


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
    """Reference implementation of :func:`kdfast.sparse_distillation_loss` (same arguments)."""
    check_sparse_args(
        student_logits, teacher, target, tail=tail, temperature=temperature,
        teacher_temperature=teacher_temperature, alpha=alpha, kind=kind, beta=beta,
        label_smoothing=label_smoothing, reduction=reduction,
    )
    n_cols, k = student_logits.shape[-1], teacher.indices.shape[-1]
    batch_shape = student_logits.shape[:-1]
    dtype = compute_dtype(student_logits, teacher, tail)
    s = student_logits.reshape(-1, n_cols).to(dtype)
    ids = teacher.indices.reshape(-1, k).long()
    valid = ids >= 0
    has_valid = valid.any(-1)
    t_t = temperature if teacher_temperature is None else teacher_temperature
    z = torch.where(valid, teacher.logits.reshape(-1, k).to(dtype) / t_t, -math.inf)
    log_q = F.log_softmax(s / temperature, dim=-1)
    if tail == "renormalize":
        log_p_bins, log_q_bins = renormalized_bins(log_q, ids, z, valid)
    else:
        tail_lse = teacher.tail_logsumexp.reshape(-1).to(dtype)
        log_p_bins, log_q_bins = bucket_bins(log_q, ids, z, tail_lse, valid)
    soft = torch.where(has_valid, bin_divergence(log_p_bins, log_q_bins, kind, beta), 0.0)
    if scale_by_t2:
        soft = soft * temperature**2
    if target is None:
        return reduce_rows(soft, has_valid, reduction, batch_shape)
    y, counted = target_rows(target, n_cols, ignore_index)
    hard = hard_rows(s, y, counted, label_smoothing)
    rows = alpha * soft + (1 - alpha) * hard if alpha < 1 else soft
    rows = torch.where(counted, rows, torch.zeros_like(rows))
    return reduce_rows(rows, counted, reduction, batch_shape)


def compute_dtype(student_logits: torch.Tensor, teacher: SparseTargets, tail: str) -> torch.dtype:
    """The promoted dtype of the student and the teacher's float tensors, at least float32."""
    dtype = torch.promote_types(student_logits.dtype, teacher.logits.dtype)
    if tail == "bucket":
        dtype = torch.promote_types(dtype, teacher.tail_logsumexp.dtype)
    return torch.promote_types(dtype, torch.float32)


def renormalized_bins(
    log_q: torch.Tensor, ids: torch.Tensor, z: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p~, log q) at the k slots: p~ = softmax(z) over the valid slots, q the student's
    full softmax (not renormalized); -inf at empty slots. ``z`` is z / T_t, -inf at empty
    slots."""
    has_valid = valid.any(-1, keepdim=True)
    lse = torch.where(has_valid, torch.logsumexp(z, dim=-1, keepdim=True), 0.0)
    log_q_k = torch.where(valid, log_q.gather(-1, ids.clamp(min=0)), -math.inf)
    return z - lse, log_q_k


def bucket_bins(
    log_q: torch.Tensor, ids: torch.Tensor, z: torch.Tensor, tail_lse: torch.Tensor,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q) over the k slots and the tail bin R (the last column).

    L = logsumexp(logsumexp(z_K), tail); p_i = exp(z_i - L), P_R = exp(tail - L) (no
    cancellation); Q_R = sum of q over the classes not in K, not 1 - sum(q_K). Rows without
    valid ids get P_R = Q_R = 1 (soft 0) whatever their tail."""
    has_valid = valid.any(-1)
    total = torch.logaddexp(torch.logsumexp(z, dim=-1), tail_lse)
    total = torch.where(has_valid, total, 0.0)
    log_p_rest = torch.where(has_valid, tail_lse - total, 0.0)
    log_q_k = torch.where(valid, log_q.gather(-1, ids.clamp(min=0)), -math.inf)
    log_q_rest = torch.where(has_valid, rest_logsumexp(log_q, ids, valid), 0.0)
    log_p = torch.cat([z - total.unsqueeze(-1), log_p_rest.unsqueeze(-1)], dim=-1)
    return log_p, torch.cat([log_q_k, log_q_rest.unsqueeze(-1)], dim=-1)


def rest_logsumexp(log_q: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log sum_{j not in K} exp(log_q_j) per row: -inf (with a zero gradient, not NaN) when K
    holds every class."""
    n_rows, n_cols = log_q.shape
    columns = torch.where(valid, ids, n_cols)  # empty slots land in a dropped extra column
    in_k = torch.zeros(n_rows, n_cols + 1, dtype=torch.bool, device=log_q.device)
    in_k = in_k.scatter_(1, columns, True)[:, :n_cols]
    no_rest = in_k.all(-1, keepdim=True)
    masked = log_q.masked_fill(in_k, -math.inf).masked_fill(no_rest, 0.0)
    return torch.logsumexp(masked, dim=-1).masked_fill(no_rest.squeeze(-1), -math.inf)


def bin_divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Per-row divergence ``kind`` between two distributions given as log-probs over bins
    (0 log 0 = 0). Bins empty on both sides contribute exactly 0 and no NaN gradient."""
    both_empty = (log_p == -math.inf) & (log_q == -math.inf)
    log_p = log_p.masked_fill(both_empty, 0.0)
    log_q = log_q.masked_fill(both_empty, 0.0)
    p, q = log_p.exp(), log_q.exp()
    if kind == "kl":
        terms = _weighted(p, log_p - log_q)
    elif kind == "reverse_kl":
        terms = _weighted(q, log_q - log_p)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        terms = beta * _weighted(p, log_p - log_m) + (1 - beta) * _weighted(q, log_q - log_m)
    return terms.masked_fill(both_empty, 0.0).sum(-1)


def sparse_eager_baseline(
    student_logits: torch.Tensor,
    teacher: SparseTargets,
    target: torch.Tensor | None = None,
    *,
    tail: str = "renormalize",
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    alpha: float = 0.5,
    kind: str = "kl",
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """The sparse loss as distillation toolkits write it with torch.nn.functional (2-D
    inputs, mean reduction, soft term scaled by T**2, forward KL only).

    ``log_softmax(s/T).gather(ids)``, ``F.kl_div(..., softmax(z/T_t), "batchmean") * T**2``
    (with ``tail="bucket"``: one more bin, the teacher's from ``softmax(cat(z/T_t, tail))``,
    the student's as ``1 - sum(q_K)``, which cancels when K holds nearly all of q) plus
    ``F.cross_entropy``. Empty slots (-1) are masked. With ``ignore_index=None`` every row
    counts, as in the benchmarks; an int averages both terms over the rows whose target is
    not ``ignore_index`` (NaN if none), as :func:`kdfast.reference.eager_baseline` does.
    """
    if kind != "kl":
        raise ValueError(f"kind must be 'kl' (the baseline is forward KL only), got {kind!r}")
    check_sparse_scalars(tail=tail, kind=kind, teacher_temperature=teacher_temperature)
    if tail == "bucket" and teacher.tail_logsumexp is None:
        raise ValueError("tail='bucket' needs teacher.tail_logsumexp, got None")
    T = temperature
    t_t = T if teacher_temperature is None else teacher_temperature
    valid = teacher.indices >= 0
    log_q_k = F.log_softmax(student_logits / T, dim=-1).gather(-1, teacher.indices.long().clamp(min=0))
    z = teacher.logits.masked_fill(~valid, -math.inf) / t_t
    if tail == "renormalize":
        p = F.softmax(z, dim=-1)
    else:
        p = F.softmax(torch.cat([z, teacher.tail_logsumexp.unsqueeze(-1)], dim=-1), dim=-1)
        q_rest = 1 - (log_q_k.exp() * valid).sum(-1, keepdim=True)
        q_rest = q_rest.clamp(min=torch.finfo(q_rest.dtype).tiny)
        log_q_k = torch.cat([log_q_k, q_rest.log()], dim=-1)
    if target is None or ignore_index is None:
        soft = F.kl_div(log_q_k, p, reduction="batchmean")
    else:
        counted = (target != ignore_index).to(log_q_k.dtype)
        soft = (F.kl_div(log_q_k, p, reduction="none").sum(-1) * counted).sum() / counted.sum()
    soft = soft * T * T
    if target is None:
        return soft
    hard = F.cross_entropy(student_logits, target, label_smoothing=label_smoothing,
                           ignore_index=-100 if ignore_index is None else ignore_index)
    return alpha * soft + (1 - alpha) * hard
