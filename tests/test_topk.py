"""kdfast.topk_targets: the sparse-cache builder's contract, against float64 torch.topk +
logsumexp."""

import math

import pytest
import torch

import kdfast


def oracle(z: torch.Tensor, k: int, temperatures):
    z = z.double()
    values, ids = torch.topk(z, k, dim=-1)
    rest = z.scatter(-1, ids, -math.inf)
    return values, [torch.logsumexp(rest / t, dim=-1) for t in temperatures]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("k", [1, 7, 100])
def test_topk_targets_match_the_oracle(dtype, k):
    z = (torch.randn(3, 5, 100, generator=torch.Generator().manual_seed(k)) * 4).to(dtype)
    temps = (1.0, 2.0, 20.0)
    out = kdfast.topk_targets(z, k, temps)
    values, tails = oracle(z, k, temps)
    assert out.indices.shape == out.logits.shape == (3, 5, k)
    assert out.indices.dtype == torch.int64 and out.tail_logsumexp.shape == (3, 5, 3)
    torch.testing.assert_close(out.logits.double(), values)
    torch.testing.assert_close(z.double().gather(-1, out.indices), values)
    for j, tail in enumerate(tails):
        torch.testing.assert_close(out.tail_logsumexp[..., j].double(), tail, rtol=1e-5, atol=1e-6)


def test_ties_are_broken_by_smaller_id():
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert kdfast.topk_targets(z, 2).indices.tolist() == [[1, 2]]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(2, 4), 0), "k: expected"),
        ((torch.zeros(2, 4), 5), "k: expected"),
        ((torch.zeros(2, 4, dtype=torch.long), 1), "teacher_logits: expected a floating"),
        ((torch.tensor([[0.0, math.nan]]), 1), "teacher_logits: NaN"),
        ((torch.zeros(2, 4), 1, (1.0, 0.0)), "temperatures: expected"),
        ((torch.zeros(2, 4), 1, ()), "temperatures: expected"),
    ],
)
def test_bad_arguments_are_named(args, match):
    with pytest.raises((TypeError, ValueError), match=match):
        kdfast.topk_targets(*args)
