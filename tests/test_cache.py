"""kdfast.cache: round trip, random access, ensembles, resume, corruption, mismatches."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast.cache import (
    CacheCorruptError,
    CachedDataset,
    CacheError,
    CacheMismatchError,
    SoftTargetCache,
    build_cache,
    combine_members,
    open_cache,
    verify_cache,
)
from kdfast.cache.format import MANIFEST, PROGRESS

N, D, C = 300, 12, 7


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster, and immune to OpenMP stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_teacher(seed: int = 0, classes: int = C) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, classes))


@pytest.fixture
def data() -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(1)) * 3


def reference_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    teacher.eval()
    with torch.no_grad():
        return teacher(x)


def build(teacher, x, path, **kw):
    kw.setdefault("batch_size", 32)
    kw.setdefault("rows_per_shard", 64)
    kw.setdefault("progress", False)
    return build_cache(teacher, x, path, **kw)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so comparisons are exact (NaN-safe, -0.0 != 0.0)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# --------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_bytes_equal_teacher_logits(tmp_path, data, dtype):
    teacher = make_teacher()
    teacher.train()  # build must switch to eval (dropout off) and restore the mode
    result = build(teacher, data, tmp_path, dtype=dtype)
    assert teacher.training
    expected = reference_logits(teacher, data).to(dtype)
    cache = open_cache(tmp_path, teacher=teacher, dataset=data, num_classes=C)
    assert cache.dtype == dtype and len(cache) == N and cache.num_classes == C
    assert torch.equal(bits(cache[:]), bits(expected))
    assert result.rows_computed == N and result.rows_reused == 0 and result.rows_per_s > 0
    # The shards are plain .npy: numpy reads them without pickle.
    first = result.manifest["shards"][0]
    raw = np.load(tmp_path / first["file"], allow_pickle=False)
    assert raw.shape == (64, C)
    assert raw.tobytes() == expected[:64].contiguous().view(torch.uint8).numpy().tobytes()


def test_manifest_layout(tmp_path, data):
    teacher = make_teacher()
    m = build(teacher, data, tmp_path).manifest
    assert m["format"] == "kdfast-soft-targets" and m["format_version"] == 1
    assert (m["num_rows"], m["num_classes"], m["dtype"]) == (N, C, "float16")
    assert m["teacher_fingerprint"].startswith("sha256:")
    assert m["dataset_fingerprint"].startswith("sha256:")
    assert m["ensemble"] == {"mode": "none", "members": 1, "temperature": None}
    assert [(s["start"], s["stop"]) for s in m["shards"]] == [(0, 64), (64, 128), (128, 192),
                                                              (192, 256), (256, 300)]
    assert m["shards"][1]["file"] == "logits-000000000064-000000000128.npy"
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([MANIFEST] + [s["file"] for s in m["shards"]])
    assert json.loads((tmp_path / MANIFEST).read_text()) == m


def test_rebuild_same_arguments_is_a_no_op(tmp_path, data):
    teacher = make_teacher()
    build(teacher, data, tmp_path)
    before = dir_bytes(tmp_path)
    again = build(teacher, data, tmp_path)
    assert again.rows_computed == 0 and dir_bytes(tmp_path) == before


def test_default_shard_size_is_a_multiple_of_the_batch(tmp_path, data):
    # 300 rows in 6 batches: one batch per shard, so up to 6 processes share the build.
    m = build_cache(make_teacher(), data, tmp_path / "a", batch_size=50, progress=False).manifest
    assert m["rows_per_shard"] == 50 and len(m["shards"]) == 6
    # 64 batches: 16 shards of 4 batches.
    x = torch.randn(64 * 8, D, generator=torch.Generator().manual_seed(3))
    m = build_cache(make_teacher(), x, tmp_path / "b", batch_size=8, progress=False).manifest
    assert m["rows_per_shard"] == 32 and len(m["shards"]) == 16


# ------------------------------------------------------------------------- random access
def test_indexing_forms(tmp_path, data):
    teacher = make_teacher()
    build(teacher, data, tmp_path, dtype="float32")
    ref = reference_logits(teacher, data)
    cache = SoftTargetCache(tmp_path)
    assert torch.equal(cache[5], ref[5]) and torch.equal(cache[-1], ref[-1])
    assert torch.equal(cache[10:20], ref[10:20])
    assert torch.equal(cache[60:70], ref[60:70])  # spans two shards
    assert torch.equal(cache[::7], ref[::7])
    idx = torch.tensor([299, 0, 64, 63, 5, 5, -2])
    assert torch.equal(cache[idx], ref[idx])
    assert torch.equal(cache[idx.numpy()], ref[idx]) and torch.equal(cache[idx.tolist()], ref[idx])
    assert cache[torch.tensor([], dtype=torch.long)].shape == (0, C)
    with pytest.raises(IndexError):
        cache[N]
    with pytest.raises(IndexError):
        cache[torch.tensor([0, N])]
    with pytest.raises(TypeError):
        cache[torch.tensor([0.0, 1.0])]


def test_contiguous_rows_are_zero_copy_and_writes_never_reach_the_file(tmp_path, data):
    build(make_teacher(), data, tmp_path, dtype="float32")
    cache = SoftTargetCache(tmp_path)
    view = cache[10:20]
    assert view.data_ptr() == cache[10].data_ptr()  # the same mapped pages, no copy
    assert view.data_ptr() == cache[0].data_ptr() + 10 * C * 4
    view.fill_(123.0)  # copy-on-write map: private pages only
    assert verify_cache(tmp_path) is None
    assert not torch.equal(SoftTargetCache(tmp_path)[10:20], view)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-N, N - 1), max_size=80))
def test_gather_matches_reference(tmp_path_factory, indices):
    path = tmp_path_factory.getbasetemp() / "gather-cache"
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    teacher = make_teacher()
    if not (path / MANIFEST).exists():
        build(teacher, x, path, dtype="bfloat16")
    ref = reference_logits(teacher, x).to(torch.bfloat16)
    got = SoftTargetCache(path)[indices]
    assert got.shape == (len(indices), C)
    assert torch.equal(bits(got), bits(ref[torch.tensor(indices, dtype=torch.long)]))


@pytest.mark.parametrize("workers", [0, 2])
def test_shuffled_dataloader_with_workers(tmp_path, data, workers):
    teacher = make_teacher()
    build(teacher, data, tmp_path)
    ref = reference_logits(teacher, data).half()
    labels = torch.arange(N)
    ds = CachedDataset(TensorDataset(data, labels), SoftTargetCache(tmp_path))
    loader = DataLoader(ds, batch_size=37, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    seen = []
    for x, y, t in loader:
        assert torch.equal(t, ref[y]) and torch.equal(x, data[y])
        seen.append(y)
    assert sorted(torch.cat(seen).tolist()) == list(range(N))


def test_reader_pickles_without_its_maps(tmp_path, data):
    build(make_teacher(), data, tmp_path)
    cache = SoftTargetCache(tmp_path)
    first = cache[:5].clone()
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._tensors == {} and torch.equal(clone[:5], first)


# ----------------------------------------------------------------------------- ensembles
def test_ensemble_mean_logits_serves_every_temperature(tmp_path, data):
    members = [make_teacher(s) for s in range(3)]
    m = build(members, data, tmp_path, dtype="float32").manifest
    assert m["ensemble"] == {"mode": "mean_logits", "members": 3, "temperature": None}
    expected = torch.stack([reference_logits(t, data) for t in members]).mean(0)
    cache = open_cache(tmp_path, teacher=members, temperature=1.0)
    torch.testing.assert_close(cache[:], expected, rtol=1e-6, atol=1e-6)
    for t in (0.5, 4.0, 20.0):
        cache.check_compatible(temperature=t)
    with pytest.raises(CacheMismatchError, match="teacher"):
        cache.check_compatible(teacher=members[::-1])  # member order is part of the identity


def test_ensemble_mean_probs_records_t_and_refuses_another(tmp_path, data):
    members = [make_teacher(s) for s in range(3)]
    m = build(members, data, tmp_path, dtype="float32", ensemble="mean_probs", temperature=4.0).manifest
    assert m["ensemble"] == {"mode": "mean_probs", "members": 3, "temperature": 4.0}
    cache = open_cache(tmp_path, temperature=4.0)
    mean_p = torch.stack([torch.softmax(reference_logits(t, data) / 4.0, -1) for t in members]).mean(0)
    torch.testing.assert_close(torch.softmax(cache[:] / 4.0, -1), mean_p, rtol=1e-5, atol=1e-6)
    with pytest.raises(CacheMismatchError, match=r"T=4\.0.*not T=2\.0"):
        open_cache(tmp_path, temperature=2.0)


def test_ensemble_members_stores_each_member(tmp_path, data):
    members = [make_teacher(s) for s in range(2)]
    m = build(members, data, tmp_path, dtype="float32", ensemble="members").manifest
    assert m["ensemble"]["mode"] == "members"
    cache = SoftTargetCache(tmp_path)
    rows = cache[torch.arange(10)]
    assert rows.shape == (10, 2, C)
    for j, t in enumerate(members):
        torch.testing.assert_close(rows[:, j], reference_logits(t, data)[:10], rtol=1e-6, atol=1e-6)
    mp = combine_members(rows, "mean_probs", 3.0)
    expected = torch.stack([torch.softmax(rows[:, j] / 3.0, -1) for j in range(2)]).mean(0)
    torch.testing.assert_close(torch.softmax(mp / 3.0, -1), expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ensemble": "mean_probs"}, "temperature=T"),
        ({"ensemble": "mean_logits", "temperature": 2.0}, "leave it unset"),
        ({"ensemble": "average"}, "ensemble must be one of"),
    ],
)
def test_ensemble_argument_errors(tmp_path, data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build([make_teacher(0), make_teacher(1)], data, tmp_path, **kwargs)


# -------------------------------------------------------------------------------- resume
class _Interrupt(Exception):
    pass


def _interrupt_after(teacher: nn.Module, calls: int):
    count = {"n": 0}

    def hook(*_):
        count["n"] += 1
        if count["n"] > calls:
            raise _Interrupt

    return teacher.register_forward_hook(hook)


def test_resume_after_interruption_is_identical(tmp_path, data):
    teacher = make_teacher()
    full = build(teacher, data, tmp_path / "full")
    handle = _interrupt_after(teacher, 1 + 5)  # the probe row + 5 batches (2 shards + 1 batch)
    with pytest.raises(_Interrupt):
        build(teacher, data, tmp_path / "resumed")
    handle.remove()
    assert not (tmp_path / "resumed" / MANIFEST).exists()
    progress = json.loads((tmp_path / "resumed" / PROGRESS).read_text())
    assert [s["start"] for s in progress["shards"]] == [0, 64]
    with pytest.raises(CacheError, match="resume"):
        SoftTargetCache(tmp_path / "resumed")
    resumed = build(teacher, data, tmp_path / "resumed")
    assert resumed.rows_reused == 128 and resumed.rows_computed == N - 128
    assert dir_bytes(tmp_path / "resumed") == dir_bytes(tmp_path / "full")
    assert resumed.manifest == full.manifest


def test_resume_recomputes_a_damaged_finished_shard(tmp_path, data):
    teacher = make_teacher()
    build(teacher, data, tmp_path / "full")
    handle = _interrupt_after(teacher, 1 + 5)
    with pytest.raises(_Interrupt):
        build(teacher, data, tmp_path / "resumed")
    handle.remove()
    shard = tmp_path / "resumed" / "logits-000000000000-000000000064.npy"
    shard.write_bytes(shard.read_bytes()[:-3])  # truncated on disk after it was listed
    result = build(teacher, data, tmp_path / "resumed")
    assert result.rows_reused == 64
    assert dir_bytes(tmp_path / "resumed") == dir_bytes(tmp_path / "full")


_KILLED_BUILD = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    from kdfast.cache import build_cache
    torch.set_num_threads(1)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 7))
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(1)) * 3
    teacher.register_forward_hook(lambda *a: time.sleep(0.25))  # time to kill it mid-way
    build_cache(teacher, x, sys.argv[1], batch_size=32, rows_per_shard=64, progress=False)
""")


def test_resume_after_sigkill_is_identical(tmp_path, data):
    # _one_thread: the same thread count, so the same GEMM blocking, as the killed process.
    teacher = make_teacher()
    full = build(teacher, data, tmp_path / "full")
    target = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_BUILD, str(target)])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            progress = target / PROGRESS
            try:
                if len(json.loads(progress.read_text())["shards"]) >= 2:
                    break
            except (OSError, ValueError, KeyError):
                pass  # not written yet
            assert proc.poll() is None, "the build finished before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (target / MANIFEST).exists()
    resumed = build(teacher, data, target)
    assert resumed.rows_reused >= 128
    assert dir_bytes(target) == dir_bytes(tmp_path / "full")
    assert resumed.manifest == full.manifest


# ---------------------------------------------------------------------------- corruption
def _flip_byte(path: Path, offset: int = -5) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def test_flipped_byte_is_caught_by_verify_and_by_the_reader(tmp_path, data):
    build(make_teacher(), data, tmp_path)
    bad = "logits-000000000128-000000000192.npy"
    cache = SoftTargetCache(tmp_path)
    cache[0]  # shard 0 opened (and checked) before the damage
    _flip_byte(tmp_path / bad)
    with pytest.raises(CacheCorruptError, match=bad):
        verify_cache(tmp_path)
    assert SoftTargetCache(tmp_path).verify() == [bad]
    with pytest.raises(CacheCorruptError, match=bad):
        cache[130]
    with pytest.raises(CacheCorruptError, match=bad):
        cache[torch.tensor([1, 150])]
    assert cache[:64].shape == (64, C)  # the intact shards stay readable
    # Opting out of the lazy check reads the damaged bytes: documented, and verify catches it.
    assert SoftTargetCache(tmp_path, verify_on_open=False)[130].shape == (C,)


def test_missing_shard_and_bad_header(tmp_path, data):
    build(make_teacher(), data, tmp_path)
    (tmp_path / "logits-000000000064-000000000128.npy").unlink()
    with pytest.raises(CacheCorruptError, match="000000000064"):
        verify_cache(tmp_path)


# ---------------------------------------------------------------------------- mismatches
def test_mismatched_teacher_dataset_and_classes(tmp_path, data):
    teacher = make_teacher()
    build(teacher, data, tmp_path)
    with pytest.raises(CacheMismatchError, match="teacher"):
        open_cache(tmp_path, teacher=make_teacher(seed=5))
    with pytest.raises(CacheMismatchError, match="dataset"):
        open_cache(tmp_path, dataset=data + 1)
    with pytest.raises(CacheMismatchError, match="dataset"):
        open_cache(tmp_path, dataset=data[torch.randperm(N)])  # same rows, other order
    with pytest.raises(CacheMismatchError, match="num_classes=10"):
        open_cache(tmp_path, num_classes=10)
    with pytest.raises(CacheMismatchError, match="dataset"):
        CachedDataset(TensorDataset(data[:-1]), SoftTargetCache(tmp_path))
    # Labels are not part of the identity: the labelled set and its unlabelled copy match.
    open_cache(tmp_path, teacher=teacher, dataset=TensorDataset(data, torch.zeros(N)), num_classes=C)


def test_building_over_another_cache_needs_overwrite(tmp_path, data):
    build(make_teacher(0), data, tmp_path)
    with pytest.raises(CacheMismatchError, match="teacher_fingerprint.*overwrite"):
        build(make_teacher(1), data, tmp_path)
    with pytest.raises(CacheMismatchError, match="dtype"):
        build(make_teacher(0), data, tmp_path, dtype="float32")
    other = make_teacher(1)
    result = build(other, data, tmp_path, overwrite=True)
    assert result.rows_computed == N
    open_cache(tmp_path, teacher=other)


def test_missing_and_foreign_directories(tmp_path):
    with pytest.raises(CacheError, match="not found"):
        SoftTargetCache(tmp_path / "nope")
    with pytest.raises(CacheError, match="no manifest.json"):
        SoftTargetCache(tmp_path)
    (tmp_path / MANIFEST).write_text('{"format": "something-else"}')
    with pytest.raises(CacheError, match="not a kdfast soft-target cache"):
        SoftTargetCache(tmp_path)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(CacheError, match="not valid JSON"):
        SoftTargetCache(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"batch_size": 0}, "batch_size must be a positive int"),
        ({"batch_size": 32, "rows_per_shard": 48}, "multiple of batch_size=32"),
    ],
)
def test_build_argument_errors(tmp_path, data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(make_teacher(), data, tmp_path, **kwargs)


def test_float16_overflow_is_an_error_not_inf(tmp_path, data):
    teacher = make_teacher()
    with torch.no_grad():
        teacher[-1].weight.mul_(1e5)
    with pytest.raises(ValueError, match="overflow dtype='float16'.*bfloat16"):
        build(teacher, data, tmp_path, dtype="float16")
    assert not (tmp_path / MANIFEST).exists()
    build(teacher, data, tmp_path, dtype="bfloat16", overwrite=True)


def test_empty_dataset_and_bad_teacher(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        build(make_teacher(), torch.empty(0, D), tmp_path)
    with pytest.raises(ValueError, match="nn.Module"):
        build([], torch.randn(4, D), tmp_path)
    with pytest.raises(ValueError, match=r"\(batch, classes\)"):
        build(nn.Identity(), torch.randn(4, 2, 3), tmp_path)
