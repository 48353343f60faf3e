"""Autograd (gradcheck), the custom-op contract (opcheck), torch.compile and autocast."""

from __future__ import annotations

import pytest
import torch

import kdfast
from kdfast import reference
from tests.conftest import IGNORE, KINDS, assert_within, gen, grad_error_bound

F64 = torch.float64

# --------------------------------------------------------------------------------------------
# gradcheck (float64, through the op's backward)
# --------------------------------------------------------------------------------------------

GRADCHECK_CASES = {
    "target_ignored_smoothing": dict(with_target=True, alpha=0.4, label_smoothing=0.1),
    "target_alpha0": dict(with_target=True, alpha=0.0, label_smoothing=0.0),
    "target_alpha1": dict(with_target=True, alpha=1.0, label_smoothing=0.2),
    "no_target": dict(with_target=False, alpha=0.5, label_smoothing=0.0),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("T", [0.7, 3.0])
def test_gradcheck(kind, case, reduction, T):
    cfg = GRADCHECK_CASES[case]
    s = torch.randn(5, 6, generator=gen(100), dtype=F64, requires_grad=True)
    t = torch.randn(5, 6, generator=gen(101), dtype=F64)
    y = None
    if cfg["with_target"]:
        y = torch.tensor([0, IGNORE, 5, 2, IGNORE])

    def fn(student):
        return kdfast.distillation_loss(student, t, y, temperature=T, alpha=cfg["alpha"], kind=kind, beta=0.3,
                                        label_smoothing=cfg["label_smoothing"], reduction=reduction)

    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_3d_strided(kind):
    base = torch.randn(3, 4, 14, generator=gen(102), dtype=F64, requires_grad=True)
    t = torch.randn(3, 4, 7, generator=gen(103), dtype=F64)
    y = torch.tensor([[0, 1, IGNORE, 6], [2, 3, 4, 5], [IGNORE, 0, 1, 2]])

    def fn(b):
        return kdfast.distillation_loss(b[..., ::2], t, y, temperature=2.0, alpha=0.5, kind=kind,
                                        label_smoothing=0.1, reduction="sum")

    assert torch.autograd.gradcheck(fn, (base,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_masked_teacher():
    s = torch.randn(4, 6, generator=gen(104), dtype=F64, requires_grad=True)
    t = torch.randn(4, 6, generator=gen(105), dtype=F64)
    t[0, 2] = t[1, 0] = t[3, 5] = float("-inf")
    for kind in ("kl", "jsd"):
        assert torch.autograd.gradcheck(
            lambda x, k=kind: kdfast.distillation_loss(x, t, temperature=1.5, kind=k), (s,), eps=1e-6,
            atol=1e-7, rtol=1e-5,
        )


# --------------------------------------------------------------------------------------------
# opcheck (schema, fake kernels, autograd registration, AOT dispatch)
# --------------------------------------------------------------------------------------------


def _fwd_samples():
    n, c = 6, 11
    y = torch.tensor([0, 3, IGNORE, 10, 7, 1])
    out = []
    for dtype, req in ((torch.float32, True), (torch.bfloat16, True), (F64, True), (torch.float16, False)):
        s = torch.randn(n, c, generator=gen(110)).to(dtype).requires_grad_(req)
        t = torch.randn(n, c, generator=gen(111)).to(dtype)
        out.append((s, t, y, 2.0, 0.5, "kl", 0.5, IGNORE, 0.1, True, req))
    s = torch.randn(n, c, generator=gen(112), requires_grad=True)
    t = torch.randn(n, c, generator=gen(113))
    out.append((s, t, None, 1.0, 0.5, "jsd", 0.3, IGNORE, 0.0, True, True))
    out.append((s.detach(), t, None, 4.0, 0.5, "reverse_kl", 0.5, IGNORE, 0.0, False, False))
    out.append((s.detach(), t.to(torch.bfloat16), y, 1.0, 0.0, "kl", 0.5, IGNORE, 0.0, True, False))
    # fp16 student: the raw op returns a float32 gradient (the fake kernel must agree).
    s16 = s.detach().half().requires_grad_()
    out.append((s16, t.half(), y, 3.0, 0.5, "jsd", 0.5, IGNORE, 0.0, True, True))
    # Class dimension with a stride: the op accepts any strides.
    wide = torch.randn(n, 2 * c, generator=gen(114))
    out.append((wide[:, ::2], t, y, 2.0, 0.5, "kl", 0.5, IGNORE, 0.0, True, True))
    # average_rows: loss_rows and grad divided by the counted rows (with and without target).
    out.append((s, t, y, 2.0, 0.5, "kl", 0.5, IGNORE, 0.1, True, True, True))
    out.append((s.detach().to(torch.bfloat16).requires_grad_(), t, None, 3.0, 0.5, "jsd", 0.5, IGNORE, 0.0,
                True, True, True))
    return out


@pytest.mark.parametrize("sample", range(len(_fwd_samples())))
def test_opcheck_distill_fwd(sample):
    args = _fwd_samples()[sample]
    torch.library.opcheck(torch.ops.kdfast.distill_fwd.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("with_target", [True, False])
def test_opcheck_distill_fwd_inplace(dtype, with_target):
    s = torch.randn(6, 11, generator=gen(115)).to(dtype)
    t = torch.randn(6, 11, generator=gen(116)).to(dtype)
    y = torch.tensor([0, 3, IGNORE, 10, 7, 1]) if with_target else None
    for average_rows in (False, True):
        torch.library.opcheck(torch.ops.kdfast.distill_fwd_inplace.default,
                              (s.clone(), t, y, 2.0, 0.5, "kl", 0.5, IGNORE, 0.1, True, average_rows))


@pytest.mark.parametrize(
    "grad_dtype,scale_dtype,out_dtype",
    [(torch.float32, torch.float32, torch.bfloat16), (torch.float32, torch.float32, torch.float16),
     (torch.bfloat16, torch.float32, torch.bfloat16), (F64, F64, torch.float32)],
)
def test_opcheck_scale_rows(grad_dtype, scale_dtype, out_dtype):
    grad = torch.randn(6, 11, generator=gen(119)).to(grad_dtype)
    row_scale = torch.randn(6, generator=gen(119)).to(scale_dtype)
    torch.library.opcheck(torch.ops.kdfast.scale_rows.default, (grad, row_scale, out_dtype))
    out = torch.ops.kdfast.scale_rows(grad, row_scale, out_dtype)
    assert out.dtype == out_dtype
    expected = (grad.to(F64) * row_scale.to(F64)[:, None]).to(out_dtype)
    # One rounding into out_dtype from a product computed in float32/float64.
    torch.testing.assert_close(out, expected, rtol=2**-7, atol=0.0)


def test_raw_ops_contract():
    """distill_fwd's documented outputs: per-row losses and the unscaled per-row gradient."""
    s = torch.randn(6, 11, generator=gen(117), dtype=F64)
    t = torch.randn(6, 11, generator=gen(118), dtype=F64)
    y = torch.tensor([0, 3, IGNORE, 10, 7, 1])
    rows, grad = torch.ops.kdfast.distill_fwd(s, t, y, 2.0, 0.5, "kl", 0.5, IGNORE, 0.1, True, True)
    leaf = s.clone().requires_grad_()
    ref_rows = reference.distillation_loss(leaf, t, y, temperature=2.0, label_smoothing=0.1, reduction="none")
    (ref_grad,) = torch.autograd.grad(ref_rows.sum(), leaf)
    torch.testing.assert_close(rows, ref_rows.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert rows[2] == 0 and (grad[2] == 0).all()
    rows2, empty = torch.ops.kdfast.distill_fwd(s, t, y, 2.0, 0.5, "kl", 0.5, IGNORE, 0.1, True, False)
    assert empty.numel() == 0
    torch.testing.assert_close(rows2, rows, rtol=1e-14, atol=0.0)
    for dtype, gdtype in ((torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                          (torch.float32, torch.float32)):
        r, g = torch.ops.kdfast.distill_fwd(s.to(dtype), t.to(dtype), y, 2.0, 0.5, "kl", 0.5, IGNORE, 0.1,
                                            True, True)
        assert r.dtype == torch.float32 and g.dtype == gdtype


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def _student_setup(seed=120, n=8, d=16, c=10):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(d, c)
    x = torch.randn(n, d, generator=gen(seed + 1))
    teacher = torch.randn(n, c, generator=gen(seed + 2))
    y = torch.randint(0, c, (n,), generator=gen(seed + 3))
    y[1] = IGNORE
    return lin, x, teacher, y


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,with_target", [("kl", True), ("jsd", True), ("reverse_kl", False)]
)
def test_compile_training_step_matches_eager(kind, with_target):
    lin, x, teacher, y = _student_setup()
    target = y if with_target else None

    def step(x, teacher, target):
        return kdfast.distillation_loss(lin(x), teacher, target, temperature=2.0, alpha=0.7, kind=kind,
                                        label_smoothing=0.1)

    eager = step(x, teacher, target)
    eager.backward()
    g_eager = (lin.weight.grad.clone(), lin.bias.grad.clone())
    lin.zero_grad()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, teacher, target)
    loss.backward()  # backward outside the compiled function
    # Same kernel on the same values; only Inductor's matmul/reduction order may differ.
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lin.weight.grad, g_eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lin.bias.grad, g_eager[1], rtol=1e-5, atol=1e-6)

    # A second batch size (recompile or dynamic shapes): still equal to eager.
    lin2, x2, teacher2, y2 = _student_setup(seed=130, n=12)
    lin.load_state_dict(lin2.state_dict())
    lin.zero_grad()
    target2 = y2 if with_target else None
    eager2 = step(x2, teacher2, target2)
    (gw_eager,) = torch.autograd.grad(eager2, lin.weight)
    loss2 = compiled(x2, teacher2, target2)
    (gw,) = torch.autograd.grad(loss2, lin.weight)
    torch.testing.assert_close(loss2, eager2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, gw_eager, rtol=1e-5, atol=1e-6)


def test_kdloss_under_compile():
    kd = kdfast.KDLoss(temperature=3.0, alpha=0.6, kind="jsd", beta=0.4, label_smoothing=0.05)
    compiled = torch.compile(kd, fullgraph=True)
    s = torch.randn(4, 7, 33, generator=gen(140), requires_grad=True)
    t = torch.randn(4, 7, 33, generator=gen(141))
    y = torch.randint(0, 33, (4, 7), generator=gen(142))
    y[0, 0] = IGNORE
    out = compiled(s, t, y)
    (g,) = torch.autograd.grad(out * 3.7, s)
    s2 = s.detach().clone().requires_grad_()
    ref = kd(s2, t, y)
    (g2,) = torch.autograd.grad(ref * 3.7, s2)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, g2, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# autocast
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16_linear_student(kind, teacher_dtype):
    lin, x, teacher, y = _student_setup(seed=150, n=32, d=24, c=50)
    teacher = teacher.to(teacher_dtype)
    kw = dict(temperature=2.0, alpha=0.5, kind=kind, label_smoothing=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lin(x)
        assert logits.dtype == torch.bfloat16
        logits.retain_grad()
        loss = kdfast.distillation_loss(logits, teacher, y, **kw)
    assert loss.dtype == torch.float32
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    assert logits.grad.dtype == torch.bfloat16

    # Reference from the same bf16 logits, upcast exactly.
    s64 = logits.detach().to(F64).requires_grad_()
    ref = reference.distillation_loss(s64, teacher.to(F64), y, **kw)
    (ref_grad,) = torch.autograd.grad(ref, s64)
    torch.testing.assert_close(loss.to(F64), ref.detach(), rtol=1e-5, atol=1e-5)
    bound, rtol = grad_error_bound(logits.detach(), teacher, y, torch.tensor(1.0, dtype=F64),
                                   grad_dtype=torch.bfloat16, acc=torch.float32, roundings=2, **kw)
    assert_within(logits.grad, ref_grad, bound, rtol)
