"""Combining an ensemble's logits into one teacher row, shared by the cache and the trainer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def check_ensemble(mode: str, members: int, temperature: float | None) -> None:
    """Validates an ensemble configuration, naming the argument at fault."""
    modes = ("none", "mean_logits", "mean_probs", "members")
    if mode not in modes:
        raise ValueError(f"ensemble must be one of {modes}, got {mode!r}")
    if mode == "none" and members != 1:
        raise ValueError(f"ensemble='none' takes exactly one teacher, got {members}")
    if mode == "mean_probs":
        if temperature is None or not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(
                "ensemble='mean_probs' averages softmax(logits / T), which depends on T: pass "
                f"temperature=T > 0 (the training temperature), got {temperature!r}"
            )
    elif temperature is not None and mode != "members":
        raise ValueError(
            f"temperature is only used by ensemble='mean_probs' (mode {mode!r} stores logits that "
            "serve every T); leave it unset"
        )


def combine_members(logits: torch.Tensor, mode: str, temperature: float | None = None) -> torch.Tensor:
    """Reduces member logits ``(..., M, C)`` to teacher logits ``(..., C)`` (float32).

    - ``"mean_logits"``: the mean of the members' logits. Independent of T, so a cache of it
      serves every training temperature.
    - ``"mean_probs"``: ``T * log(mean_m softmax(z_m / T))``. Its softmax at temperature T is
      exactly the mean of the members' probabilities at T, so it drops into KDLoss like plain
      logits, but only at that T (a cache of it records T and refuses others).
    """
    logits = logits.float()
    if mode == "mean_logits":
        return logits.mean(dim=-2)
    if mode == "mean_probs":
        t = float(temperature)
        log_p = torch.log_softmax(logits / t, dim=-1)
        # logsumexp over members keeps tiny probabilities instead of underflowing to log(0).
        return t * (torch.logsumexp(log_p, dim=-2) - math.log(logits.shape[-2]))
    raise ValueError(f"mode must be 'mean_logits' or 'mean_probs', got {mode!r}")


def run_teacher(teacher, x: torch.Tensor) -> torch.Tensor:
    """``teacher(x)``, unwrapping an output object's ``.logits`` (e.g. a transformers model)."""
    out = teacher(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def teacher_logits(
    teachers: Sequence[nn.Module], x: torch.Tensor, mode: str, temperature: float | None = None
) -> torch.Tensor:
    """Runs each teacher on ``x`` and returns ``(B, C)`` logits (``(B, M, C)`` for
    ``mode="members"``; ``(B, L, C)`` for token-level teachers); call it under
    ``torch.no_grad`` / ``inference_mode``."""
    if mode == "none":
        return run_teacher(teachers[0], x)
    stacked = torch.stack([run_teacher(t, x) for t in teachers], dim=-2)  # (B, M, C)
    return stacked if mode == "members" else combine_members(stacked, mode, temperature)
