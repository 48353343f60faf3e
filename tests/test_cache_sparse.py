"""Sparse soft-target caches: top-k, sampled and top-k + sampled rows, per item or per token.

Oracles start from the teacher's own float32 logits (computed here, independently of the
cache) and use float64 sorts, softmaxes and log-sum-exps.
"""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import kdfast
from kdfast.cache import CacheError, CacheMismatchError, SoftTargetCache, build_cache, open_cache
from kdfast.cache.format import MANIFEST
from kdfast.cache.sparse import draw_ids, splitmix64, uniforms
from tests.test_cache import dir_bytes

N, D, C = 120, 8, 40


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_teacher(classes: int = C, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, classes))


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(1)) * 3


def teacher_logits(teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
    teacher.eval()
    with torch.no_grad():
        return teacher(x).float()


def oracle_topk(z: torch.Tensor, k: int, temperature: float):
    """float64 top-k ids/logits and the tail log-sum-exp at ``temperature``."""
    z = z.double()
    ids = torch.sort(z, dim=-1, descending=True, stable=True).indices[..., :k]
    rest = z.scatter(-1, ids, -math.inf)
    return ids, z.gather(-1, ids), torch.logsumexp(rest / temperature, dim=-1)


def build(teacher, data, path, **kwargs):
    kwargs = {"batch_size": 16, "rows_per_shard": 48, "progress": False, **kwargs}
    return build_cache(teacher, data, path, **kwargs)


# --------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_topk_rows_match_the_teachers_float32_logits(tmp_path, data, dtype):
    teacher = make_teacher()
    build(teacher, data, tmp_path / "c", targets="topk", k=6, temperatures=(1.0, 4.0), dtype=dtype)
    cache = SoftTargetCache(tmp_path / "c")
    rows = torch.tensor([0, 5, 47, 48, 119, 3])
    z = teacher_logits(teacher, data[rows])
    ids, logits, tail4 = oracle_topk(z, 6, 4.0)
    served = cache.sparse_targets(rows, 4.0, tail="bucket")
    assert served.indices.dtype == torch.int64 and torch.equal(served.indices, ids)
    stored = logits.float().to(getattr(torch, dtype)).float()  # the one rounding: storage
    assert torch.equal(served.logits, stored)
    torch.testing.assert_close(served.tail_logsumexp.double(), tail4, rtol=1e-6, atol=1e-6)
    _, _, tail1 = oracle_topk(z, 6, 1.0)
    torch.testing.assert_close(cache.sparse_targets(rows, 1.0, "bucket").tail_logsumexp.double(), tail1,
                               rtol=1e-6, atol=1e-6)
    one = cache.sparse_targets(47, 4.0, tail="bucket")
    assert one.indices.shape == (6,) and one.tail_logsumexp.shape == ()


def test_bucket_only_at_declared_temperatures_renormalize_at_any(tmp_path, data):
    build(make_teacher(), data, tmp_path / "c", targets="topk", k=4, temperatures=(1.0, 4.0))
    cache = SoftTargetCache(tmp_path / "c")
    with pytest.raises(CacheMismatchError, match=r"declared temperatures \[1.0, 4.0\]"):
        cache.sparse_targets([0, 1], 2.0, tail="bucket")
    served = cache.sparse_targets([0, 1], 2.0)  # renormalize
    assert served.tail_logsumexp is None and served.indices.shape == (2, 4)
    assert cache.teacher_temperature is None


def test_topk_with_all_classes_gives_the_dense_loss(tmp_path, data):
    teacher = make_teacher(classes=9)
    build(teacher, data, tmp_path / "c", targets="topk", k=9, temperatures=(2.0,), dtype="float32")
    served = SoftTargetCache(tmp_path / "c").sparse_targets(slice(0, 32), 2.0, tail="bucket")
    assert torch.isneginf(served.tail_logsumexp).all()
    student = torch.randn(32, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z = teacher_logits(teacher, data[:32]).double()
    dense = kdfast.reference.distillation_loss(student, z, temperature=2.0)
    for tail in ("bucket", "renormalize"):
        sparse = kdfast.sparse_distillation_loss(
            student, kdfast.SparseTargets(served.indices, served.logits.double(),
                                          served.tail_logsumexp.double()), tail=tail, temperature=2.0)
        torch.testing.assert_close(sparse, dense)


@pytest.mark.parametrize(("classes", "id_bytes"), [(65_536, 2), (65_537, 4)])
def test_id_width_and_bytes_per_row_bound(tmp_path, classes, id_bytes):
    x = torch.randn(4, D)
    k, temps = 64, (1.0, 4.0)
    build(make_teacher(classes), x, tmp_path / "c", targets="topk", k=k, temperatures=temps, batch_size=4,
          rows_per_shard=4)
    cache = SoftTargetCache(tmp_path / "c")
    with open(tmp_path / "c" / cache.manifest["shards"][0]["file"], "rb") as f:
        records = np.load(f)  # plain numpy reads a shard
    assert records["ids"].dtype.itemsize == id_bytes
    bound = (4 if id_bytes == 2 else 6) * k + 4 * len(temps)  # issue 12 (+ 8 for token offsets)
    assert cache.bytes_per_row == (id_bytes + 2) * k + 4 * len(temps) <= bound
    served = cache.sparse_targets([0, 3])
    assert served.indices.dtype == torch.int64 and int(served.indices.max()) < classes


def test_dense_caches_keep_format_version_1(tmp_path, data):
    build(make_teacher(), data, tmp_path / "d")
    build(make_teacher(), data, tmp_path / "s", targets="topk", k=3)
    dense = json.loads((tmp_path / "d" / MANIFEST).read_text())
    assert dense["format_version"] == 1 and "targets" not in dense and "rows" not in dense
    sparse = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert sparse["format_version"] == 2 and sparse["targets"]["kind"] == "topk"
    with pytest.raises(CacheMismatchError, match="sparse_targets"):
        SoftTargetCache(tmp_path / "s")[0]
    with pytest.raises(CacheMismatchError, match="dense logits"):
        SoftTargetCache(tmp_path / "d").sparse_targets([0])
    assert SoftTargetCache(tmp_path / "d").targets == "dense"
    # A sparse manifest relabelled as version 1 is refused, not read as dense.
    sparse["format_version"] = 1
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(sparse))
    with pytest.raises(CacheError, match="format_version 1 .dense. manifest has sparse fields"):
        SoftTargetCache(tmp_path / "s")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"targets": "topk"}, "k: targets='topk' needs an int"),
    ({"targets": "topk", "k": C + 1}, r"k: targets='topk' needs an int in \[1, C = 40\]"),
    ({"targets": "topk", "k": 2, "samples": 3}, "samples: targets='topk' needs samples unset"),
    ({"targets": "topk", "k": 2, "temperature": 2.0}, "temperatures=\\(T_t"),
    ({"targets": "sampled"}, "samples: targets='sampled' needs an int"),
    ({"targets": "sampled", "samples": 70_000}, "samples"),
    ({"targets": "sampled", "samples": 5, "k": 2}, "k: targets='sampled' needs k unset"),
    ({"targets": "sampled", "samples": 5, "temperatures": (1.0, 2.0)}, "one temperature"),
    ({"targets": "topk+sampled", "k": C, "samples": 5}, "k must be < C"),
    ({"targets": "topk", "k": 2, "temperatures": (0.0,)}, "temperatures must be finite"),
    ({"targets": "topk", "k": 2, "temperatures": (1.0, 1.0)}, "distinct"),
    ({"targets": "sparse"}, "targets must be one of"),
    ({"k": 3}, "need.*targets='topk'|are arguments of sparse targets"),
    ({"targets": "sampled", "samples": 3, "seed": -1}, "seed"),
])
def test_sparse_argument_errors(tmp_path, data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(make_teacher(), data, tmp_path / "c", **kwargs)
    assert not (tmp_path / "c" / MANIFEST).exists()


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("targets", [{"targets": "topk", "k": 3, "temperatures": (1.0, 2.0)},
                                     {"targets": "topk+sampled", "k": 2, "samples": 9, "temperature": 2.0}])
def test_interrupted_build_resumes_to_identical_bytes(tmp_path, data, targets):
    teacher = make_teacher()
    full = build(teacher, data, tmp_path / "full", **targets)
    calls = {"n": 0}

    def stop_after_4_batches(*_):
        calls["n"] += 1
        if calls["n"] > 1 + 4:  # the probe row + 4 batches = 1 shard of 48 rows and 1 batch
            raise _Interrupt

    handle = teacher.register_forward_hook(stop_after_4_batches)
    with pytest.raises(_Interrupt):
        build(teacher, data, tmp_path / "resumed", **targets)
    handle.remove()
    assert not (tmp_path / "resumed" / MANIFEST).exists()
    resumed = build(teacher, data, tmp_path / "resumed", **targets)
    assert resumed.rows_reused == 48 and resumed.rows_computed == N - 48
    assert dir_bytes(tmp_path / "resumed") == dir_bytes(tmp_path / "full")
    assert resumed.manifest == full.manifest
    other = {**targets, "seed": 1} if "samples" in targets else {**targets, "k": 4}
    with pytest.raises(CacheMismatchError, match="seed|targets"):
        build(teacher, data, tmp_path / "resumed", **other)


# ------------------------------------------------------------------------------ ensembles
def test_ensemble_topk_of_mean_logits_and_other_modes_raise(tmp_path, data):
    members = [make_teacher(seed=s) for s in (0, 1)]
    build(members, data, tmp_path / "c", targets="topk", k=5, temperatures=(2.0,))
    mean = torch.stack([teacher_logits(t, data) for t in members]).mean(0)
    ids, _, tail = oracle_topk(mean, 5, 2.0)
    served = SoftTargetCache(tmp_path / "c").sparse_targets(slice(None), 2.0, "bucket")
    assert torch.equal(served.indices, ids)
    torch.testing.assert_close(served.tail_logsumexp.double(), tail, rtol=1e-6, atol=1e-6)
    for mode in ("members", "mean_probs"):
        with pytest.raises(ValueError, match=f"ensemble='{mode}' cannot be combined"):
            build(members, data, tmp_path / mode, targets="topk", k=5, ensemble=mode)


def test_callable_teacher_needs_a_fingerprint(tmp_path, data):
    module = make_teacher()
    module.eval()

    def teacher(x):  # e.g. a served model behind a function
        return module(x)

    with pytest.raises(ValueError, match="teacher_fingerprint is required"):
        build(teacher, data, tmp_path / "c", targets="topk", k=3)
    result = build(teacher, data, tmp_path / "c", targets="topk", k=3, teacher_fingerprint="my-teacher-v1")
    assert result.manifest["teacher_fingerprint"] == "my-teacher-v1"
    cache = SoftTargetCache(tmp_path / "c")
    cache.check_compatible(teacher="my-teacher-v1")
    ids, _, _ = oracle_topk(teacher_logits(module, data), 3, 1.0)
    assert torch.equal(cache.sparse_targets(slice(None)).indices, ids)


# ------------------------------------------------------------------------------- sampled
def _splitmix64_python(x: int) -> int:
    mask = (1 << 64) - 1
    z = (x + 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_splitmix64_matches_the_reference_on_uint64():
    values = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 0x0123456789ABCDEF, 12345]
    signed = torch.tensor([v - 2**64 if v >= 2**63 else v for v in values], dtype=torch.int64)
    got = [int(v) % 2**64 for v in splitmix64(signed)]
    assert got == [_splitmix64_python(v) for v in values]
    u = uniforms(7, torch.tensor([[3, 0], [3, 1]]), 4)
    mask = (1 << 64) - 1

    def expected(row: int, pos: int, draw: int) -> float:
        h = _splitmix64_python(7)
        for part in (row, pos, draw):
            h = _splitmix64_python((h + part) & mask)
        return (h >> 11) * 2.0 ** -53

    assert u.tolist() == [[expected(3, p, d) for d in range(4)] for p in (0, 1)]


def test_draws_never_land_on_a_class_without_mass():
    inf = math.inf
    log_w = torch.tensor([[-inf, 0.0, -inf, 0.0, -inf], [-inf, -inf, 5.0, -inf, -inf], [-inf] * 5])
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1 - 2.0 ** -53], dtype=torch.float64).expand(3, 5)
    ids = draw_ids(log_w, u)
    assert ids[0].tolist() == [1, 1, 3, 3, 3] and ids[1].tolist() == [2] * 5
    assert ((ids[2] >= 0) & (ids[2] < 5)).all()  # a row without mass: any id, never out of range


def test_sampled_rows_follow_the_teacher_and_do_not_depend_on_the_batch(tmp_path, data):
    teacher = make_teacher()
    n, t_s = 4000, 2.0
    build(teacher, data[:8], tmp_path / "a", targets="sampled", samples=n, temperature=t_s, batch_size=8,
          rows_per_shard=8)
    build(teacher, data[:8], tmp_path / "b", targets="sampled", samples=n, temperature=t_s, batch_size=3,
          rows_per_shard=6)
    a, b = SoftTargetCache(tmp_path / "a"), SoftTargetCache(tmp_path / "b")
    served = a.sparse_targets(slice(None), t_s)
    assert torch.equal(served.indices, b.sparse_targets(slice(None), t_s).indices)
    assert torch.equal(served.logits, b.sparse_targets(slice(None), t_s).logits)
    assert served.tail_logsumexp is None and a.teacher_temperature == 1.0
    valid = served.indices >= 0
    counts = torch.where(valid, served.logits.double().exp().round(), 0.0)  # log(count), float32
    assert (counts.sum(-1) == n).all()  # every draw counted once
    p = torch.softmax(teacher_logits(teacher, data[:8]).double() / t_s, -1)
    freq = torch.zeros_like(p).scatter_add_(1, served.indices.clamp(min=0), counts) / n
    # 4000 draws: a class's frequency is within 5 standard errors of its probability.
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-3).all()


def test_sampled_refuses_another_student_temperature(tmp_path, data):
    build(make_teacher(), data, tmp_path / "c", targets="sampled", samples=8, temperature=2.0)
    cache = SoftTargetCache(tmp_path / "c")
    with pytest.raises(CacheMismatchError, match="unbiased estimate of the full-KL gradient only at"):
        cache.sparse_targets([0], 1.0)
    with pytest.raises(CacheMismatchError, match="renormalize"):
        cache.sparse_targets([0], 2.0, tail="bucket")
    with pytest.raises(CacheMismatchError, match="sampled at T_s=2.0"):
        open_cache(tmp_path / "c", temperature=3.0)
    open_cache(tmp_path / "c", temperature=2.0)


def test_topk_plus_sampled_serves_log_probabilities(tmp_path, data):
    teacher = make_teacher()
    k, n, t_s = 4, 64, 1.5
    build(teacher, data, tmp_path / "c", targets="topk+sampled", k=k, samples=n, temperature=t_s,
          dtype="float32")
    cache = SoftTargetCache(tmp_path / "c")
    served = cache.sparse_targets(slice(0, 20), t_s)
    valid = served.indices >= 0
    total = torch.where(valid, served.logits.double().exp(), 0.0).sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total))  # head p + P_R = 1
    log_p = torch.log_softmax(teacher_logits(teacher, data[:20]).double() / t_s, -1)
    ids, _, _ = oracle_topk(log_p, k, 1.0)
    assert torch.equal(served.indices[:, :k], ids)
    torch.testing.assert_close(served.logits[:, :k].double(), log_p.gather(1, ids), rtol=0, atol=1e-5)
    tail_ids = served.indices[:, k:]
    assert not (tail_ids[..., None] == ids[:, None, :]).any()  # samples come from the tail only
    log_tail_mass = torch.logsumexp(log_p.scatter(1, ids, -math.inf), -1, keepdim=True)
    log_counts = served.logits[:, k:].double() - log_tail_mass + math.log(n)
    counts = torch.where(tail_ids >= 0, log_counts.exp(), 0.0)
    torch.testing.assert_close(counts.sum(-1), torch.full((20,), n, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(counts, counts.round(), rtol=0, atol=1e-3)
    with pytest.raises(CacheMismatchError, match="T_s=1.5"):
        cache.sparse_targets([0], 1.0)


# ---------------------------------------------------------------------------- token level
class TinyCausalLM(nn.Module):
    """Causal by construction: position t sees a running mean of embeddings 0..t."""

    def __init__(self, vocab: int = 50, width: int = 16, return_object: bool = False) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)
        self.return_object = return_object

    def forward(self, ids: torch.Tensor):
        h = self.embed(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1)[:, None]
        logits = self.head(torch.tanh(h)) * 3
        if self.return_object:
            return type("CausalLMOutput", (), {"logits": logits})()
        return logits


def sequences(count: int = 11, vocab: int = 50) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 13, (count,), generator=g)
    return [torch.randint(0, vocab, (int(n),), generator=g) for n in lengths]


@pytest.mark.parametrize("return_object", [False, True])
def test_token_rows_are_the_teachers_next_token_distributions(tmp_path, return_object):
    torch.manual_seed(0)
    lm, seqs = TinyCausalLM(return_object=return_object), sequences()
    result = build(lm, seqs, tmp_path / "c", targets="topk", k=5, temperatures=(1.0, 2.0), batch_size=3,
                   rows_per_shard=6)
    m = result.manifest
    assert m["rows"] == "tokens" and m["num_rows"] == len(seqs)
    assert m["num_tokens"] == sum(len(s) for s in seqs)
    assert [(s["start"], s["stop"]) for s in m["shards"]] == [(0, 6), (6, 11)]  # sequence boundaries
    per_shard = [sum(len(s) for s in seqs[a:b]) for a, b in ((0, 6), (6, 11))]
    assert [s["tokens"] for s in m["shards"]] == per_shard
    cache = SoftTargetCache(tmp_path / "c")
    pick = [7, 0, 10, 3]
    served = cache.sparse_targets(pick, 2.0, tail="bucket")
    width = max(len(seqs[i]) for i in pick)
    assert served.indices.shape == (4, width, 5) and served.tail_logsumexp.shape == (4, width)
    lm.eval()
    for row, i in enumerate(pick):
        with torch.no_grad():
            out = lm(seqs[i][None])
        z = (out if isinstance(out, torch.Tensor) else out.logits)[0]  # (L, C), the sequence alone
        ids, logits, tail = oracle_topk(z, 5, 2.0)
        length = len(seqs[i])
        assert torch.equal(served.indices[row, :length], ids)
        torch.testing.assert_close(served.logits[row, :length].double(), logits, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(served.tail_logsumexp[row, :length].double(), tail, rtol=1e-5, atol=1e-5)
        assert (served.indices[row, length:] == -1).all()  # padding: empty slots only


def test_token_targets_train_a_3d_student_and_padding_counts_nowhere(tmp_path):
    torch.manual_seed(0)
    lm, seqs = TinyCausalLM(), sequences()
    build(lm, seqs, tmp_path / "c", targets="topk", k=5, batch_size=4, rows_per_shard=8)
    cache = SoftTargetCache(tmp_path / "c")
    pick = [1, 2, 9]
    served = cache.sparse_targets(pick, 1.0)
    width = served.indices.shape[1]
    student = torch.randn(3, width, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    loss = kdfast.sparse_distillation_loss(student, served, reduction="sum")
    parts = []
    for row, i in enumerate(pick):
        one = cache.sparse_targets([i], 1.0)
        length = len(seqs[i])
        parts.append(kdfast.sparse_distillation_loss(student[row:row + 1, :length], one, reduction="sum"))
    torch.testing.assert_close(loss, torch.stack(parts).sum())


def test_token_level_sampled_is_per_token_deterministic(tmp_path):
    torch.manual_seed(0)
    lm, seqs = TinyCausalLM(), sequences()
    for name, batch in (("a", 4), ("b", 1)):
        build(lm, seqs, tmp_path / name, targets="sampled", samples=16, temperature=1.0, batch_size=batch,
              rows_per_shard=4 * batch)
    a, b = (SoftTargetCache(tmp_path / name).sparse_targets(slice(None), 1.0) for name in "ab")
    assert torch.equal(a.indices, b.indices) and torch.equal(a.logits, b.logits)


def test_dense_token_level_is_refused(tmp_path):
    with pytest.raises(ValueError, match="token-level caches store sparse targets"):
        build(TinyCausalLM(), sequences(), tmp_path / "c")


def test_sparse_reader_pickles_without_its_maps(tmp_path):
    torch.manual_seed(0)
    build(TinyCausalLM(), sequences(), tmp_path / "c", targets="topk", k=3, batch_size=4, rows_per_shard=4)
    cache = SoftTargetCache(tmp_path / "c")
    before = cache.sparse_targets([2, 9])
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._tensors == {}
    after = clone.sparse_targets([2, 9])
    assert torch.equal(before.indices, after.indices) and torch.equal(before.logits, after.logits)


def test_cache_info_of_a_token_level_cache(tmp_path, capsys):
    from kdfast.cli import main

    torch.manual_seed(0)
    seqs = sequences()
    build(TinyCausalLM(), seqs, tmp_path / "c", targets="topk", k=4, temperatures=(1.0, 2.0), batch_size=4,
          rows_per_shard=4)
    assert main(["cache", "info", str(tmp_path / "c")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["targets"] == "topk" and info["row_level"] == "tokens"
    assert info["tokens"] == sum(map(len, seqs))
    assert info["bytes_per_row"] == 4 * 4 + 4 * 2 and info["temperatures"] == [1.0, 2.0]
