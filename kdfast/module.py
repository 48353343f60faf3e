"""kdfast.KDLoss: the nn.Module form of kdfast.distillation_loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdfast._checks import KINDS, REDUCTIONS, check_distillation_args
from kdfast.functional import distillation_loss

# ignore_index reaches the kernels as a C++ int64.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_str(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {type(value).__name__} {value!r}")


def _check_bool(name: str, value: object) -> None:
    # Only real bools: a truthy 0/1 or "False" string would hide a mistake.
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def _check_ignore_index(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ignore_index must be an int (a target value to skip, e.g. -100), got "
                        f"{type(value).__name__} {value!r}")
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 [{_INT64_MIN}, {_INT64_MAX}], got {value}")


def check_kdloss_args(
    *, temperature: float, alpha: float, kind: str, beta: float, ignore_index: int,
    label_smoothing: float, reduction: str, scale_by_t2: bool, inplace: bool,
) -> None:
    """Checks every argument of :class:`KDLoss`; raises a TypeError (wrong type) or a
    ValueError (out of range) naming the argument and what it expects."""
    _check_str("kind", kind, KINDS)
    _check_str("reduction", reduction, REDUCTIONS)
    _check_ignore_index(ignore_index)
    _check_bool("scale_by_t2", scale_by_t2)
    _check_bool("inplace", inplace)
    probe = torch.zeros(1, 1)  # the tensor checks need tensors; only the scalars are at stake
    check_distillation_args(
        probe, probe, None, temperature=temperature, alpha=alpha, kind=kind, beta=beta,
        label_smoothing=label_smoothing, reduction=reduction,
    )


class KDLoss(nn.Module):
    """Knowledge-distillation loss module; arguments and defaults as in
    :func:`kdfast.distillation_loss` (temperature=1.0, alpha=0.5, kind="kl", beta=0.5,
    ignore_index=-100, label_smoothing=0.0, reduction="mean", scale_by_t2=True,
    inplace=False); ``kind="logit_mse"`` (logit matching) takes ``temperature=1`` only.

    ``forward(student_logits, teacher_logits, target=None)``. Every argument is checked when
    the module is built, so a bad value fails before training starts: a TypeError for a wrong
    type (``ignore_index`` an int; ``scale_by_t2``, ``inplace`` bools; ``kind``, ``reduction``
    strings; the rest real numbers), a ValueError for a value out of range, each naming the
    argument and what it expects.

    Configuration protocol (every kdfast loss implements it): :meth:`config` returns a
    JSON-able dict of all the constructor's arguments, such that ``type(loss)(**loss.config())``
    builds an equal loss. :func:`kdfast.train.fit` records it in the checkpoint's run config
    and refuses to resume a run whose loss configuration differs.
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
        check_kdloss_args(
            temperature=temperature, alpha=alpha, kind=kind, beta=beta, ignore_index=ignore_index,
            label_smoothing=label_smoothing, reduction=reduction, scale_by_t2=scale_by_t2,
            inplace=inplace,
        )
        # Numbers stored as float: config() and the repr do not depend on 2 vs 2.0.
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.kind = kind
        self.beta = float(beta)
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self.scale_by_t2 = scale_by_t2
        self.inplace = inplace

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, target, **self.config())

    def config(self) -> dict[str, Any]:
        """All constructor arguments, as a JSON-able dict: ``KDLoss(**loss.config())``
        builds an equal loss (the configuration protocol; see the class docstring)."""
        return {
            "temperature": self.temperature, "alpha": self.alpha, "kind": self.kind,
            "beta": self.beta, "ignore_index": self.ignore_index,
            "label_smoothing": self.label_smoothing, "reduction": self.reduction,
            "scale_by_t2": self.scale_by_t2, "inplace": self.inplace,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.config().items())
