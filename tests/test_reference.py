"""kdfast.reference.eager_baseline, the baseline of every benchmark, against the float64
oracle kdfast.reference.distillation_loss: kinds, temperatures, label smoothing, ignored rows,
no target; loss and student gradient."""

from __future__ import annotations

import itertools

import pytest
import torch

import kdfast
from kdfast import reference
from kdfast.bench import providers
from kdfast.bench.providers import make_step

KINDS = ("kl", "reverse_kl", "jsd")
TEMPERATURES = (1.0, 2.0, 20.0)
SMOOTHING = (0.0, 0.1)
TARGETS = ("none", "labels", "ignored")
N, C = 37, 11
PAD = -7  # a non-default ignore_index: nothing may assume -100


def _inputs(seed: int, targets: str):
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(N, C, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(N, C, generator=g, dtype=torch.float64)
    if targets == "none":
        return student, teacher, None
    target = torch.randint(0, C, (N,), generator=g)
    if targets == "ignored":
        target[torch.randperm(N, generator=g)[: N // 3]] = PAD
    return student, teacher, target


def _loss_and_grad(fn, student, teacher, target, **kw):
    leaf = student.detach().clone().requires_grad_()
    loss = fn(leaf, teacher, target, **kw)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad


CASES = list(itertools.product(KINDS, TEMPERATURES, SMOOTHING, TARGETS))


@pytest.mark.parametrize("kind,temperature,eps,targets", CASES,
                         ids=[f"{k}-T{t:g}-eps{e}-{y}" for k, t, e, y in CASES])
def test_eager_baseline_matches_the_float64_oracle(kind, temperature, eps, targets):
    student, teacher, target = _inputs(CASES.index((kind, temperature, eps, targets)), targets)
    kw = dict(temperature=temperature, alpha=0.3, kind=kind, beta=0.35, label_smoothing=eps)
    ignore = {"ignore_index": PAD} if targets == "ignored" else {}
    expected, expected_grad = _loss_and_grad(reference.distillation_loss, student, teacher, target,
                                             **kw, **ignore, scale_by_t2=True)
    loss, grad = _loss_and_grad(reference.eager_baseline, student, teacher, target, **kw, **ignore)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-13)
    if targets == "ignored":
        assert torch.all(grad[target == PAD] == 0)  # padding rows get no gradient at all


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_eager_baseline_extreme_alphas(alpha):
    student, teacher, target = _inputs(5, "labels")
    kw = dict(temperature=4.0, alpha=alpha, kind="jsd")
    expected = reference.distillation_loss(student, teacher, target, **kw)
    torch.testing.assert_close(reference.eager_baseline(student, teacher, target, **kw), expected,
                               rtol=1e-12, atol=1e-12)


def test_eager_baseline_in_float32_is_within_float32_roundoff_of_the_oracle():
    """The benchmark's dtype: the float32 baseline against the float64 oracle on the same values."""
    student, teacher, target = _inputs(9, "labels")
    s32, t32 = student.detach().float(), teacher.float()
    for kind in KINDS:
        kw = dict(temperature=2.0, alpha=0.5, kind=kind)
        expected = reference.distillation_loss(s32.double(), t32.double(), target, **kw)
        got = reference.eager_baseline(s32, t32, target, **kw)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_benchmark_providers_agree_at_the_benchmark_settings():
    """The bench's kdfast and eager steps run, and compute the same loss (the compiled provider
    is covered by the slow report test)."""
    student, teacher, target = _inputs(11, "labels")
    s32, t32 = student.detach().float(), teacher.float()
    for kind in KINDS:
        for provider in ("kdfast", "eager"):
            make_step(provider, kind)(s32, t32, target)
        kw = dict(temperature=providers.TEMPERATURE, alpha=providers.ALPHA, kind=kind)
        torch.testing.assert_close(kdfast.distillation_loss(s32, t32, target, **kw),
                                   reference.eager_baseline(s32, t32, target, **kw), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"provider must be one of \('kdfast', 'eager', 'compiled'\)"):
        make_step("numpy", "kl")
