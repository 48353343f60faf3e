"""Sparse teacher targets from dense teacher logits: :func:`kdfast.topk_targets`.

What a sparse soft-target cache stores per row: the teacher's k largest logits, their class
ids and, per teacher temperature T_t, the log-sum-exp of the classes left out
(``SparseTargets.tail_logsumexp`` at that T_t), all computed from the row's float32 logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = ["TopKTargets", "topk_targets"]


class TopKTargets(NamedTuple):
    """Output of :func:`topk_targets` for ``(..., C)`` teacher logits and n temperatures.

    - ``indices``: ``(..., k)`` int64, the class ids of the k largest logits, largest first;
      equal logits in id order (smaller id first), so the result is deterministic.
    - ``logits``: ``(..., k)`` float32, the teacher's logits at ``indices``.
    - ``tail_logsumexp``: ``(..., n)`` float32, column j = log sum_{i not in K} exp(z_i / T_j)
      (-inf when k = C), i.e. ``SparseTargets.tail_logsumexp`` at teacher temperature T_j.
    """

    indices: torch.Tensor
    logits: torch.Tensor
    tail_logsumexp: torch.Tensor


def topk_targets(
    teacher_logits: torch.Tensor, k: int, temperatures: Sequence[float] = (1.0,)
) -> TopKTargets:
    """The top-k ids and logits of each row and the tail log-sum-exp at each temperature.

    Args:
        teacher_logits: ``(..., C)`` float16/bfloat16/float32/float64 teacher logits, read in
            float32 (float64 stays float64); no NaN or +inf (a ValueError names the argument).
            -inf entries (masked classes) are allowed.
        k: how many ids per row, 1 <= k <= C.
        temperatures: teacher temperatures T_j > 0 (finite), at least one.

    Returns:
        :class:`TopKTargets`; ``SparseTargets(indices, logits, tail_logsumexp[..., j])`` is the
        exact sparse teacher at T_j for ``tail="bucket"``.
    """
    check_topk_args(teacher_logits, k, temperatures)
    return reference_topk_targets(teacher_logits, k, temperatures)


def check_topk_args(teacher_logits: torch.Tensor, k: int, temperatures: Sequence[float]) -> None:
    """Raises a TypeError/ValueError naming the bad argument of :func:`topk_targets`."""
    if not isinstance(teacher_logits, torch.Tensor) or not teacher_logits.is_floating_point():
        raise TypeError("teacher_logits: expected a floating-point tensor (..., C)")
    if teacher_logits.dim() < 1 or teacher_logits.shape[-1] < 1:
        shape = tuple(teacher_logits.shape)
        raise ValueError(f"teacher_logits: expected shape (..., C) with C >= 1, got {shape}")
    n_cols = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_cols:
        raise ValueError(f"k: expected an int in [1, C = {n_cols}], got {k!r}")
    temps = list(temperatures)
    def is_temperature(t: object) -> bool:
        return not isinstance(t, bool) and isinstance(t, (int, float)) and 0 < t < float("inf")

    if not temps or not all(is_temperature(t) for t in temps):
        raise ValueError(f"temperatures: expected one or more finite numbers > 0, got {temperatures!r}")
    if bool(torch.isnan(teacher_logits).any()) or bool(torch.isposinf(teacher_logits).any()):
        raise ValueError("teacher_logits: NaN or +inf entries (a sparse target of such a row is undefined)")


def reference_topk_targets(
    teacher_logits: torch.Tensor, k: int, temperatures: Sequence[float]
) -> TopKTargets:
    """Pure-PyTorch :func:`topk_targets` (the oracle of the fused builder op): a stable
    descending sort for the ids, one masked logsumexp per temperature. Computes in float32,
    or float64 for float64 input."""
    dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    z = teacher_logits.to(dtype)
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices
    indices = order[..., :k]
    logits = z.gather(-1, indices)
    rest = z.scatter(-1, indices, -torch.inf)
    tails = [torch.logsumexp(rest / float(t), dim=-1) for t in temperatures]
    return TopKTargets(indices, logits, torch.stack(tails, dim=-1))
