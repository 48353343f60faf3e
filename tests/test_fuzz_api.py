"""Fuzzing the public loss API with hypothesis: any shape, dtype pair, memory layout, value
(NaN, +-inf, huge), target and argument either gives a clear ValueError/TypeError before
anything is touched, or a loss of the documented shape and dtype whose backward runs. Nothing
crashes or hangs, and inputs are never modified (except the student in in-place mode).

The CI also runs this file under AddressSanitizer (.ci/asan.sh), which turns an
out-of-bounds read or write in the kernels into a failure.
"""

from __future__ import annotations

import math
import re

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
    # In-place mode gets logits produced by an op (it would overwrite a leaf, which is compared
    # below); the others take the leaf as it is, strides included. Students sharing memory in
    # place: test_fuzz_inplace_with_shared_memory.
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


def _shares_memory(logits: torch.Tensor, sharing: str) -> bool:
    """Whether distillation_loss must refuse the drawn in-place student."""
    if sharing in ("own", "own_vocab_slice"):
        return False
    if sharing in ("expanded_rows", "expanded_batch"):
        layout = zip(logits.shape, logits.stride(), strict=True)
        return any(stride == 0 and size > 1 for size, stride in layout)
    if sharing == "teacher_interleaved_slice":
        # No shared byte, but distillation_loss refuses intersecting address ranges.
        return math.prod(logits.shape[:-1]) > 1
    return True


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equality (NaN payloads included) of two tensors."""
    assert a.shape == b.shape and a.dtype == b.dtype
    if a.numel():
        x = a.detach().contiguous().view(_int_of(a.dtype))
        y = b.detach().contiguous().view(_int_of(b.dtype))
        assert np.array_equal(x.numpy(), y.numpy())


def _int_of(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


# --------------------------------------------------------------------------------------------
# inplace=True with students whose memory is shared (with itself, the teacher or the target):
# refused with a ValueError that leaves everything untouched, never a silently wrong loss.
# --------------------------------------------------------------------------------------------

SHARING = ["own", "own_vocab_slice", "expanded_rows", "expanded_batch", "teacher_is_student",
           "teacher_view_of_student", "teacher_overlapping_slice", "teacher_interleaved_slice",
           "target_in_student"]


@st.composite
def inplace_sharing_calls(draw):
    """(leaf, make_logits, teacher_of, target_of, kwargs, sharing): make_logits(leaf) builds
    the non-leaf student from the leaf in the drawn layout; teacher_of(logits) and
    target_of(logits) build the teacher and target, possibly inside the student's memory."""
    sharing = draw(st.sampled_from(SHARING), label="sharing")
    batch = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=2), label="batch"))
    n_cols = draw(st.sampled_from([1, 2, 3, 16, 17, 65]), label="C")
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]), label="dtype")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    shape = (*batch, n_cols)
    pad = draw(st.integers(1, 8), label="pad")  # extra classes of the buffer the slices share
    shift = draw(st.integers(0, n_cols - 1), label="shift") if n_cols > 1 else 0

    if sharing == "expanded_rows":
        leaf_shape, make = (*batch[:-1], 1, n_cols), lambda leaf: (leaf * 1).expand(shape)
    elif sharing == "expanded_batch":
        leaf_shape, make = (1, *batch[1:], n_cols), lambda leaf: (leaf * 1).expand(shape)
    elif sharing in ("own_vocab_slice", "teacher_overlapping_slice", "teacher_interleaved_slice"):
        leaf_shape, make = (*batch, 2 * n_cols + pad), lambda leaf: (leaf * 1)[..., :n_cols]
    elif sharing == "target_in_student":
        leaf_shape, make = (*batch, n_cols + 1), lambda leaf: (leaf.to(torch.float64) * 1)[..., :n_cols]
    else:
        leaf_shape, make = shape, lambda leaf: leaf * 1
    leaf = torch.randn(leaf_shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    if sharing == "target_in_student":
        leaf = leaf.detach().to(torch.float64).requires_grad_()
    separate_teacher = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    def teacher_of(logits):
        buffer = logits._base.detach() if logits._base is not None else None
        if sharing == "teacher_is_student":
            return logits.detach()
        if sharing == "teacher_view_of_student":
            return logits.detach().reshape(-1, n_cols)[:].view(shape)
        if sharing == "teacher_overlapping_slice":
            return buffer[..., shift:shift + n_cols]
        if sharing == "teacher_interleaved_slice":
            return buffer[..., n_cols + pad:]
        return separate_teacher.to(logits.dtype) if sharing == "target_in_student" else separate_teacher

    def target_of(logits):
        if sharing != "target_in_student":
            return None
        # An int64 view of one of the student's columns, set to valid class indices.
        target = logits._base.detach().view(torch.int64)[..., shift]
        target.copy_(torch.randint(0, n_cols, batch, generator=g))
        return target

    kwargs = dict(
        temperature=draw(st.sampled_from([1.0, 2.0])),
        alpha=draw(st.sampled_from([0.0, 0.5, 1.0])),
        kind=draw(st.sampled_from(["kl", "reverse_kl", "jsd"])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )
    return leaf, make, teacher_of, target_of, kwargs, sharing


@settings(SETTINGS, max_examples=200)
@given(inplace_sharing_calls())
def test_fuzz_inplace_with_shared_memory(call):
    leaf, make, teacher_of, target_of, kwargs, sharing = call
    logits = make(leaf)
    teacher, target = teacher_of(logits), target_of(logits)
    saved = [x.detach().clone() if x is not None else None for x in (logits, teacher, target)]
    # The out-of-place result on separate copies of the same values.
    reference_leaf = leaf.detach().clone().requires_grad_()
    expected = kdfast.distillation_loss(make(reference_leaf), saved[1], saved[2], **kwargs)
    expected.sum().backward()
    refused = _shares_memory(logits, sharing)
    try:
        loss = kdfast.distillation_loss(logits, teacher, target, inplace=True, **kwargs)
    except ValueError as err:
        event(f"refused: {sharing}")
        assert refused, f"refused a student of its own memory: {err}"
        # Names the argument and says what to pass instead.
        assert re.search(r"inplace=True .*(student_logits|teacher_logits|target)", str(err)), str(err)
        assert "Pass " in str(err), str(err)
        for x, x0 in zip((logits, teacher, target), saved, strict=True):
            if x is not None:
                _assert_same(x.detach(), x0)
        return
    event(f"computed: {sharing}")
    assert not refused, f"accepted a student sharing memory ({sharing})"
    _assert_same(teacher, saved[1])
    torch.testing.assert_close(loss, expected, rtol=0, atol=0, equal_nan=True)
    loss.sum().backward()
    torch.testing.assert_close(leaf.grad, reference_leaf.grad, rtol=0, atol=0, equal_nan=True)
