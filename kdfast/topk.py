"""Sparse teacher targets from dense teacher logits: :func:`kdfast.topk_targets`.

What a sparse soft-target cache stores per row: the teacher's k largest logits, their class
ids and, per teacher temperature T_t, the log-sum-exp of the classes left out
(``SparseTargets.tail_logsumexp`` at that T_t), all computed from the row's float32 logits.

The compiled op (csrc/ops.cpp; CPU csrc/cpu/topk_targets.cpp, CUDA csrc/cuda/topk_targets.cu;
per-element math in csrc/include/kdfast/topk_math.h)::

    torch.ops.kdfast.topk_targets(teacher_logits, k, temperatures: list[float])
        -> (indices, logits, tail_logsumexp)

- ``teacher_logits``: ``(..., C)`` float32/bfloat16/float16, any strides (read as float32).
- ``indices`` ``(..., k)`` int64, ``logits`` ``(..., k)`` float32, ``tail_logsumexp``
  ``(..., len(temperatures))`` float32: exactly :func:`reference_topk_targets` (ties by smaller
  id) up to float32 rounding of the tail sums.
- Errors (ValueError naming the argument): k outside [1, C], no or non-positive/non-finite
  temperatures, another dtype, C < 1; on the CPU also NaN or +inf logits (found while the row
  is read, so the wrapper needs no extra pass; the CUDA path checks them in Python first).
  CUDA: min(k + 1, C) <= 2048 and at most 8 temperatures.
- No autograd (the targets are data); a fake kernel makes it traceable by torch.compile.

Per row, pass 1 keeps the k + 1 best (value, id) pairs as 64-bit ranks behind a threshold (the
CPU compares 64-element blocks' vectorized maxima with it and scans only the rare blocks that
beat it; CUDA radix-selects on the keys); the (k+1)-th value is the tail's maximum. Pass 2, on
the row still in cache, sums exp((z - tail max) / T_j) over the elements below the k-th value
plus the unselected ones equal to it (counted), at every temperature: no overflow, no
cancellation of a total minus the head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from kdfast._ext import HAS_EXTENSION

__all__ = ["TopKTargets", "topk_targets"]

# Dtypes the compiled op reads (as float32); float64 rows take the reference path.
OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The CUDA kernel's limits (csrc/cuda/topk_targets.cu: kMaxKeep, kMaxTemps).
CUDA_MAX_KEEP = 2048
CUDA_MAX_TEMPS = 8


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
    check_topk_shapes_and_options(teacher_logits, k, temperatures)
    if uses_compiled_op(teacher_logits, k, len(temperatures)):
        if not teacher_logits.is_cpu:
            # The CPU op checks the values while it reads them (the same ValueError, no extra
            # pass); a device kernel could only report them through a host sync.
            check_finite_logits(teacher_logits)
        indices, logits, tails = torch.ops.kdfast.topk_targets(
            teacher_logits, k, [float(t) for t in temperatures]
        )
        return TopKTargets(indices, logits, tails)
    check_finite_logits(teacher_logits)
    return reference_topk_targets(teacher_logits, k, temperatures)


def uses_compiled_op(teacher_logits: torch.Tensor, k: int = 1, n_temperatures: int = 1) -> bool:
    """Whether :func:`topk_targets` runs ``torch.ops.kdfast.topk_targets`` for these logits:
    the extension is built with a kernel for their device, the dtype is float32/bfloat16/
    float16, no gradient is wanted through them (the op has no autograd; the reference's
    gathered logits keep the graph) and, on CUDA, min(k + 1, C) <= 2048 and at most 8
    temperatures (the kernel's shared-memory sort and registers)."""
    if not HAS_EXTENSION or teacher_logits.dtype not in OP_DTYPES:
        return False
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        return False
    if teacher_logits.is_cuda:
        fits = min(k + 1, teacher_logits.shape[-1]) <= CUDA_MAX_KEEP and n_temperatures <= CUDA_MAX_TEMPS
        key = "CUDA" if fits else None
    else:
        key = "CPU" if teacher_logits.is_cpu else None
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "kdfast::topk_targets", key
    )


def check_topk_args(teacher_logits: torch.Tensor, k: int, temperatures: Sequence[float]) -> None:
    """Raises a TypeError/ValueError naming the bad argument of :func:`topk_targets`."""
    check_topk_shapes_and_options(teacher_logits, k, temperatures)
    check_finite_logits(teacher_logits)


def check_topk_shapes_and_options(
    teacher_logits: torch.Tensor, k: int, temperatures: Sequence[float]
) -> None:
    """:func:`check_topk_args` without reading the logits' values."""
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


def check_finite_logits(teacher_logits: torch.Tensor) -> None:
    """Raises the ValueError of a NaN or +inf teacher logit (-inf, a masked class, is fine)."""
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


if HAS_EXTENSION:

    @torch.library.register_fake("kdfast::topk_targets")
    def _topk_targets_fake(teacher_logits, k, temperatures):
        lead = tuple(teacher_logits.shape[:-1])
        return (
            teacher_logits.new_empty(lead + (k,), dtype=torch.int64),
            teacher_logits.new_empty(lead + (k,), dtype=torch.float32),
            teacher_logits.new_empty(lead + (len(temperatures),), dtype=torch.float32),
        )
