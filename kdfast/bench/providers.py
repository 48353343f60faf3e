"""The three ways to compute the loss that the benchmark compares, each as a
forward+backward step on a fresh leaf copy of the student logits."""

from __future__ import annotations

from collections.abc import Callable

import torch

import kdfast
from kdfast.reference import eager_baseline

PROVIDERS = ("kdfast", "eager", "compiled")
TEMPERATURE = 2.0
ALPHA = 0.5

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def make_step(provider: str, kind: str) -> Step:
    if provider == "kdfast":

        def loss_fn(s, t, y):
            return kdfast.distillation_loss(s, t, y, temperature=TEMPERATURE, alpha=ALPHA, kind=kind)

    elif provider in ("eager", "compiled"):

        def loss_fn(s, t, y):
            return eager_baseline(s, t, y, temperature=TEMPERATURE, alpha=ALPHA, kind=kind)

        if provider == "compiled":
            # Every case compiles the same code object anew: without a reset dynamo stops at
            # its recompile limit (8) and quietly runs the rest of a grid eagerly.
            torch._dynamo.reset()
            loss_fn = torch.compile(loss_fn, dynamic=False)
    else:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")

    def step(student, teacher, target):
        leaf = student.detach().requires_grad_()
        loss_fn(leaf, teacher, target).backward()

    return step


def exps_per_element(kind: str) -> int:
    """The minimum transcendental count per element a fused kernel needs here (T != 1, hard
    term present): softmax(s/T), softmax(t/T), softmax(s); jsd adds the mixture's exp."""
    return 4 if kind == "jsd" else 3
