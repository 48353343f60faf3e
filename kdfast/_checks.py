"""Argument validation shared by the fused path and kdfast.reference.

Every error names the argument and the value it expected, and is raised before any buffer is
touched.
"""

from __future__ import annotations

import math

import torch

KINDS = ("kl", "reverse_kl", "jsd", "logit_mse")
REDUCTIONS = ("mean", "batchmean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_distillation_args(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float,
    kind: str,
    beta: float,
    label_smoothing: float,
    reduction: str,
) -> None:
    for name, t in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have a class dimension (..., C), got a 0-d tensor")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} must equal student_logits shape "
            f"{tuple(student_logits.shape)}; if the vocabularies differ, slice both to the shared "
            "classes explicitly (kdfast never pads)"
        )
    if student_logits.shape[-1] < 1:
        raise ValueError("student_logits must have at least 1 class (C >= 1)")
    if teacher_logits.device != student_logits.device:
        raise ValueError(
            f"teacher_logits is on {teacher_logits.device} but student_logits is on "
            f"{student_logits.device}; move them to one device"
        )
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "teacher_logits requires grad, but gradients flow to the student only: pass "
            "teacher_logits.detach() (or compute the teacher under torch.no_grad())"
        )
    if target is not None:
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a torch.Tensor or None, got {type(target).__name__}")
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"target must be an integer tensor of class indices, got {target.dtype}")
        if target.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"target shape {tuple(target.shape)} must equal student_logits.shape[:-1] = "
                f"{tuple(student_logits.shape[:-1])}"
            )
        if target.device != student_logits.device:
            raise ValueError(
                f"target is on {target.device} but student_logits is on {student_logits.device}"
            )
    _check_number("temperature", temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    _check_number("alpha", alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_number("beta", beta)
    if not 0.0 < beta < 1.0:
        raise ValueError(
            f"beta must be in (0, 1), got {beta} (beta = 0 or 1 would make jsd a plain KL: use "
            "kind='kl' or kind='reverse_kl')"
        )
    _check_number("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "logit_mse" and temperature != 1:
        raise ValueError(
            f"temperature must be 1 with kind='logit_mse' (logit matching compares raw logits: "
            f"it is the T -> infinity limit of T**2 KL, with no temperature of its own), got "
            f"{temperature}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def reduce_rows(
    loss_rows: torch.Tensor, counted: torch.Tensor | None, reduction: str, batch_shape: torch.Size
) -> torch.Tensor:
    """Applies the reduction to per-row losses (0 on ignored rows).

    "mean" and "batchmean" divide by the number of counted rows (no host sync), giving 0.0 when
    no row counts.
    """
    if reduction == "none":
        return loss_rows.reshape(batch_shape)
    total = loss_rows.sum()
    if reduction == "sum":
        return total
    n = counted.sum() if counted is not None else loss_rows.numel()
    if isinstance(n, torch.Tensor):
        return total / n.clamp(min=1).to(total.dtype)
    return total / max(n, 1)
