"""`kdfast::inverse_cdf_draws` (the sampled caches' draws on the CPU) gives the very ids of the
torch composition it replaces (float64 cumsum + searchsorted), on ties, masked classes, rows
without mass and uniforms at both ends; opcheck; argument errors."""

from __future__ import annotations

import math

import pytest
import torch

import kdfast
from kdfast.cache import sparse
from kdfast.cache.sparse import draw_ids, draw_ids_composite, uniforms

pytestmark = pytest.mark.skipif(not kdfast.HAS_EXTENSION, reason="needs the compiled extension")


def _rows(rows: int, classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, classes, generator=g) * 4
    z[0] = -math.inf  # no mass at all
    z[1, : classes // 2] = 30.0  # ties at the max
    z[2] = torch.randn(classes, generator=g).round()  # many ties everywhere
    z[3, 1:] = -math.inf  # one class only
    z[4, ::2] = -math.inf  # every other class masked
    z[5] = z[5] * 1e-3  # nearly flat
    return z


def _uniforms(rows: int, draws: int, seed: int) -> torch.Tensor:
    keys = torch.stack([torch.arange(rows), torch.full((rows,), seed)], 1)
    u = uniforms(seed, keys, draws)
    u[6] = 0.0
    u[7] = 1 - 2.0 ** -53  # u * total may round up to total
    u[8] = u[8, 0].item()  # every draw the same
    return u


@pytest.mark.parametrize("rows, classes, draws", [(12, 1, 5), (12, 7, 1), (40, 1000, 33), (9, 49_152, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_op_gives_the_composition_s_ids(rows, classes, draws, seed):
    z, u = _rows(rows, classes, seed), _uniforms(rows, draws, seed)
    got = draw_ids(z, u)
    assert got.dtype == torch.int64 and got.shape == (rows, draws)
    assert torch.equal(got, draw_ids_composite(z, u))
    assert ((got >= 0) & (got < classes)).all()
    # Draws land on classes with mass only (a row without any, e.g. row 0: any id in range).
    has_mass = torch.isfinite(z).any(1)
    assert torch.isfinite(z).gather(1, got)[has_mass].all()


def test_non_contiguous_inputs():
    z, u = _rows(16, 300, 3), _uniforms(16, 10, 3)
    z_t = z.t().contiguous().t()  # column-major: same values, other strides
    u_wide = torch.cat([u, u], 1)[:, ::2]
    w = torch.exp(z_t - z_t.amax(-1, keepdim=True).clamp(min=-3e38))
    assert torch.equal(torch.ops.kdfast.inverse_cdf_draws(w, u_wide), draw_ids_composite(z, u_wide))


def test_the_sampled_encoding_uses_the_op_and_keeps_its_bytes(monkeypatch):
    spec = sparse.make_spec("topk+sampled", 500, k=4, samples=20, temperatures=0.7, seed=5,
                            logit_dtype="float16")
    z = _rows(30, 500, 4)[6:]  # rows with mass: topk needs finite logits
    keys = torch.stack([torch.arange(len(z)), torch.zeros(len(z), dtype=torch.int64)], 1)
    with_op = sparse.encode_rows(spec, z, keys)
    monkeypatch.setattr(sparse, "_has_draws_op", lambda: False)
    assert with_op.tobytes() == sparse.encode_rows(spec, z, keys).tobytes()


def test_opcheck():
    z, u = _rows(10, 50, 0), _uniforms(10, 6, 0)
    w = torch.exp(z - z.amax(-1, keepdim=True).clamp(min=-3e38))
    torch.library.opcheck(torch.ops.kdfast.inverse_cdf_draws.default, (w, u))


@pytest.mark.parametrize("weights, u, match", [
    (torch.ones(3, 4, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64), "weights: expected a"),
    (torch.ones(4), torch.zeros(3, 2, dtype=torch.float64), "weights: expected a"),
    (torch.ones(3, 4), torch.zeros(3, 2), "uniforms: expected a"),
    (torch.ones(3, 4), torch.zeros(2, 2, dtype=torch.float64), r"uniforms: expected a \(R, n\) float64 "
     "tensor with R = 3"),
    (torch.ones(3, 0), torch.zeros(3, 2, dtype=torch.float64), "weights: expected C >= 1"),
])
def test_bad_arguments_are_named(weights, u, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.kdfast.inverse_cdf_draws(weights, u)
