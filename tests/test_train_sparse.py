"""kdfast.train.fit from sparse caches: SparseKDLoss against top-k and sampled rows."""

from __future__ import annotations

import math

import pytest
import torch

import kdfast
from kdfast.cache import CacheMismatchError, SoftTargetCache, build_cache
from kdfast.train import CachedTeacher, TrainConfig, fit
from tests.test_cache_sparse import TinyCausalLM, sequences
from tests.test_train import C, first_step_loss, student_for, teacher_for, toy  # noqa: F401 (fixture)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_topk_with_every_class_trains_exactly_like_the_dense_cache(tmp_path, toy):  # noqa: F811
    teacher = teacher_for()
    build_cache(teacher, toy, tmp_path / "dense", dtype="float32", batch_size=64, progress=False)
    build_cache(teacher, toy, tmp_path / "topk", dtype="float32", batch_size=64, progress=False,
                targets="topk", k=C, temperatures=(3.0,))
    dense = first_step_loss(tmp_path / "dense", toy, kdfast.KDLoss(temperature=3.0, alpha=0.7))
    for tail in ("bucket", "renormalize"):
        sparse = first_step_loss(tmp_path / "topk", toy, kdfast.SparseKDLoss(tail=tail, temperature=3.0,
                                                                             alpha=0.7))
        assert sparse == pytest.approx(dense, rel=1e-5)


def test_topk_bucket_first_step_is_the_sparse_loss_of_the_cached_rows(tmp_path, toy):  # noqa: F811
    teacher = teacher_for()
    build_cache(teacher, toy, tmp_path / "c", batch_size=64, progress=False, targets="topk", k=2,
                temperatures=(1.0, 2.0))
    loss = kdfast.SparseKDLoss(tail="bucket", temperature=2.0, alpha=0.5)
    # One batch of every row: the first step's loss does not depend on the shuffled order.
    cfg = TrainConfig(epochs=1, batch_size=len(toy), max_batches=1, seed=7)
    got = fit(student_for(), toy, teacher=tmp_path / "c", loss=loss, config=cfg, progress=False)
    x, y = toy.tensors
    served = SoftTargetCache(tmp_path / "c").sparse_targets(slice(None), 2.0, "bucket")
    with torch.no_grad():
        expected = kdfast.reference.sparse_distillation_loss(
            student_for()(x).double(), kdfast.SparseTargets(served.indices, served.logits.double(),
                                                             served.tail_logsumexp.double()),
            y, tail="bucket", temperature=2.0, alpha=0.5)
    assert got.final["train_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_sampled_cache_default_loss_and_training(tmp_path, toy):  # noqa: F811
    build_cache(teacher_for(), toy, tmp_path / "c", batch_size=64, progress=False, targets="sampled",
                samples=32, temperature=2.0)
    source = CachedTeacher(tmp_path / "c")
    loss = source.default_loss()
    assert loss.temperature == 2.0 and loss.teacher_temperature == 1.0 and loss.tail == "renormalize"
    cfg = TrainConfig(epochs=3, batch_size=32, seed=7, lr=0.05)
    history = fit(student_for(), toy, teacher=source, config=cfg, progress=False).history
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_sparse_loss_and_cache_mismatches_are_refused(tmp_path, toy):  # noqa: F811
    teacher = teacher_for()
    build_cache(teacher, toy, tmp_path / "dense", batch_size=64, progress=False)
    build_cache(teacher, toy, tmp_path / "topk", batch_size=64, progress=False, targets="topk", k=3,
                temperatures=(1.0, 4.0))
    build_cache(teacher, toy, tmp_path / "sampled", batch_size=64, progress=False, targets="sampled",
                samples=8, temperature=2.0)
    run = lambda cache, loss: first_step_loss(cache, toy, loss)  # noqa: E731
    with pytest.raises(TypeError, match="train with a kdfast.SparseKDLoss"):
        run(tmp_path / "topk", kdfast.KDLoss())
    with pytest.raises(TypeError, match="train with a kdfast.KDLoss"):
        run(tmp_path / "dense", kdfast.SparseKDLoss())
    with pytest.raises(TypeError, match="needs a sparse cache"):
        run(teacher, kdfast.SparseKDLoss())
    with pytest.raises(CacheMismatchError, match=r"declared temperatures \[1.0, 4.0\]"):
        run(tmp_path / "topk", kdfast.SparseKDLoss(tail="bucket", temperature=2.0))
    # teacher_temperature selects the tail: T = 2 with T_t = 4 is served.
    assert math.isfinite(run(tmp_path / "topk", kdfast.SparseKDLoss(tail="bucket", temperature=2.0,
                                                                    teacher_temperature=4.0)))
    with pytest.raises(CacheMismatchError, match="only at the student temperature T = T_s"):
        run(tmp_path / "sampled", kdfast.SparseKDLoss(temperature=1.0, teacher_temperature=1.0))
    with pytest.raises(ValueError, match="teacher_temperature=1.0"):
        run(tmp_path / "sampled", kdfast.SparseKDLoss(temperature=2.0))


def test_token_level_cache_is_not_a_classification_teacher(tmp_path):
    torch.manual_seed(0)
    build_cache(TinyCausalLM(), sequences(), tmp_path / "c", targets="topk", k=3, batch_size=4,
                progress=False)
    with pytest.raises(ValueError, match="token-level"):
        CachedTeacher(tmp_path / "c")
