"""`build_caches`: several caches from one teacher pass, each byte-identical to the cache
`build_cache` writes alone, resumable per directory, with its arguments checked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdfast.cache import CacheError, build_cache, build_caches, verify_cache
from kdfast.cache.format import MANIFEST
from tests.test_cache import _one_thread, dir_bytes  # noqa: F401  (an autouse fixture)

N, D, C, BATCH = 120, 8, 40, 16
# Every kind, with non-default temperatures and seeds (a dense output takes no arguments).
OUTPUTS = {
    "dense": {},
    "topk": {"targets": "topk", "k": 5, "temperatures": (1.0, 2.0)},
    "sampled": {"targets": "sampled", "samples": 9, "temperature": 1.5, "seed": 3},
    "both": {"targets": "topk+sampled", "k": 3, "samples": 6},
}


class CountingTeacher(nn.Module):
    """A small MLP that counts its forward calls and can fail at call ``fail_at`` (1-based),
    standing in for a build killed part-way."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, C))
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("teacher died")
        return self.net(x)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(1)) * 3


def _build(root, data, teacher, names=tuple(OUTPUTS), **kwargs):
    return build_caches(teacher, data, {root / name: OUTPUTS[name] for name in names}, batch_size=BATCH,
                        teacher_fingerprint="mlp", progress=False, **kwargs)


def test_one_pass_writes_every_cache_as_its_own_build_would(tmp_path, data):
    teacher = CountingTeacher()
    results = _build(tmp_path / "pass", data, teacher)
    batches = -(-N // BATCH)
    assert teacher.calls == 1 + batches  # a probe, then every batch once for all four caches
    layouts = {r.manifest["rows_per_shard"] for r in results.values()}
    assert len(layouts) == 1  # one shard layout
    layout = layouts.pop()
    for name, args in OUTPUTS.items():
        alone = build_cache(CountingTeacher(), data, tmp_path / "alone" / name, batch_size=BATCH,
                            rows_per_shard=layout,
                            teacher_fingerprint="mlp", progress=False, **args)
        assert dir_bytes(tmp_path / "pass" / name) == dir_bytes(alone.path), name
        result = results[tmp_path / "pass" / name]
        assert (result.rows_computed, result.rows_reused) == (N, 0)
        assert 0 < result.teacher_seconds <= result.seconds
    # The dense rows are the largest, so the shared default layout is the dense cache's own.
    alone = build_cache(CountingTeacher(), data, tmp_path / "dense-default", batch_size=BATCH,
                        teacher_fingerprint="mlp", progress=False)
    assert dir_bytes(tmp_path / "dense-default") == dir_bytes(tmp_path / "pass" / "dense")
    assert alone.manifest["rows_per_shard"] == results[tmp_path / "pass" / "dense"].manifest["rows_per_shard"]


def test_an_interrupted_pass_resumes_per_directory(tmp_path, data):
    reference = tmp_path / "reference"
    _build(reference, data, CountingTeacher(), rows_per_shard=2 * BATCH)
    root = tmp_path / "run"
    # "topk" is complete before the pass; the pass dies in its 6th batch (4 shards of 2 batches).
    build_cache(CountingTeacher(), data, root / "topk", batch_size=BATCH, rows_per_shard=2 * BATCH,
                teacher_fingerprint="mlp", progress=False, **OUTPUTS["topk"])
    with pytest.raises(RuntimeError, match="teacher died"):
        _build(root, data, CountingTeacher(fail_at=1 + 6), rows_per_shard=2 * BATCH)
    assert not (root / "sampled" / MANIFEST).exists()
    teacher = CountingTeacher()
    results = _build(root, data, teacher, rows_per_shard=2 * BATCH)
    assert teacher.calls == 1 + 4  # the probe and the two unfinished shards' batches, once
    assert results[root / "topk"].rows_computed == 0
    for name in ("dense", "sampled", "both"):
        assert (results[root / name].rows_computed, results[root / name].rows_reused) == (N - 64, 64)
    for name in OUTPUTS:
        assert dir_bytes(root / name) == dir_bytes(reference / name), name
        verify_cache(root / name)


def test_a_complete_set_runs_no_teacher_batch(tmp_path, data):
    _build(tmp_path, data, CountingTeacher())
    teacher = CountingTeacher()
    results = _build(tmp_path, data, teacher)
    assert teacher.calls == 1 and all(r.rows_computed == 0 and r.seconds == 0 for r in results.values())


@pytest.mark.parametrize("outputs, match", [
    ({}, "outputs must be a non-empty mapping"),
    ({"a": {"targets": "topk", "kk": 3}},
     r"outputs\[.*/a'\] must be a dict with keys from .* \(unknown: \['kk'\]\)"),
    ({"a": "topk"}, r"outputs\[.*/a'\] must be a dict"),
    ({"a": {"targets": "topk"}}, "k: targets='topk' needs an int"),
    ({"a": {"targets": "sampled", "samples": 4, "k": 2}}, "k: targets='sampled' needs k unset"),
    ({"a": {"targets": "ranked"}}, "targets must be one of"),
])
def test_bad_outputs_name_the_argument_and_write_nothing(tmp_path, data, outputs, match):
    outputs = {tmp_path / name: args for name, args in outputs.items()}
    with pytest.raises(ValueError, match=match):
        build_caches(CountingTeacher(), data, outputs, batch_size=BATCH, progress=False)
    assert not list(tmp_path.rglob(MANIFEST)) and not list(tmp_path.rglob("logits-*.npy"))


def test_the_same_directory_twice_is_refused(tmp_path, data):
    outputs = {tmp_path / "a": {}, str(tmp_path / "x" / ".." / "a"): {"targets": "topk", "k": 2}}
    with pytest.raises(ValueError, match="same directory"):
        build_caches(CountingTeacher(), data, outputs, batch_size=BATCH, progress=False)


def test_mean_probs_outputs_at_two_temperatures_need_two_passes(tmp_path, data):
    teachers = [CountingTeacher(), CountingTeacher()]
    outputs = {tmp_path / "t2": {"temperature": 2.0}, tmp_path / "t4": {"temperature": 4.0}}
    with pytest.raises(ValueError, match="separate teacher passes"):
        build_caches(teachers, data, outputs, ensemble="mean_probs", batch_size=BATCH,
                     teacher_fingerprint="pair", progress=False)


def test_a_directory_another_build_holds_is_refused(tmp_path, data):
    from kdfast.cache.format import BuildLock

    (tmp_path / "sampled").mkdir()
    with BuildLock(tmp_path / "sampled"), pytest.raises(CacheError, match="being written by another build"):
        _build(tmp_path, data, CountingTeacher(), names=("topk", "sampled"))
    assert not (tmp_path / "topk" / MANIFEST).exists()
