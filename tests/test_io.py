"""kdfast._io: the atomic writes shared by the cache and the trainer."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import kdfast.cache.build
import kdfast.cache.format
import kdfast.train
from kdfast import _io
from kdfast._io import atomic_write_bytes, atomic_write_json, temp_path


class _Interrupted(Exception):
    pass


def test_atomic_write_bytes_replaces_the_whole_file(tmp_path):
    path = tmp_path / "data.bin"
    atomic_write_bytes(path, lambda f: f.write(b"first"))
    atomic_write_bytes(str(path), lambda f: f.write(b"second"))  # str paths too
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"old")

    def half_write(f):
        f.write(b"new, but only ha")
        raise _Interrupted

    with pytest.raises(_Interrupted):
        atomic_write_bytes(path, half_write)
    assert path.read_bytes() == b"old"
    assert not temp_path(path).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin"]


def test_the_temp_file_sits_beside_the_target_until_the_rename(tmp_path):
    path = tmp_path / "data.bin"
    seen = {}

    def write(f):
        f.write(b"x")
        seen["tmp_exists"] = temp_path(path).exists()
        seen["target_exists"] = path.exists()

    atomic_write_bytes(path, write)
    assert seen == {"tmp_exists": True, "target_exists": False}
    assert temp_path(path).parent == tmp_path and temp_path(path).name.startswith(".")


def test_atomic_write_json_is_deterministic_and_fails_before_touching_the_file(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    first = path.read_bytes()
    atomic_write_json(path, {"a": [1, 2], "b": 1})
    assert path.read_bytes() == first and json.loads(first) == {"a": [1, 2], "b": 1}
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})  # not JSON: the old file stays
    assert path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_the_helpers_moved_out_of_the_cache_format_module():
    source = inspect.getsource(kdfast.cache.format)
    assert "def atomic_write" not in source and "os.replace" not in source
    # Cache and trainer write through the one implementation.
    assert kdfast.cache.format.atomic_write_bytes is _io.atomic_write_bytes
    assert kdfast.cache.build.atomic_write_json is _io.atomic_write_json
    assert kdfast.train.atomic_write_bytes is _io.atomic_write_bytes
    assert kdfast.train.atomic_write_json is _io.atomic_write_json


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    kdfast.train.save_checkpoint(path, {"format": "kdfast-checkpoint", "w": torch.ones(3)})
    before = path.read_bytes()

    def dying_save(obj, f):
        f.write(b"PK partial zip")
        raise _Interrupted

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(_Interrupted):
        kdfast.train.save_checkpoint(path, {"format": "kdfast-checkpoint", "w": torch.zeros(3)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_shards_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / kdfast.cache.format.shard_name(0, 4)
    kdfast.cache.format.save_shard(path, torch.ones(4, 3))
    before = path.read_bytes()

    def dying_save(f, array, allow_pickle):
        f.write(b"\x93NUMPY partial")
        raise _Interrupted

    monkeypatch.setattr(kdfast.cache.format.np, "save", dying_save)
    with pytest.raises(_Interrupted):
        kdfast.cache.format.save_shard(path, torch.zeros(4, 3))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
