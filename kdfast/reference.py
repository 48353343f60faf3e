"""Pure-PyTorch distillation losses: the test oracle and the benchmark baselines.

``distillation_loss`` has kdfast.distillation_loss's signature and semantics, in any float
dtype (float64 for the tests' oracle). It computes in the inputs' promoted dtype, at least
float32, exactly from the values it is given: tests that check low-precision kernels upcast
the same bf16/fp16 tensors the kernel sees, never re-round them.

``eager_baseline`` is what a user would write by hand with torch.nn.functional; the benchmarks
time it (eager and under torch.compile) against the fused kernels.

The sparse-target oracle and baseline, ``sparse_distillation_loss`` and
``sparse_eager_baseline``, live in kdfast/reference_sparse.py (built on the helpers here) and
are re-exported from this module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdfast._checks import check_distillation_args, reduce_rows

__all__ = ["distillation_loss", "eager_baseline", "sparse_distillation_loss", "sparse_eager_baseline"]


def _weighted(weight: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """weight * value with 0 * anything = 0, and no NaN gradient from the masked branch."""
    positive = weight > 0
    return weight * torch.where(positive, value, torch.zeros_like(value))


def soft_rows(
    log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float
) -> torch.Tensor:
    """Per-row soft divergence from teacher log-probs log_p and student log-probs log_q."""
    p, q = log_p.exp(), log_q.exp()
    if kind == "kl":
        return _weighted(p, log_p - log_q).sum(-1)
    if kind == "reverse_kl":
        return _weighted(q, log_q - log_p).sum(-1)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    kl_pm = _weighted(p, log_p - log_m).sum(-1)
    kl_qm = _weighted(q, log_q - log_m).sum(-1)
    return beta * kl_pm + (1 - beta) * kl_qm


def logit_mse_rows(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-row logit matching (Caruana et al. 2006): (1/(2C)) * sum_j (s^_j - t^_j)**2, with
    s^ and t^ the rows of the raw logits centred to zero mean."""
    gap = (s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))
    return gap.square().mean(-1) / 2


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
) -> torch.Tensor:
    """Reference implementation of :func:`kdfast.distillation_loss` (same arguments)."""
    check_distillation_args(
        student_logits, teacher_logits, target, temperature=temperature, alpha=alpha,
        kind=kind, beta=beta, label_smoothing=label_smoothing, reduction=reduction,
    )
    n_cols = student_logits.shape[-1]
    batch_shape = student_logits.shape[:-1]
    dtype = torch.promote_types(
        torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32
    )
    s = student_logits.reshape(-1, n_cols).to(dtype)
    t = teacher_logits.reshape(-1, n_cols).to(dtype)
    if kind == "logit_mse":
        soft = logit_mse_rows(s, t)  # temperature is 1: T**2 changes nothing
    else:
        log_q = F.log_softmax(s / temperature, dim=-1)
        log_p = F.log_softmax(t / temperature, dim=-1)
        soft = soft_rows(log_p, log_q, kind, beta)
        if scale_by_t2:
            soft = soft * temperature**2
    if target is None:
        return reduce_rows(soft, None, reduction, batch_shape)

    y, counted = target_rows(target, n_cols, ignore_index)
    hard = hard_rows(s, y, counted, label_smoothing)
    rows = alpha * soft + (1 - alpha) * hard if alpha < 1 else soft
    rows = torch.where(counted, rows, torch.zeros_like(rows))
    return reduce_rows(rows, counted, reduction, batch_shape)


def target_rows(target: torch.Tensor, n_cols: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat int64 targets and the mask of counted rows (target != ignore_index); raises a
    ValueError naming the first counted target outside [0, n_cols)."""
    y = target.reshape(-1).long()
    counted = y != ignore_index
    bad = counted & ((y < 0) | (y >= n_cols))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target[{i}] = {int(y[i])} is out of range: expected a class index in [0, {n_cols}) "
            f"or ignore_index={ignore_index}"
        )
    return y, counted


def hard_rows(
    s: torch.Tensor, y: torch.Tensor, counted: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """Per-row cross-entropy of softmax(s) (T = 1) against y with label smoothing eps:
    (1-eps)*(-log r_y) + eps*mean_j(-log r_j); rows not counted get a finite dummy value."""
    log_r = F.log_softmax(s, dim=-1)
    nll = -log_r.gather(-1, torch.where(counted, y, 0).unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0:
        return (1 - label_smoothing) * nll - label_smoothing * log_r.mean(-1)
    return nll


def eager_baseline(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    kind: str = "kl",
    beta: float = 0.5,
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """The loss as commonly written with torch.nn.functional (2-D inputs, mean reduction,
    soft term scaled by T**2).

    ``F.kl_div(log_softmax(s/T), softmax(t/T), "batchmean") * T**2 + F.cross_entropy``; jsd
    through the log-space mixture; logit_mse as :func:`logit_mse_rows` (T = 1, no T**2);
    ``label_smoothing`` goes to ``F.cross_entropy``. With the
    default ``ignore_index=None`` every row counts: the benchmark shape. An int marks padding
    rows: the soft term is then averaged per row over the counted rows (as
    ``F.cross_entropy(ignore_index=...)`` does for the hard term); if no row counts, the
    result is NaN (0/0), where :func:`distillation_loss` returns 0.
    """
    if kind == "logit_mse":
        soft = _eager_logit_mse(student_logits, teacher_logits, target, ignore_index)
    else:
        T = temperature
        log_q = F.log_softmax(student_logits / T, dim=-1)
        log_p = F.log_softmax(teacher_logits / T, dim=-1)
        if target is None or ignore_index is None:
            soft = _eager_soft(log_p, log_q, kind, beta, "batchmean")
        else:
            counted = (target != ignore_index).to(log_q.dtype)
            soft = (_eager_soft(log_p, log_q, kind, beta, "none").sum(-1) * counted).sum() / counted.sum()
        soft = soft * T * T
    if target is None:
        return soft
    hard = F.cross_entropy(student_logits, target, label_smoothing=label_smoothing,
                           ignore_index=-100 if ignore_index is None else ignore_index)
    return alpha * soft + (1 - alpha) * hard


def _eager_logit_mse(s: torch.Tensor, t: torch.Tensor, target: torch.Tensor | None,
                     ignore_index: int | None) -> torch.Tensor:
    """logit_mse's soft term averaged over the (counted) rows."""
    rows = logit_mse_rows(s, t)
    if target is None or ignore_index is None:
        return rows.mean()
    counted = (target != ignore_index).to(rows.dtype)
    return (rows * counted).sum() / counted.sum()


def _eager_soft(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float, reduction: str
                ) -> torch.Tensor:
    """The soft term with ``F.kl_div`` (log-space targets): KL(p||q), KL(q||p) or jsd."""
    if kind == "kl":
        return F.kl_div(log_q, log_p, reduction=reduction, log_target=True)
    if kind == "reverse_kl":
        return F.kl_div(log_p, log_q, reduction=reduction, log_target=True)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * F.kl_div(log_m, log_p, reduction=reduction, log_target=True) + (
        1 - beta
    ) * F.kl_div(log_m, log_q, reduction=reduction, log_target=True)


# At the end: kdfast.reference_sparse imports the helpers above from this module.
from kdfast.reference_sparse import sparse_distillation_loss, sparse_eager_baseline  # noqa: E402
