"""Helpers of the sparse-target tests: SparseTargets built from a dense teacher, and an
independent dense oracle of the sparse loss.

The oracle shares no code with kdfast.reference_sparse: it works row by row in probability
space on the *dense* teacher, coarsening softmax(t / T_t) and softmax(s / T) by explicit sums
over the classes not in K (P_R never comes from ``tail_logsumexp``), with 0 log 0 = 0 through
``torch.xlogy``; the hard term is ``F.cross_entropy``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import kdfast


def sparse_from_dense(
    teacher: torch.Tensor,
    k: int,
    *,
    teacher_temperature: float,
    seed: int,
    pick: str = "topk",
    empty_slots: int = 0,
    empty_rows: tuple[int, ...] = (),
    index_dtype: torch.dtype = torch.int64,
) -> kdfast.SparseTargets:
    """SparseTargets of a dense ``(..., C)`` teacher: k ids per row (its top-k, or a random
    subset with ``pick="random"``) in a random order, ``empty_slots`` of them per row then
    set to -1 and the flat ``empty_rows`` set to -1 entirely. Empty slots hold NaN logits (they
    must never be read); ``tail_logsumexp`` covers every class not left in K."""
    g = torch.Generator().manual_seed(seed)
    shape, n_cols = teacher.shape[:-1], teacher.shape[-1]
    t = teacher.reshape(-1, n_cols)
    n_rows = t.shape[0]
    if pick == "topk":
        ids = t.topk(k, dim=-1).indices
    else:
        ids = torch.stack([torch.randperm(n_cols, generator=g)[:k] for _ in range(n_rows)]) if n_rows else (
            torch.zeros(0, k, dtype=torch.long))
    order = torch.stack([torch.randperm(k, generator=g) for _ in range(n_rows)]) if n_rows else ids
    ids = ids.gather(-1, order).clone()
    for i in range(n_rows):
        ids[i, torch.randperm(k, generator=g)[:empty_slots]] = -1
    ids[list(empty_rows)] = -1
    valid = ids >= 0
    logits = torch.where(valid, t.gather(-1, ids.clamp(min=0)), math.nan)
    in_k = torch.zeros(n_rows, n_cols + 1, dtype=torch.bool).scatter_(1, torch.where(valid, ids, n_cols),
                                                                       True)[:, :n_cols]
    tail = torch.where(in_k, -math.inf, t / teacher_temperature).logsumexp(-1)
    return kdfast.SparseTargets(ids.to(index_dtype).reshape(*shape, k), logits.reshape(*shape, k),
                                tail.reshape(shape))


def divergence(p: torch.Tensor, q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """``kind`` between two probability vectors, 0 log 0 = 0 (xlogy)."""
    def kl(a, b):
        return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum()

    if kind == "kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def oracle_soft_row(s: torch.Tensor, t: torch.Tensor, ids: list[int], *, tail: str, kind: str,
                    temperature: float, teacher_temperature: float, beta: float) -> torch.Tensor:
    """The soft term of one row, from its dense student and teacher rows (float64)."""
    q = torch.softmax(s / temperature, dim=0)
    p = torch.softmax(t / teacher_temperature, dim=0)
    if tail == "renormalize":
        p_k = p[ids] / p[ids].sum()
        return (torch.xlogy(p_k, p_k) - torch.xlogy(p_k, q[ids])).sum()
    rest = torch.ones(s.shape[0], dtype=torch.bool)
    rest[ids] = False
    p_bins, q_bins = [p[ids]], [q[ids]]
    if rest.any():  # no tail bin at all when K holds every class (P_R = Q_R = 0)
        p_bins.append(p[rest].sum().reshape(1))
        q_bins.append(q[rest].sum().reshape(1))
    return divergence(torch.cat(p_bins), torch.cat(q_bins), kind, beta)


def oracle_loss(student, teacher_dense, ids, target=None, *, tail="renormalize", temperature=1.0,
                teacher_temperature=None, alpha=0.5, kind="kl", beta=0.5, ignore_index=-100,
                label_smoothing=0.0, reduction="mean", scale_by_t2=True):
    """The loss of kdfast.sparse_distillation_loss from the README's definitions, row by row."""
    n_cols = student.shape[-1]
    batch = student.shape[:-1]
    s = student.reshape(-1, n_cols).double()
    t = teacher_dense.reshape(-1, n_cols).double()
    ids = ids.reshape(s.shape[0], -1)
    t_t = temperature if teacher_temperature is None else teacher_temperature
    rows, counted = [], []
    for i in range(s.shape[0]):
        row_ids = [j for j in ids[i].tolist() if j >= 0]
        soft = s[i].sum() * 0.0
        if row_ids:
            soft = oracle_soft_row(s[i], t[i], row_ids, tail=tail, kind=kind, temperature=temperature,
                                   teacher_temperature=t_t, beta=beta)
        if scale_by_t2:
            soft = soft * temperature**2
        if target is None:
            rows.append(soft)
            counted.append(bool(row_ids))
            continue
        y = int(target.reshape(-1)[i])
        if y == ignore_index:
            rows.append(s[i].sum() * 0.0)
            counted.append(False)
            continue
        hard = F.cross_entropy(s[i], torch.tensor(y), label_smoothing=label_smoothing)
        rows.append(alpha * soft + (1 - alpha) * hard)
        counted.append(True)
    loss_rows = torch.stack(rows) * torch.tensor(counted, dtype=torch.float64)
    if reduction == "none":
        return loss_rows.reshape(batch)
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / max(sum(counted), 1)
