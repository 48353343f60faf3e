"""Damaged and hostile cache directories: every one gives a CacheError that names the file,
never silent wrong data, a crash, or code execution (no pickle anywhere: numpy with
allow_pickle=False, JSON manifests of bounded size). Ends with a hypothesis fuzz of the reader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from kdfast.cache import SoftTargetCache, build_cache, verify_cache
from kdfast.cache.format import MANIFEST, CacheCorruptError, CacheError

N, D, C = 200, 8, 5


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1))
    out = tmp_path_factory.mktemp("built") / "cache"
    build_cache(teacher, x, out, batch_size=32, rows_per_shard=64, progress=False)
    return out


@pytest.fixture
def cache_dir(built, tmp_path) -> Path:
    copy = tmp_path / "cache"
    shutil.copytree(built, copy)
    return copy


def _read_all(path: Path, verify_on_open: bool) -> torch.Tensor:
    cache = SoftTargetCache(path, verify_on_open=verify_on_open)
    return torch.cat([cache[i:i + 64] for i in range(0, len(cache), 64)])


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("logits-*.npy"))


@pytest.mark.parametrize("verify_on_open", [True, False])
def test_truncated_shard(cache_dir, verify_on_open):
    shard = _shards(cache_dir)[1]
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(CacheCorruptError, match=shard.name):
        _read_all(cache_dir, verify_on_open)
    with pytest.raises(CacheCorruptError, match=shard.name):
        verify_cache(cache_dir)


def test_manifest_of_another_format_version(cache_dir):
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    manifest["format_version"] = 3
    (cache_dir / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="format_version 3"):
        SoftTargetCache(cache_dir)


class _Exploit:
    """Unpickling this would create a file: the reader must never get that far."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_shard_is_refused_without_running_it(cache_dir, tmp_path):
    marker = tmp_path / "pwned"
    shard = _shards(cache_dir)[0]
    payload = np.empty(64 * C, dtype=object)
    payload[:] = [_Exploit(str(marker))] * payload.size
    with open(shard, "wb") as f:
        np.save(f, payload.reshape(64, C), allow_pickle=True)
    for verify_on_open in (True, False):
        with pytest.raises(CacheCorruptError, match=shard.name):
            _read_all(cache_dir, verify_on_open)
    assert not marker.exists()


def test_huge_manifest_is_refused_before_parsing(cache_dir):
    with open(cache_dir / MANIFEST, "w") as f:
        f.write('{"pad": "' + "x" * (65 << 20) + '"}')
    with pytest.raises(CacheError, match="too large"):
        SoftTargetCache(cache_dir)


def test_deeply_nested_manifest_is_a_cache_error(cache_dir):
    (cache_dir / MANIFEST).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CacheError, match="nests too deeply"):
        SoftTargetCache(cache_dir)


def test_shard_header_that_is_not_a_literal(cache_dir):
    shard = _shards(cache_dir)[2]
    raw = bytearray(shard.read_bytes())
    start = raw.index(b"{")
    raw[start:start + 8] = b"{'descr'"[::-1]  # a header numpy cannot parse
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheCorruptError, match=shard.name):
        _read_all(cache_dir, verify_on_open=False)


# ------------------------------------------------------------------------------ fuzzing
FIELDS = ["num_rows", "num_classes", "dtype", "shards", "ensemble", "format", "format_version",
          "rows_per_shard", "teacher_fingerprint", "dataset_fingerprint"]
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                   st.text(max_size=8), st.lists(st.integers(-5, 300), max_size=3),
                   st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@st.composite
def damage(draw):
    """One or more random edits of a cache: manifest fields, shard entries, shard bytes."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["field", "shard_entry", "flip", "truncate", "append", "garbage"]))
        if what == "field":
            edits.append((what, draw(st.sampled_from(FIELDS)), draw(VALUES)))
        elif what == "shard_entry":
            edits.append((what, draw(st.integers(0, 3)), draw(st.sampled_from(["start", "stop", "file",
                                                                              "sha256"])), draw(VALUES)))
        else:
            edits.append((what, draw(st.integers(0, 3)), draw(st.integers(0, 10_000))))
    return edits


def _apply(cache_dir: Path, edits) -> None:
    manifest_path = cache_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    shards = _shards(cache_dir)
    for edit in edits:
        if edit[0] == "field":
            manifest[edit[1]] = edit[2]
        elif edit[0] == "shard_entry":
            if isinstance(manifest.get("shards"), list) and edit[1] < len(manifest["shards"]):
                entry = manifest["shards"][edit[1]]
                if isinstance(entry, dict):
                    entry[edit[2]] = edit[3]
        else:
            path = shards[edit[1]]
            raw = bytearray(path.read_bytes())
            pos = edit[2] % max(len(raw), 1)
            if edit[0] == "flip" and raw:
                raw[pos] ^= 0xFF
            elif edit[0] == "truncate":
                raw = raw[:pos]
            elif edit[0] == "append":
                raw += b"\0" * (pos % 97 + 1)
            else:
                raw[:pos % 256] = bytes((pos * 31 + i) % 256 for i in range(pos % 256))
            path.write_bytes(bytes(raw))
    manifest_path.write_text(json.dumps(manifest, allow_nan=True))


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=damage(), verify_on_open=st.booleans())
def test_fuzz_reader_only_raises_cache_errors(built, tmp_path_factory, edits, verify_on_open):
    cache_dir = tmp_path_factory.mktemp("fuzz") / "cache"
    shutil.copytree(built, cache_dir)
    reference = _read_all(built, True)
    _apply(cache_dir, edits)
    try:
        rows = _read_all(cache_dir, verify_on_open)
    except CacheError:
        return  # named and refused
    # Accepted: either nothing that matters changed, or (verify_on_open=False, a flipped
    # payload byte) exactly what verify() exists to catch.
    if not torch.equal(rows.view(torch.int16), reference.view(torch.int16)):
        assert not verify_on_open
        with pytest.raises(CacheCorruptError):
            verify_cache(cache_dir)
