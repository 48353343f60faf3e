"""kdfast.KDLoss: the nn.Module form of kdfast.distillation_loss."""

from __future__ import annotations

import torch
from torch import nn

from kdfast._checks import check_distillation_args
from kdfast.functional import distillation_loss


class KDLoss(nn.Module):
    """Knowledge-distillation loss module; arguments and defaults as in
    :func:`kdfast.distillation_loss` (temperature=1.0, alpha=0.5, kind="kl", beta=0.5,
    ignore_index=-100, label_smoothing=0.0, reduction="mean", scale_by_t2=True,
    inplace=False).

    ``forward(student_logits, teacher_logits, target=None)``. Hyper-parameters are checked
    when the module is built, so a bad value fails before training starts.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        alpha: float = 0.5,
        kind: str = "kl",
        beta: float = 0.5,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        scale_by_t2: bool = True,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        probe = torch.zeros(1, 1)
        check_distillation_args(
            probe, probe, None, temperature=temperature, alpha=alpha, kind=kind, beta=beta,
            label_smoothing=label_smoothing, reduction=reduction,
        )
        self.temperature = temperature
        self.alpha = alpha
        self.kind = kind
        self.beta = beta
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.reduction = reduction
        self.scale_by_t2 = scale_by_t2
        self.inplace = inplace

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return distillation_loss(
            student_logits, teacher_logits, target, temperature=self.temperature,
            alpha=self.alpha, kind=self.kind, beta=self.beta, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, reduction=self.reduction,
            scale_by_t2=self.scale_by_t2, inplace=self.inplace,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, kind={self.kind!r}, "
            f"beta={self.beta}, reduction={self.reduction!r}"
        )
