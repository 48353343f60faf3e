"""Fuzzing the public loss API with hypothesis: any shape, dtype pair, memory layout, value
(NaN, +-inf, huge), target and argument either gives a clear ValueError/TypeError before
anything is touched, or a loss of the documented shape and dtype whose backward runs. Nothing
crashes or hangs, and inputs are never modified (except the student in in-place mode).

The CI also runs this file under AddressSanitizer (.ci/asan.sh), which turns an
out-of-bounds read or write in the kernels into a failure.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import kdfast
from tests.conftest import IGNORE

SETTINGS = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SPECIALS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e30, -1e30, 3e38, -3e38, 1e-40]


@st.composite
def logits(draw, shape, dtype, name):
    """A tensor of `shape` with random values (some special), in a random memory layout."""
    seed = draw(st.integers(0, 2**31 - 1), label=f"{name} seed")
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]), label=f"{name} scale")
    values = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    flat = values.view(-1)
    for _ in range(draw(st.integers(0, 3), label=f"{name} specials")):
        if flat.numel():
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    layouts = ["contiguous", "transposed", "strided", "expanded"]
    layout = draw(st.sampled_from(layouts), label=f"{name} layout")
    if layout == "transposed" and len(shape) >= 2:
        out = values.to(dtype).transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided":
        wide = torch.zeros((*shape[:-1], 2 * shape[-1] + 1), dtype=dtype)
        wide[..., 1::2] = values.to(dtype)
        out = wide[..., 1::2]
    elif layout == "expanded" and len(shape) >= 2 and shape[0] > 1:
        out = values[:1].to(dtype).expand(shape)  # stride 0 rows
    else:
        out = values.to(dtype)
    return out


@st.composite
def calls(draw):
    batch = tuple(draw(st.lists(st.integers(0, 19), min_size=0, max_size=2), label="batch"))
    n_cols = draw(st.sampled_from([1, 2, 3, 10, 16, 17, 63, 64, 65, 130]), label="C")
    shape = (*batch, n_cols)
    s_dtype = draw(st.sampled_from(DTYPES), label="student dtype")
    t_dtype = draw(st.sampled_from(DTYPES), label="teacher dtype")
    student = draw(logits(shape, s_dtype, "student"))
    teacher = draw(logits(shape, t_dtype, "teacher"))
    target_kind = draw(st.sampled_from(["none", "valid", "ignored", "int32", "none", "valid", "ignored",
                                        "out_of_range", "float"]))
    target = None
    if target_kind != "none":
        seed = draw(st.integers(0, 2**31 - 1))
        target = torch.randint(0, n_cols, batch, generator=torch.Generator().manual_seed(seed))
        if target.numel() and target_kind == "ignored":
            target.view(-1)[::2] = IGNORE
        if target.numel() and target_kind == "out_of_range":
            target.view(-1)[-1] = draw(st.sampled_from([n_cols, -1, 2**40]))
        if target_kind == "int32":
            target = target.int()
        if target_kind == "float":
            target = target.float()
    kwargs = dict(
        temperature=draw(st.sampled_from([1.0, 2.0, 4.0, 0.05, 50.0])),
        alpha=draw(st.sampled_from([0.0, 0.5, 1.0])),
        kind=draw(st.sampled_from(["kl", "reverse_kl", "jsd"])),
        beta=draw(st.sampled_from([0.5, 0.1])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
        reduction=draw(st.sampled_from(["mean", "batchmean", "sum", "none"])),
        scale_by_t2=draw(st.booleans()),
        inplace=draw(st.booleans()),
    )
    # About one call in four gets one invalid argument (the rest reach the kernels).
    bad = draw(st.sampled_from([None, None, None, "temperature", "alpha", "kind", "beta", "label_smoothing",
                                "reduction", None, None, None, None, None, None, None, None]))
    invalid = {"temperature": [0.0, -1.0, math.inf, math.nan], "alpha": [1.5, -0.1], "kind": ["KL", "js"],
               "beta": [0.0, 1.0], "label_smoothing": [2.0, -0.5], "reduction": ["avg"]}
    if bad is not None:
        kwargs[bad] = draw(st.sampled_from(invalid[bad]))
    return student, teacher, target, kwargs


@SETTINGS
@given(calls())
def test_fuzz_distillation_loss(call):
    student, teacher, target, kwargs = call
    leaf = student.detach().clone().requires_grad_()
    # In-place mode needs logits produced by an op (a leaf cannot be overwritten); the others
    # take the leaf as it is, strides included.
    logits = leaf * 1 if kwargs["inplace"] else leaf
    saved_teacher = teacher.clone()
    saved_target = target.clone() if target is not None else None
    saved_student = leaf.detach().clone()
    try:
        loss = kdfast.distillation_loss(logits, teacher, target, **kwargs)
    except (ValueError, TypeError) as err:
        # A rejected call names what was wrong and leaves every input untouched.
        event(f"rejected: {type(err).__name__}")
        assert str(err)
        _assert_same(teacher, saved_teacher)
        _assert_same(leaf.detach(), saved_student)
        return
    except RuntimeError as err:
        # The documented refusals that are RuntimeErrors: none for valid arguments.
        raise AssertionError(f"unexpected RuntimeError: {err}") from err
    event("computed")
    expected_shape = student.shape[:-1] if kwargs["reduction"] == "none" else ()
    assert loss.shape == expected_shape
    wide = torch.float64 in (student.dtype, teacher.dtype)
    assert loss.dtype == (torch.float64 if wide else torch.float32)
    _assert_same(teacher, saved_teacher)
    if target is not None:
        assert torch.equal(target, saved_target)
    loss.sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == student.shape and leaf.grad.dtype == student.dtype
    _assert_same(leaf.detach(), saved_student)


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equality (NaN payloads included) of two tensors."""
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.numel():
        x = a.detach().contiguous().view(_int_of(a.dtype))
        y = b.detach().contiguous().view(_int_of(b.dtype))
        assert np.array_equal(x.numpy(), y.numpy())


def _int_of(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
