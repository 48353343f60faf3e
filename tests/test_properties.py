"""Hypothesis property tests: random shapes and values (large magnitudes, infinite teacher
entries), fused vs reference, for the "kl" and "jsd" kinds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kdfast
from kdfast import reference
from tests.conftest import IGNORE, Logits, check_case

SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

FINITE = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
MODERATE = st.floats(-20, 20, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def problems(draw, *, teacher_inf: str):
    """teacher_inf: "none", "neg" (-inf entries, never a whole row) or "any" (+-inf anywhere)."""
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    elements = draw(st.sampled_from([FINITE, MODERATE]))
    s = draw(hnp.arrays(dtype, (n, c), elements=elements))
    t = draw(hnp.arrays(dtype, (n, c), elements=elements))
    if teacher_inf != "none":
        choices = [-math.inf] if teacher_inf == "neg" else [-math.inf, math.inf]
        mask = draw(hnp.arrays(np.bool_, (n, c), elements=st.booleans()))
        fill = draw(hnp.arrays(dtype, (n, c), elements=st.sampled_from(choices)))
        if teacher_inf == "neg":
            mask[:, draw(st.integers(0, c - 1))] = False  # one finite entry per row
        t = np.where(mask, fill, t).astype(dtype)
    with_target = draw(st.booleans())
    y = None
    if with_target:
        y = np.array(draw(st.lists(st.one_of(st.integers(0, c - 1), st.just(IGNORE)), min_size=n,
                                   max_size=n)), dtype=np.int64)
    kw = dict(
        temperature=draw(st.sampled_from([0.05, 0.5, 1.0, 2.0, 7.5, 100.0])),
        alpha=draw(st.sampled_from([0.0, 0.3, 1.0])),
        kind=draw(st.sampled_from(["kl", "jsd"])),
        beta=draw(st.sampled_from([0.5, 0.1, 0.9])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
    )
    target = None if y is None else torch.from_numpy(y)
    return torch.from_numpy(s.copy()), torch.from_numpy(t.copy()), target, kw


@pytest.mark.slow
@SETTINGS
@given(problems(teacher_inf="neg"))
def test_property_fused_matches_reference(problem):
    s, t, y, kw = problem
    res = check_case(Logits(s, s.shape[-1], "contiguous"), t, y, upstream=1.0 if kw["reduction"] != "none"
                     else "random", **kw)
    # Finite inputs (masked entries aside): a finite loss and gradient.
    assert torch.isfinite(res.loss).all()
    assert torch.isfinite(res.grad).all()


@pytest.mark.slow
@SETTINGS
@given(problems(teacher_inf="any"))
def test_property_nonfinite_teacher_matches_reference(problem):
    """+inf entries and fully -inf rows have no distribution: NaN exactly where the reference
    says NaN (the README: non-finite inputs must not turn into plausible finite losses)."""
    s, t, y, kw = problem
    kw = {**kw, "reduction": "none"}
    fused = kdfast.distillation_loss(s, t, y, **kw)
    ref = reference.distillation_loss(s.double(), t.double(), y, **kw)
    nan_ref = torch.isnan(ref)
    assert torch.equal(torch.isnan(fused), nan_ref), (fused, ref)
    assert not torch.isinf(fused).any()
    if (~nan_ref).any():
        # Rows without +inf and with a finite entry: the finite-case comparison applies.
        keep = ~nan_ref
        scale = float(torch.where(torch.isfinite(s), s.abs(), torch.zeros_like(s)).max())
        T = kw["temperature"]
        eps = 2.0**-24 if s.dtype == torch.float32 else 2.0**-53
        coef = (T * T + 1.0)
        atol = 64 * eps * coef * (2 * scale / min(T, 1.0) + math.sqrt(s.shape[-1]) + 1.0)
        torch.testing.assert_close(fused[keep].double(), ref[keep], rtol=1e-4 if eps > 1e-10 else 1e-10,
                                   atol=atol)
