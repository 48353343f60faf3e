"""CUDA twins of tests/test_topk.py: the builder op on the device against the float64 oracle.

The whole module skips without a CUDA device. (KDFAST_TEST_DEVICE=cpu runs the same tests
against the CPU op, to dry-run the test logic on a machine without a GPU.)
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import kdfast
from kdfast.topk import uses_compiled_op
from tests.test_topk import TEMPS, assert_matches_oracle, random_rows

DEVICE = os.environ.get("KDFAST_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not kdfast.HAS_EXTENSION, reason="needs the compiled extension"),
]


def on_device(out):
    assert all(t.device.type == DEVICE for t in out)
    return kdfast.TopKTargets(*(t.cpu() for t in out))


def op(z, k, temperatures=TEMPS):
    return on_device(torch.ops.kdfast.topk_targets(z.to(DEVICE), k, list(temperatures)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_cols", [1, 2, 63, 1000, 4097])
def test_op_random_rows(dtype, n_cols):
    z = random_rows((2, 3, n_cols), dtype, seed=n_cols)
    for k in sorted({1, min(64, n_cols), min(max(1, n_cols - 1), 2047), n_cols if n_cols <= 2048 else 1}):
        assert_matches_oracle(op(z, k), z, k, TEMPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_op_ties_everywhere(dtype):
    z = torch.randint(-3, 4, (16, 700), generator=torch.Generator().manual_seed(2)).to(dtype)
    for k in (1, 5, 64, 350, 699, 700):
        assert_matches_oracle(op(z, k), z, k, TEMPS)


def test_op_ascending_and_masked_rows():
    ramp = torch.arange(5000, dtype=torch.float32) / 100
    z = torch.stack([ramp, ramp.flip(0), torch.zeros(5000), torch.full((5000,), -math.inf)])
    z[0, ::2] = -math.inf
    for k in (1, 64, 300, 2047):
        assert_matches_oracle(op(z, k), z, k, TEMPS)


def test_op_strided_input_and_many_rows():
    wide = random_rows((700, 900), torch.float32, seed=4)
    z = wide[:, :700]
    assert_matches_oracle(op(z, 64), z, 64, TEMPS)
    assert_matches_oracle(op(z.t(), 16), z.t(), 16, TEMPS)


@pytest.mark.slow
def test_op_large_vocabulary():
    z = random_rows((3, 131072), torch.bfloat16, seed=7)
    for k in (1, 64, 2047):
        assert_matches_oracle(op(z, k), z, k, TEMPS)


def test_public_function_routes_the_kernel_limits():
    z = random_rows((2, 3000), torch.float32, seed=5).to(DEVICE)
    if DEVICE == "cuda":
        assert uses_compiled_op(z, 64, 3)
        assert not uses_compiled_op(z, 2048, 3)  # k + 1 > 2048: the reference
        assert not uses_compiled_op(z, 64, 9)
    for k in (64, 2500):
        out = kdfast.topk_targets(z, k, TEMPS)
        assert_matches_oracle(on_device(out), z.cpu(), k, TEMPS)


def test_public_function_refuses_nan():
    z = random_rows((2, 300), torch.float32, seed=6)
    z[1, 7] = math.nan
    with pytest.raises(ValueError, match="teacher_logits: NaN"):
        kdfast.topk_targets(z.to(DEVICE), 4)
