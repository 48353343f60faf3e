"""Bad input raises a clear error naming the argument, and leaves every input untouched."""

from __future__ import annotations

import math

import pytest
import torch

import kdfast
from kdfast import reference
from tests.conftest import IGNORE, KINDS, gen

N, C = 6, 5


def _inputs(dtype=torch.float32):
    s = torch.randn(N, C, generator=gen(200)).to(dtype)
    t = torch.randn(N, C, generator=gen(201)).to(dtype)
    y = torch.tensor([0, 4, IGNORE, 1, 2, 3])
    return s, t, y


# Each case: (student, teacher, target, kwargs) -> modified; the expected exception and a regex
# that must name the argument.
CASES = {
    "teacher_vocab_mismatch": (lambda s, t, y, kw: (s, torch.randn(N, C + 3), y, kw), ValueError,
                               r"teacher_logits shape .* student_logits shape .*slice"),
    "teacher_rows_mismatch": (lambda s, t, y, kw: (s, t[:4], y, kw), ValueError, r"teacher_logits shape"),
    "target_shape": (lambda s, t, y, kw: (s, t, y[:5], kw), ValueError, r"target shape"),
    "target_2d": (lambda s, t, y, kw: (s, t, y[:, None], kw), ValueError, r"target shape"),
    "target_out_of_range": (lambda s, t, y, kw: (s, t, _set(y, 3, C), kw), ValueError,
                            rf"target\[3\] = {C} is out of range.*\[0, {C}\).*ignore_index"),
    "target_negative": (lambda s, t, y, kw: (s, t, _set(y, 4, -3), kw), ValueError,
                        r"target\[4\] = -3 is out of range"),
    "target_float": (lambda s, t, y, kw: (s, t, y.float(), kw), TypeError, r"target must be an integer"),
    "target_bool": (lambda s, t, y, kw: (s, t, y > 0, kw), TypeError, r"target must be an integer"),
    "target_list": (lambda s, t, y, kw: (s, t, y.tolist(), kw), TypeError, r"target must be a torch.Tensor"),
    "student_int": (lambda s, t, y, kw: (s.long(), t, y, kw), TypeError, r"student_logits must be float"),
    "teacher_int": (lambda s, t, y, kw: (s, t.int(), y, kw), TypeError, r"teacher_logits must be float"),
    "student_0d": (lambda s, t, y, kw: (s[0, 0], t[0, 0], None, kw), ValueError, r"student_logits must have"),
    "no_classes": (lambda s, t, y, kw: (s[:, :0], t[:, :0], y, kw), ValueError, r"at least 1 class"),
    "student_not_tensor": (lambda s, t, y, kw: (s.tolist(), t, y, kw), TypeError,
                           r"student_logits must be a"),
    "teacher_on_meta": (lambda s, t, y, kw: (s, t.to("meta"), y, kw), ValueError,
                        r"teacher_logits is on meta but student_logits is on cpu"),
    "target_on_meta": (lambda s, t, y, kw: (s, t, y.to("meta"), kw), ValueError, r"target is on meta"),
    "teacher_requires_grad": (lambda s, t, y, kw: (s, t.clone().requires_grad_(), y, kw), ValueError,
                              r"teacher_logits requires grad.*detach\(\)"),
}
for _name, _values in {
    "temperature": [0.0, -1.0, math.inf, -math.inf, math.nan],
    "alpha": [-0.1, 1.5, math.nan],
    "beta": [0.0, 1.0, -0.2, 1.2, math.nan],
    "label_smoothing": [-0.1, 1.1, math.nan],
}.items():
    for _v in _values:
        CASES[f"{_name}={_v}"] = (
            lambda s, t, y, kw, n=_name, v=_v: (s, t, y, {**kw, n: v}), ValueError, rf"{_name} must be"
        )
for _name, _v in (("temperature", "2"), ("alpha", None), ("beta", True), ("label_smoothing", [0.1])):
    CASES[f"{_name}_type"] = (lambda s, t, y, kw, n=_name, v=_v: (s, t, y, {**kw, n: v}), TypeError,
                              rf"{_name} must be a real number")
CASES["kind_unknown"] = (lambda s, t, y, kw: (s, t, y, {**kw, "kind": "forward_kl"}), ValueError,
                         r"kind must be one of .*'forward_kl'")
CASES["reduction_unknown"] = (lambda s, t, y, kw: (s, t, y, {**kw, "reduction": "avg"}), ValueError,
                              r"reduction must be one of .*'avg'")


def _set(y, i, v):
    y = y.clone()
    y[i] = v
    return y


BASE_KW = dict(temperature=2.0, alpha=0.5, kind="jsd", label_smoothing=0.1)


@pytest.mark.parametrize("impl", ["fused", "fused_inplace", "reference", "module"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_and_leaves_inputs_untouched(case, impl):
    make, exc, pattern = CASES[case]
    s, t, y = _inputs()
    s = s.requires_grad_(impl != "fused_inplace")
    student, teacher, target, kw = make(s, t, y, dict(BASE_KW))
    copies = [x.detach().clone() if isinstance(x, torch.Tensor) and x.device.type != "meta" else None
              for x in (student, teacher, target)]
    with pytest.raises(exc, match=pattern):
        if impl == "fused":
            kdfast.distillation_loss(student, teacher, target, **kw)
        elif impl == "fused_inplace":
            kdfast.distillation_loss(student, teacher, target, inplace=True, **kw)
        elif impl == "reference":
            reference.distillation_loss(student, teacher, target, **kw)
        else:
            # Hyper-parameters fail when the module is built, tensors when it is called.
            kdfast.KDLoss(**kw)(student, teacher, target)
    for x, x0 in zip((student, teacher, target), copies, strict=True):
        if x0 is not None:
            assert torch.equal(x.detach(), x0), "an input was modified by a call that raised"
    if s.requires_grad:
        assert s.grad is None


@pytest.mark.parametrize("name,value", [("temperature", 0.0), ("alpha", 2.0), ("beta", 1.0),
                                        ("label_smoothing", -1.0), ("kind", "kld"), ("reduction", "max")])
def test_kdloss_checks_hyperparameters_at_construction(name, value):
    with pytest.raises(ValueError, match=name):
        kdfast.KDLoss(**{name: value})


def test_teacher_requiring_grad_is_fine_without_grad_mode():
    s, t, y = _inputs()
    t.requires_grad_()
    with torch.no_grad():
        out = kdfast.distillation_loss(s, t, y)
    torch.testing.assert_close(out, kdfast.distillation_loss(s, t.detach(), y), rtol=0, atol=0)


RAW_CASES = {
    "student_3d": (lambda s, t, y: (s[None], t[None], y), r"student_logits must be 2-D"),
    "teacher_shape": (lambda s, t, y: (s, t[:, :3], y), r"teacher_logits shape .*slice"),
    "target_shape": (lambda s, t, y: (s, t, y[:3]), r"target shape"),
    "target_range": (lambda s, t, y: (s, t, _set(y, 1, 99)), r"target\[1\] = 99"),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_raw_op_errors_name_the_argument(case):
    make, pattern = RAW_CASES[case]
    s, t, y = _inputs()
    student, teacher, target = make(s, t, y)
    with pytest.raises(ValueError, match=pattern):
        torch.ops.kdfast.distill_fwd(student, teacher, target, 2.0, 0.5, "kl", 0.5, IGNORE, 0.0, True, True)
    bad_scalars = [((0.0, 0.5, "kl", 0.5, 0.0), "temperature"), ((1.0, 1.5, "kl", 0.5, 0.0), "alpha"),
                   ((1.0, 0.5, "kl", 1.0, 0.0), "beta"), ((1.0, 0.5, "kl", 0.5, 2.0), "label_smoothing"),
                   ((1.0, 0.5, "kld", 0.5, 0.0), "kind")]
    for (T, a, k, b, e), name in bad_scalars:
        with pytest.raises(ValueError, match=name):
            torch.ops.kdfast.distill_fwd(s, t, y, T, a, k, b, IGNORE, e, True, True)
    assert torch.equal(s, _inputs()[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_double_backward_raises(kind, inplace):
    w = torch.randn(C, C, generator=gen(210), dtype=torch.float64, requires_grad=True)
    x = torch.randn(N, C, generator=gen(211), dtype=torch.float64)
    t = torch.randn(N, C, generator=gen(212), dtype=torch.float64)
    _, _, y = _inputs()
    loss = kdfast.distillation_loss(x @ w, t, y, kind=kind, temperature=2.0, inplace=inplace)
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once.differentiable"):
        g.pow(2).sum().backward()
    # gradgradcheck must not pass either (autograd.grad with allow_unused never visits the
    # error node, so it may report a Jacobian mismatch instead: any RuntimeError will do).
    with pytest.raises(RuntimeError):
        torch.autograd.gradgradcheck(
            lambda s: kdfast.distillation_loss(s * 1.0, t, y, kind=kind, inplace=inplace),
            (torch.randn(N, C, generator=gen(213), dtype=torch.float64, requires_grad=True),),
        )


@pytest.mark.parametrize("inplace", [False, True])
def test_double_backward_second_order_grad_is_not_silently_wrong(inplace):
    """The gradient returned with create_graph=True must not carry a live graph back to the
    logits (which would make d(grad)/d(logits) silently equal to the identity)."""
    s = torch.randn(N, C, generator=gen(214), dtype=torch.float64, requires_grad=True)
    t = torch.randn(N, C, generator=gen(215), dtype=torch.float64)
    logits = s * 1.0
    loss = kdfast.distillation_loss(logits, t, temperature=2.0, inplace=inplace)
    (g,) = torch.autograd.grad(loss, logits, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), s)
