"""Sparse teacher targets: kdfast.sparse_distillation_loss and kdfast.reference's sparse oracle
against an independent dense oracle (tests/sparse_helpers.py) in float64, k = C against
kdfast.distillation_loss, the counting rule, 3-D inputs, low-precision students, gradcheck,
and the eager baseline."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import kdfast
from kdfast import reference
from tests.sparse_helpers import oracle_loss, sparse_from_dense

TAIL_KINDS = [("renormalize", "kl"), ("bucket", "kl"), ("bucket", "reverse_kl"), ("bucket", "jsd")]
C = 37
PAD = -7  # a non-default ignore_index
sparse_loss = kdfast.sparse_distillation_loss
reference_loss = reference.sparse_distillation_loss


def _student_teacher(batch, n_cols, seed, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(*batch, n_cols, generator=g, dtype=torch.float64)).to(dtype)
    t = scale * torch.randn(*batch, n_cols, generator=g, dtype=torch.float64)
    return s.requires_grad_(), t


def _target(batch, n_cols, mode, seed):
    if mode == "none":
        return None
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_cols, batch, generator=g)
    if mode == "ignored":
        flat = y.view(-1)
        flat[torch.randperm(flat.numel(), generator=g)[: flat.numel() // 3]] = PAD
    return y


def _loss_and_grad(fn, student, *args, **kw):
    leaf = student.detach().clone().requires_grad_()
    loss = fn(leaf, *args, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


# --------------------------------------------------------------------------------------------
# float64 against the independent dense oracle
# --------------------------------------------------------------------------------------------

GRID = list(itertools.product(TAIL_KINDS, [1, 8, C], [1.0, 2.0, 20.0]))


@pytest.mark.parametrize("tail_kind,k,T", GRID, ids=[f"{tk[0]}-{tk[1]}-k{k}-T{T:g}" for tk, k, T in GRID])
def test_float64_matches_dense_oracle(tail_kind, k, T):
    tail, kind = tail_kind
    case = GRID.index((tail_kind, k, T))
    # Factors cycled over the grid so each appears with every tail/kind and k.
    batch = [(9,), (3, 4)][case % 2]
    target_mode = ["labels", "ignored", "none"][case % 3]
    t_t = [None, 0.7 * T, 1.5 * T][(case // 3) % 3]
    empty_slots = min(k - 1, [0, 2, 1][case % 3]) if k > 1 else 0
    reduction = ["mean", "sum", "none", "batchmean"][case % 4]
    student, dense = _student_teacher(batch, C, seed=case)
    teacher = sparse_from_dense(dense, k, teacher_temperature=t_t or T, seed=case, empty_slots=empty_slots,
                                pick="random" if case % 2 else "topk", empty_rows=(1,),
                                index_dtype=torch.int32 if case % 5 == 0 else torch.int64)
    target = _target(batch, C, target_mode, seed=case)
    kw = dict(tail=tail, kind=kind, temperature=T, teacher_temperature=t_t, alpha=0.3, beta=0.35,
              ignore_index=PAD, label_smoothing=0.1 * (case % 2), reduction=reduction)
    ids = teacher.indices.long()
    expected, expected_grad = _loss_and_grad(oracle_loss, student, dense, ids, target, **kw)
    for fn in (sparse_loss, reference_loss):
        loss, grad = _loss_and_grad(fn, student, teacher, target, **kw)
        assert loss.dtype == torch.float64 and loss.shape == expected.shape
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("tail_kind", [("renormalize", "kl"), ("bucket", "jsd")], ids=lambda tk: "-".join(tk))
def test_large_vocabulary_50000(tail_kind):
    tail, kind = tail_kind
    student, dense = _student_teacher((3,), 50_000, seed=50)
    teacher = sparse_from_dense(dense, 8, teacher_temperature=2.0, seed=50, empty_slots=1)
    target = torch.tensor([5, PAD, 49_999])
    kw = dict(tail=tail, kind=kind, temperature=4.0, teacher_temperature=2.0, alpha=0.6,
              ignore_index=PAD, label_smoothing=0.05)
    expected, expected_grad = _loss_and_grad(oracle_loss, student, dense, teacher.indices, target, **kw)
    loss, grad = _loss_and_grad(kdfast.sparse_distillation_loss, student, teacher, target, **kw)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-14)


# --------------------------------------------------------------------------------------------
# k = C: both tails are distillation_loss
# --------------------------------------------------------------------------------------------

FULL = [(tk, reduction, mode) for tk in TAIL_KINDS for reduction, mode in
        [("mean", "ignored"), ("none", "labels"), ("sum", "none")]]


@pytest.mark.parametrize("tail_kind,reduction,target_mode", FULL,
                         ids=[f"{tk[0]}-{tk[1]}-{r}-{m}" for tk, r, m in FULL])
def test_every_class_equals_distillation_loss(tail_kind, reduction, target_mode):
    tail, kind = tail_kind
    batch = (2, 5) if reduction == "none" else (11,)
    student, dense = _student_teacher(batch, 13, seed=7)
    teacher = sparse_from_dense(dense, 13, teacher_temperature=2.5, seed=8, pick="random")  # shuffled
    assert torch.all(teacher.tail_logsumexp == -math.inf)
    target = _target(batch, 13, target_mode, seed=9)
    kw = dict(temperature=2.5, alpha=0.4, kind=kind, beta=0.3, ignore_index=PAD, label_smoothing=0.1,
              reduction=reduction)
    expected, expected_grad = _loss_and_grad(kdfast.distillation_loss, student, dense, target, **kw)
    loss, grad = _loss_and_grad(kdfast.sparse_distillation_loss, student, teacher, target, tail=tail, **kw)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-11, atol=1e-14)


def test_bucket_is_a_lower_bound_growing_with_k():
    """The coarsened divergence never exceeds the full one (data processing) and grows as K
    grows (nested top-k sets refine the coarsening)."""
    student, dense = _student_teacher((6,), 40, seed=11)
    for kind in ("kl", "reverse_kl", "jsd"):
        full = kdfast.distillation_loss(student, dense, kind=kind, temperature=2.0, reduction="none")
        previous = torch.zeros(6, dtype=torch.float64)
        for k in (1, 2, 5, 20, 39, 40):
            teacher = sparse_from_dense(dense, k, teacher_temperature=2.0, seed=12)
            soft = sparse_loss(student, teacher, tail="bucket", kind=kind, temperature=2.0, reduction="none")
            assert torch.all(soft <= full + 1e-12) and torch.all(soft >= previous - 1e-12), (kind, k)
            previous = soft
        torch.testing.assert_close(previous, full, rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------------------------------
# Counting: empty slots, empty rows, ignored rows
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_empty_rows_without_target_count_in_neither_term(tail):
    student, dense = _student_teacher((6,), C, seed=20)
    teacher = sparse_from_dense(dense, 4, teacher_temperature=1.0, seed=20, empty_rows=(0, 3), empty_slots=1)
    kw = dict(tail=tail, temperature=2.0)
    rows, grad = _loss_and_grad(kdfast.sparse_distillation_loss, student, teacher, reduction="none", **kw)
    assert rows[0] == 0 and rows[3] == 0 and torch.all(rows[[1, 2, 4, 5]] > 0)
    assert torch.all(grad[[0, 3]] == 0) and torch.isfinite(grad).all()
    mean, mean_grad = _loss_and_grad(kdfast.sparse_distillation_loss, student, teacher, **kw)
    torch.testing.assert_close(mean, rows.sum() / 4, rtol=1e-14, atol=0)
    torch.testing.assert_close(mean_grad, grad / 4, rtol=1e-14, atol=0)
    # Every row empty: nothing counts; the mean is 0, not NaN.
    empty = kdfast.SparseTargets(torch.full_like(teacher.indices, -1), teacher.logits, teacher.tail_logsumexp)
    loss, grad = _loss_and_grad(kdfast.sparse_distillation_loss, student, empty, **kw)
    assert loss.item() == 0.0 and torch.all(grad == 0)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_empty_rows_with_a_target_count_with_soft_zero(tail):
    student, dense = _student_teacher((5,), C, seed=21)
    teacher = sparse_from_dense(dense, 4, teacher_temperature=1.0, seed=21, empty_rows=(1, 2))
    target = torch.tensor([3, 4, PAD, 0, PAD])  # row 1: empty and counted; row 2: empty and ignored
    kw = dict(tail=tail, temperature=3.0, alpha=0.25, ignore_index=PAD, label_smoothing=0.1)
    rows = kdfast.sparse_distillation_loss(student, teacher, target, reduction="none", **kw)
    hard = torch.nn.functional.cross_entropy(student[1], target[1], label_smoothing=0.1)
    torch.testing.assert_close(rows[1], 0.75 * hard, rtol=1e-14, atol=0)
    assert rows[2] == 0 and rows[4] == 0
    mean = kdfast.sparse_distillation_loss(student, teacher, target, **kw)
    torch.testing.assert_close(mean, rows.sum() / 3, rtol=1e-14, atol=0)
    # alpha = 1: an empty counted row still counts, with loss 0.
    kw["alpha"] = 1.0
    only_soft = sparse_loss(student, teacher, target, **kw, reduction="none")
    assert only_soft[1] == 0
    torch.testing.assert_close(sparse_loss(student, teacher, target, **kw), only_soft.sum() / 3, rtol=1e-14,
                               atol=0)


def test_ignored_rows_get_no_gradient_and_all_ignored_gives_zero():
    student, dense = _student_teacher((6,), C, seed=22)
    teacher = sparse_from_dense(dense, 5, teacher_temperature=1.0, seed=22)
    target = torch.tensor([PAD, 1, 2, PAD, 4, 5])
    _, grad = _loss_and_grad(kdfast.sparse_distillation_loss, student, teacher, target, ignore_index=PAD)
    assert torch.all(grad[[0, 3]] == 0) and torch.all(grad[[1, 2, 4, 5]] != 0)
    loss, grad = _loss_and_grad(kdfast.sparse_distillation_loss, student, teacher, torch.full((6,), PAD),
                                ignore_index=PAD, tail="bucket")
    assert loss.item() == 0.0 and torch.all(grad == 0)


def test_empty_slots_are_never_read():
    """Empty slots hold NaN logits in every test; here also inf and huge values."""
    student, dense = _student_teacher((7,), C, seed=23)
    teacher = sparse_from_dense(dense, 6, teacher_temperature=1.0, seed=23, empty_slots=2)
    base = kdfast.sparse_distillation_loss(student, teacher, tail="bucket", kind="jsd")
    for junk in (math.inf, -math.inf, 1e300):
        logits = torch.where(teacher.indices >= 0, teacher.logits, junk)
        other = sparse_loss(student, teacher._replace(logits=logits), tail="bucket", kind="jsd")
        assert torch.equal(other, base)


# --------------------------------------------------------------------------------------------
# Shapes and dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail_kind", TAIL_KINDS, ids=lambda tk: "-".join(tk))
def test_3d_inputs_equal_the_flattened_call(tail_kind):
    tail, kind = tail_kind
    student, dense = _student_teacher((2, 3), C, seed=30)
    teacher = sparse_from_dense(dense, 8, teacher_temperature=2.0, seed=30, empty_slots=2, empty_rows=(4,))
    target = _target((2, 3), C, "ignored", seed=30)
    kw = dict(tail=tail, kind=kind, temperature=2.0, ignore_index=PAD)
    rows = kdfast.sparse_distillation_loss(student, teacher, target, reduction="none", **kw)
    assert rows.shape == (2, 3)
    flat = kdfast.SparseTargets(teacher.indices.reshape(6, 8), teacher.logits.reshape(6, 8),
                                teacher.tail_logsumexp.reshape(6))
    flat_rows = sparse_loss(student.reshape(6, C), flat, target.reshape(6), reduction="none", **kw)
    assert torch.equal(rows.reshape(6), flat_rows)


LOW = list(itertools.product([torch.bfloat16, torch.float16], TAIL_KINDS))


@pytest.mark.parametrize("dtype,tail_kind", LOW, ids=[f"{str(d)[6:]}-{tk[0]}-{tk[1]}" for d, tk in LOW])
def test_low_precision_students_compute_in_float32(dtype, tail_kind):
    tail, kind = tail_kind
    student, dense = _student_teacher((3, 4), 300, seed=40, dtype=dtype)
    teacher = sparse_from_dense(dense, 8, teacher_temperature=3.0, seed=40, empty_slots=1)
    teacher = teacher._replace(logits=teacher.logits.to(dtype), tail_logsumexp=teacher.tail_logsumexp.float())
    target = _target((3, 4), 300, "ignored", seed=40)
    kw = dict(tail=tail, kind=kind, temperature=3.0, ignore_index=PAD, label_smoothing=0.1)
    loss, grad = _loss_and_grad(kdfast.sparse_distillation_loss, student, teacher, target, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # The reference: exactly the float32 computation on the widened values, nothing rounded
    # before the cast (the fused kernel is held to the float64 bounds below).
    widened = teacher._replace(logits=teacher.logits.float())
    same, same_grad = _loss_and_grad(reference_loss, student.float(), widened, target, **kw)
    ref, ref_grad = _loss_and_grad(reference_loss, student, teacher, target, **kw)
    assert torch.equal(ref, same) and torch.equal(ref_grad, same_grad.to(dtype))
    wide = teacher._replace(logits=teacher.logits.double(), tail_logsumexp=teacher.tail_logsumexp.double())
    exact, exact_grad = _loss_and_grad(reference_loss, student.double(), wide, target, **kw)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=1e-6)
    unit = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    torch.testing.assert_close(grad.double(), exact_grad, rtol=2 * unit, atol=1e-6)


def test_float64_teacher_promotes_a_float32_student():
    student, dense = _student_teacher((4,), C, seed=41, dtype=torch.float32)
    teacher = sparse_from_dense(dense, 5, teacher_temperature=1.0, seed=41)
    assert kdfast.sparse_distillation_loss(student, teacher, tail="bucket").dtype == torch.float64
    teacher32 = teacher._replace(logits=teacher.logits.float(), tail_logsumexp=teacher.tail_logsumexp.float())
    assert kdfast.sparse_distillation_loss(student, teacher32, tail="bucket").dtype == torch.float32


# --------------------------------------------------------------------------------------------
# gradcheck and the eager baseline
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail_kind", TAIL_KINDS, ids=lambda tk: "-".join(tk))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(tail_kind, reduction):
    tail, kind = tail_kind
    student, dense = _student_teacher((5,), 6, seed=60, scale=1.5)
    teacher = sparse_from_dense(dense, 3, teacher_temperature=1.5, seed=60, empty_slots=1, empty_rows=(2,))
    target = torch.tensor([1, 0, 5, PAD, 3])
    kw = dict(tail=tail, kind=kind, temperature=2.0, teacher_temperature=1.5, alpha=0.7, ignore_index=PAD,
              label_smoothing=0.1, reduction=reduction)
    assert torch.autograd.gradcheck(
        lambda s: kdfast.sparse_distillation_loss(s, teacher, target, **kw), (student,))
    assert torch.autograd.gradcheck(
        lambda s: kdfast.sparse_distillation_loss(s, teacher, None, **kw), (student,))


BASELINE = list(itertools.product(["renormalize", "bucket"], [1, 4, 11], [1.0, 20.0],
                                  ["none", "labels", "ignored"]))


@pytest.mark.parametrize("tail,k,T,target_mode", BASELINE,
                         ids=[f"{a}-k{b}-T{c:g}-{d}" for a, b, c, d in BASELINE])
def test_sparse_eager_baseline_matches_the_reference(tail, k, T, target_mode):
    case = BASELINE.index((tail, k, T, target_mode))
    student, dense = _student_teacher((13,), 11, seed=70 + case)
    t_t = [None, 2.0][case % 2]
    teacher = sparse_from_dense(dense, k, teacher_temperature=t_t or T, seed=70 + case,
                                empty_slots=1 if k > 1 else 0, pick=["topk", "random"][case % 2])
    target = _target((13,), 11, target_mode, seed=70 + case)
    kw = dict(tail=tail, temperature=T, teacher_temperature=t_t, alpha=0.3, label_smoothing=0.1 * (case % 2))
    ignore = {"ignore_index": PAD} if target_mode == "ignored" else {}
    expected, expected_grad = _loss_and_grad(reference_loss, student, teacher, target, **kw, **ignore)
    loss, grad = _loss_and_grad(reference.sparse_eager_baseline, student, teacher, target, **kw, **ignore)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-12)


def test_sparse_eager_baseline_is_forward_kl_only():
    student, dense = _student_teacher((3,), 11, seed=80)
    teacher = sparse_from_dense(dense, 4, teacher_temperature=1.0, seed=80)
    with pytest.raises(ValueError, match=r"kind must be 'kl'"):
        reference.sparse_eager_baseline(student, teacher, tail="bucket", kind="jsd")
    with pytest.raises(ValueError, match=r"tail must be one of"):
        reference.sparse_eager_baseline(student, teacher, tail="buckets")
    with pytest.raises(ValueError, match=r"tail='bucket' needs teacher.tail_logsumexp"):
        reference.sparse_eager_baseline(student, teacher._replace(tail_logsumexp=None), tail="bucket")
