"""The CPU gradient-buffer pool (csrc/cpu/buffer_pool.cpp): a training step's freed .grad is
reused by the next forward of the same shape, with identical results and bounded memory."""

from __future__ import annotations

import pytest
import torch

import kdfast
from tests.conftest import gen

N, C = 256, 4099  # 4.2 MB of float32: above the pool's 4 MiB floor


def _step(s, t, y):
    leaf = s.detach().clone().requires_grad_()
    kdfast.distillation_loss(leaf, t, y, temperature=2.0).backward()
    return leaf.grad


def _inputs(seed=500):
    return (torch.randn(N, C, generator=gen(seed)), torch.randn(N, C, generator=gen(seed + 1)),
            torch.randint(0, C, (N,), generator=gen(seed + 2)))


def test_freed_gradient_is_reused_by_the_next_step(monkeypatch):
    monkeypatch.delenv("KDFAST_CPU_BUFFER_POOL", raising=False)
    s, t, y = _inputs()
    kdfast.release_buffers()
    grad = _step(s, t, y)
    address = grad.data_ptr()
    del grad  # what optimizer.zero_grad() does to .grad
    assert kdfast.buffer_pool_stats()["cached_blocks"] == 1
    before = kdfast.buffer_pool_stats()["hits"]
    grad = _step(s, t, y)
    assert grad.data_ptr() == address
    assert kdfast.buffer_pool_stats()["hits"] == before + 1
    assert kdfast.buffer_pool_stats()["cached_blocks"] == 0  # in use again


def test_results_identical_with_and_without_the_pool(monkeypatch):
    s, t, y = _inputs(510)
    monkeypatch.setenv("KDFAST_CPU_BUFFER_POOL", "0")
    off = [_step(s, t, y) for _ in range(2)]
    monkeypatch.setenv("KDFAST_CPU_BUFFER_POOL", "1")
    on = [_step(s, t, y) for _ in range(2)]
    for a, b in zip(off, on, strict=True):
        assert torch.equal(a, b)


def test_a_reused_buffer_never_aliases_a_live_gradient(monkeypatch):
    monkeypatch.delenv("KDFAST_CPU_BUFFER_POOL", raising=False)
    s, t, y = _inputs(520)
    first = _step(s, t, y)
    kept = first.clone()
    second = _step(s * 2, t, y)  # first is still alive: a fresh block
    assert second.data_ptr() != first.data_ptr()
    assert torch.equal(first, kept)


def test_pool_is_bounded_and_releasable(monkeypatch):
    monkeypatch.delenv("KDFAST_CPU_BUFFER_POOL", raising=False)
    kdfast.release_buffers()
    for cols in (4099, 5003, 6007, 7001):
        s = torch.randn(N, cols, generator=gen(cols))
        _step(s, torch.randn(N, cols, generator=gen(cols + 1)), None)
    stats = kdfast.buffer_pool_stats()
    assert stats["cached_blocks"] <= 2
    assert stats["cached_bytes"] <= 2 * N * 7001 * 4 + (4 << 20)
    kdfast.release_buffers()
    assert kdfast.buffer_pool_stats()["cached_bytes"] == 0


@pytest.mark.parametrize("value", ["yes", "2", "off"])
def test_invalid_pool_setting_raises(value, monkeypatch):
    monkeypatch.setenv("KDFAST_CPU_BUFFER_POOL", value)
    s, t, y = _inputs(530)
    with pytest.raises(ValueError, match="KDFAST_CPU_BUFFER_POOL") as info:
        _step(s, t, y)
    assert value in str(info.value)
