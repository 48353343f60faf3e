"""The fused sparse op (torch.ops.kdfast.sparse_distill_fwd / _inplace, CPU): against the
float64 oracles from the kernel's exact inputs (low-precision students widened, never
re-rounded), every student dtype, grad_output != 1, gradcheck, opcheck, torch.compile, the
in-place variant, and bad ids (a clear error naming teacher.indices, nothing overwritten).

tests/test_sparse.py runs kdfast.sparse_distillation_loss, which now calls this op on CPU
tensors, against the independent dense oracle in float64 over every tail/kind, k, T and the
counting rules; this file adds what is specific to the kernel."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import kdfast
from kdfast import reference
from kdfast._ext import HAS_EXTENSION
from kdfast.sparse import sparse_distillation_loss_inplace
from tests.sparse_helpers import oracle_loss, sparse_from_dense

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="needs the compiled kdfast._C")

TAIL_KINDS = [("renormalize", "kl"), ("bucket", "kl"), ("bucket", "reverse_kl"), ("bucket", "jsd")]
PAD = -5
F64 = torch.float64


def _inputs(batch, n_cols, k, seed, *, dtype=torch.float32, t_t=1.5, scale=3.0, **sparse_kw):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(*batch, n_cols, generator=g, dtype=F64)).to(dtype)
    dense = scale * torch.randn(*batch, n_cols, generator=g, dtype=F64)
    teacher = sparse_from_dense(dense, k, teacher_temperature=t_t, seed=seed, **sparse_kw)
    return student, dense, teacher


def _target(batch, n_cols, seed, ignored=True):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, n_cols, batch, generator=g)
    if ignored:
        y.view(-1)[:: 3] = PAD
    return y


def _loss_and_grad(fn, student, *args, grad_output=None, **kw):
    leaf = student.detach().clone().requires_grad_()
    loss = fn(leaf, *args, **kw)
    weight = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    (grad,) = torch.autograd.grad(loss, leaf, weight)
    return loss.detach(), grad


def _widened(teacher, dtype=F64):
    tail = teacher.tail_logsumexp
    return kdfast.SparseTargets(teacher.indices, teacher.logits.to(dtype),
                                None if tail is None else tail.to(dtype))


# --------------------------------------------------------------------------------------------
# every student dtype against the float64 oracle of the same (widened) inputs
# --------------------------------------------------------------------------------------------

DTYPE_GRID = list(itertools.product(TAIL_KINDS, [torch.float32, torch.bfloat16, torch.float16],
                                    [1, 8, 61], [1.0, 2.0, 20.0]))


@pytest.mark.parametrize("tail_kind,dtype,k,T", DTYPE_GRID,
                         ids=[f"{tk[0]}-{tk[1]}-{str(d)[6:]}-k{k}-T{T:g}" for tk, d, k, T in DTYPE_GRID])
def test_low_precision_students_match_the_float64_reference(tail_kind, dtype, k, T):
    tail, kind = tail_kind
    case = DTYPE_GRID.index((tail_kind, dtype, k, T))
    batch = [(7,), (2, 3)][case % 2]
    student, _, teacher = _inputs(batch, 61, k, seed=case, dtype=dtype, t_t=0.8 * T,
                                  empty_slots=min(k - 1, 2), empty_rows=(1,))
    teacher = teacher._replace(logits=teacher.logits.float(), tail_logsumexp=teacher.tail_logsumexp.float())
    target = _target(batch, 61, seed=case) if case % 3 else None
    grad_output = torch.rand(batch, generator=torch.Generator().manual_seed(case)) + 0.5
    kw = dict(tail=tail, kind=kind, temperature=T, teacher_temperature=0.8 * T, alpha=0.7, beta=0.4,
              ignore_index=PAD, label_smoothing=0.1 * (case % 2), reduction="none")
    loss, grad = _loss_and_grad(kdfast.sparse_distillation_loss, student, teacher, target,
                                grad_output=grad_output, **kw)
    # The oracle starts from the kernel's exact inputs: the student widened, not re-rounded.
    expected, expected_grad = _loss_and_grad(reference.sparse_distillation_loss, student.double(),
                                             _widened(teacher), target, grad_output=grad_output, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=2e-5 * T * T)
    # The gradient is rounded into the student's dtype (bf16: once more by grad_output's scaling,
    # as for the dense op); absolute errors relative to the row's largest entries.
    tol = {torch.float32: 5e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), expected_grad.to(dtype).double(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("tail_kind", TAIL_KINDS, ids=lambda tk: "-".join(tk))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_with_grad_output_and_3d_inputs(tail_kind, reduction):
    tail, kind = tail_kind
    batch = (2, 4, 3)
    student, dense, teacher = _inputs(batch, 23, 6, seed=3, dtype=F64, t_t=0.7, empty_slots=2,
                                      empty_rows=(0, 5))
    target = _target(batch, 23, seed=4)
    shape = batch if reduction == "none" else ()
    grad_output = torch.rand(shape, generator=torch.Generator().manual_seed(5)) + 0.5
    kw = dict(tail=tail, kind=kind, temperature=2.0, teacher_temperature=0.7, alpha=0.4, beta=0.3,
              ignore_index=PAD, label_smoothing=0.2, reduction=reduction)
    loss, grad = _loss_and_grad(kdfast.sparse_distillation_loss, student, teacher, target,
                                grad_output=grad_output, **kw)
    expected, expected_grad = _loss_and_grad(oracle_loss, student, dense, teacher.indices, target,
                                             grad_output=grad_output, **kw)
    torch.testing.assert_close(loss, expected, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("tail_kind", TAIL_KINDS, ids=[f"{t}-{k}" for t, k in TAIL_KINDS])
def test_alpha_one_label_outside_the_teacher_ids(tail_kind):
    # No hard term (alpha = 1) and a label not among the row's ids: the label's column takes
    # the rest's soft gradient at its own logit (once computed at s_y = 0; found by the CUDA
    # rows' host simulation).
    tail, kind = tail_kind
    student, dense, teacher = _inputs((6,), 50, 4, seed=11, dtype=F64)
    ids = teacher.indices
    target = torch.tensor([next(c for c in range(50) if c not in ids[i].tolist()) for i in range(6)])
    kw = dict(tail=tail, kind=kind, temperature=2.0, teacher_temperature=1.5, alpha=1.0)
    loss, grad = _loss_and_grad(kdfast.sparse_distillation_loss, student, teacher, target, **kw)
    expected, expected_grad = _loss_and_grad(oracle_loss, student, dense, ids, target, **kw)
    torch.testing.assert_close(loss, expected, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 8, 50_000])
def test_vocabulary_50000_every_k(k):
    """C = 50,000 (several row chunks, ids in many of them), k up to C, float32 and float64."""
    student, _, teacher = _inputs((3,), 50_000, k, seed=k, dtype=F64, t_t=2.0, empty_slots=min(k - 1, 1),
                                  pick="random")
    target = torch.tensor([5, PAD, 49_999])
    kw = dict(tail="bucket", kind="kl", temperature=4.0, teacher_temperature=2.0, alpha=0.6,
              ignore_index=PAD, label_smoothing=0.05, reduction="none")
    expected, expected_grad = _loss_and_grad(reference.sparse_distillation_loss, student, teacher, target,
                                             **kw)
    loss, grad = _loss_and_grad(kdfast.sparse_distillation_loss, student, teacher, target, **kw)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-15)
    s32 = student.float()
    loss32, grad32 = _loss_and_grad(kdfast.sparse_distillation_loss, s32, _widened(teacher, torch.float32),
                                    target, **kw)
    expected, expected_grad = _loss_and_grad(reference.sparse_distillation_loss, s32.double(),
                                             _widened(_widened(teacher, torch.float32)), target, **kw)
    torch.testing.assert_close(loss32.double(), expected, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(grad32.double(), expected_grad.float().double(), rtol=5e-5,
                               atol=5e-5 * expected_grad.abs().max().item())


def test_rest_mass_far_below_float32_range_keeps_finite_gradients():
    """Q_R below float32's smallest normal: the rest's gradient is q_j / Q_R times a weight,
    computed relative to the rest's own maximum, never P_R / Q_R."""
    student = torch.full((1, 40), -200.0)
    student[0, :3] = torch.tensor([10.0, 9.0, 8.0])
    teacher = kdfast.SparseTargets(torch.tensor([[0, 1, 2]]), torch.tensor([[3.0, 2.0, 1.0]]),
                                   torch.tensor([0.5]))
    kw = dict(tail="bucket", temperature=1.0, reduction="sum")
    loss, grad = _loss_and_grad(kdfast.sparse_distillation_loss, student, teacher, **kw)
    expected, expected_grad = _loss_and_grad(reference.sparse_distillation_loss, student.double(),
                                             _widened(teacher), **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------------------------
# autograd contract: gradcheck, opcheck, torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail_kind", TAIL_KINDS, ids=lambda tk: "-".join(tk))
def test_gradcheck(tail_kind):
    tail, kind = tail_kind
    student, _, teacher = _inputs((4,), 9, 3, seed=8, dtype=F64, t_t=1.3, empty_slots=1, empty_rows=(2,))
    target = torch.tensor([1, PAD, 4, 8])
    leaf = student.detach().requires_grad_()

    def fn(s):
        return kdfast.sparse_distillation_loss(s, teacher, target, tail=tail, kind=kind, temperature=2.0,
                                               teacher_temperature=1.3, ignore_index=PAD, label_smoothing=0.1,
                                               reduction="none")

    assert torch.autograd.gradcheck(fn, (leaf,))


def _op_samples():
    student, _, teacher = _inputs((6,), 11, 4, seed=9, t_t=2.0, empty_slots=1, empty_rows=(3,))
    ids, logits, tail = teacher.indices, teacher.logits.float(), teacher.tail_logsumexp.float()
    y = torch.tensor([0, 3, PAD, 10, 7, 1])
    samples = []
    for dtype, req in ((torch.float32, True), (torch.bfloat16, True), (F64, True), (torch.float16, False)):
        s = student.to(dtype).clone().requires_grad_(req)
        samples.append((s, ids, logits, tail, y, 2.0, 1.5, 0.5, "kl", 0.5, PAD, 0.1, True, req))
    s = student.clone().requires_grad_()
    samples.append((s, ids.int(), logits, None, None, 1.0, 1.0, 0.5, "kl", 0.5, PAD, 0.0, True, True, True))
    samples.append((s, ids, logits.double(), tail, y, 3.0, 2.0, 0.3, "jsd", 0.3, PAD, 0.0, False, True))
    samples.append((s.detach(), ids, logits, tail, None, 4.0, 4.0, 0.5, "reverse_kl", 0.5, PAD, 0.0, True,
                    False))
    return samples


@pytest.mark.parametrize("sample", range(len(_op_samples())))
def test_opcheck_sparse_distill_fwd(sample):
    torch.library.opcheck(torch.ops.kdfast.sparse_distill_fwd.default, _op_samples()[sample])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
def test_opcheck_sparse_distill_fwd_inplace(dtype):
    s, ids, logits, tail, y, *rest = _op_samples()[0]
    for average_rows in (False, True):
        args = (s.detach().to(dtype).clone(), ids, logits, tail, y, *rest[:-1], average_rows)
        torch.library.opcheck(torch.ops.kdfast.sparse_distill_fwd_inplace.default, args)


def test_compiled_fullgraph_training_step():
    torch._dynamo.reset()
    student, _, teacher = _inputs((5,), 17, 4, seed=10, t_t=2.0, empty_slots=1)
    teacher = _widened(teacher, torch.float32)
    target = torch.tensor([0, 3, PAD, 16, 7])
    weight = torch.randn(17, 17, generator=torch.Generator().manual_seed(11))

    def step(x, w):
        logits = x @ w
        return kdfast.sparse_distillation_loss(logits, teacher, target, tail="bucket", kind="jsd",
                                               temperature=2.0, ignore_index=PAD)

    compiled = torch.compile(step, fullgraph=True)
    w_eager = weight.clone().requires_grad_()
    w_compiled = weight.clone().requires_grad_()
    eager_loss = step(student, w_eager)
    eager_loss.backward()
    compiled_loss = compiled(student, w_compiled)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w_compiled.grad, w_eager.grad, rtol=1e-5, atol=1e-6)


def test_eager_backward_hands_over_the_buffer_and_retain_graph_recomputes():
    student, _, teacher = _inputs((4,), 13, 3, seed=12)
    teacher = _widened(teacher, torch.float32)
    leaf = student.detach().requires_grad_()
    loss = kdfast.sparse_distillation_loss(leaf, teacher, tail="bucket", temperature=2.0, reduction="sum")
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    leaf.grad = None
    (2 * loss).backward()
    torch.testing.assert_close(leaf.grad, 2 * first, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# in-place variant
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, F64])
@pytest.mark.parametrize("tail_kind", [("renormalize", "kl"), ("bucket", "jsd")], ids=lambda tk: "-".join(tk))
def test_inplace_matches_the_out_of_place_gradient(dtype, tail_kind):
    tail, kind = tail_kind
    student, _, teacher = _inputs((2, 5), 1500, 7, seed=13, dtype=dtype, t_t=2.0, empty_slots=2,
                                  empty_rows=(4,))
    teacher = _widened(teacher, torch.float32)
    target = _target((2, 5), 1500, seed=14)
    kw = dict(tail=tail, kind=kind, temperature=2.0, teacher_temperature=2.0, ignore_index=PAD,
              label_smoothing=0.1, reduction="sum")
    loss, grad = _loss_and_grad(kdfast.sparse_distillation_loss, student, teacher, target,
                                grad_output=torch.tensor(0.5), **kw)
    buffer = student.clone().requires_grad_()
    loss_inplace = sparse_distillation_loss_inplace(buffer, teacher, target, **kw)
    (grad_inplace,) = torch.autograd.grad(loss_inplace, buffer, torch.tensor(0.5, dtype=loss.dtype))
    assert torch.equal(loss_inplace, loss)
    assert torch.equal(grad_inplace, grad)
    assert grad_inplace.data_ptr() == buffer.data_ptr()


def test_inplace_bad_ids_leave_the_student_untouched():
    student, _, teacher = _inputs((6,), 2100, 5, seed=15)
    teacher = _widened(teacher, torch.float32)
    bad = teacher.indices.clone()
    bad[5, 1] = bad[5, 3]  # the last row: every other row would be written first by a naive kernel
    saved = student.clone()
    with pytest.raises(ValueError, match=r"teacher.indices\[5\] holds class id \d+ more than once"):
        torch.ops.kdfast.sparse_distill_fwd_inplace(student, bad, teacher.logits.float(), None, None, 1.0,
                                                    1.0, 0.5, "kl", 0.5, PAD, 0.0, True)
    assert torch.equal(student, saved)
    bad = teacher.indices.clone()
    bad[4, 0] = 2100
    with pytest.raises(ValueError, match=r"teacher.indices\[4, 0\] = 2100 is out of range: expected a "
                                         r"class id in \[0, 2100\) or -1"):
        sparse_distillation_loss_inplace(student.requires_grad_(), teacher._replace(indices=bad))
    assert torch.equal(student.detach(), saved)
    target = torch.tensor([0, 1, 2, 3, 4, 2100])
    with pytest.raises(ValueError, match=r"target\[5\] = 2100 is out of range"):
        torch.ops.kdfast.sparse_distill_fwd_inplace(student.detach(), teacher.indices, teacher.logits.float(),
                                                    None, target, 1.0, 1.0, 0.5, "kl", 0.5, PAD, 0.0, True)
    assert torch.equal(student.detach(), saved)


def test_inplace_refuses_shared_memory_and_float16():
    student, _, teacher = _inputs((4,), 9, 3, seed=16)
    shared = kdfast.SparseTargets(teacher.indices, student[:, :3], teacher.tail_logsumexp)
    with pytest.raises(ValueError, match=r"teacher.logits shares memory"):
        sparse_distillation_loss_inplace(student, shared)
    with pytest.raises(ValueError, match=r"float16 buffer cannot hold"):
        sparse_distillation_loss_inplace(student.half(), teacher)


# --------------------------------------------------------------------------------------------
# bad ids through the op, and k = C equal to the dense op
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_op_names_teacher_indices_for_bad_ids(index_dtype):
    student, _, teacher = _inputs((4,), 10, 3, seed=17, index_dtype=index_dtype)
    logits = teacher.logits.float()
    for row, slot, value, message in [
        (2, 1, 10, r"teacher.indices\[2, 1\] = 10 is out of range: expected a class id in \[0, 10\)"),
        (0, 2, -2, r"teacher.indices\[0, 2\] = -2 is out of range"),
    ]:
        ids = teacher.indices.clone()
        ids[row, slot] = value
        with pytest.raises(ValueError, match=message):
            torch.ops.kdfast.sparse_distill_fwd(student, ids, logits, None, None, 1.0, 1.0, 0.5, "kl", 0.5,
                                                PAD, 0.0, True, True)
    ids = teacher.indices.clone()
    ids[3] = torch.tensor([7, -1, 7])
    with pytest.raises(ValueError, match=r"teacher.indices\[3\] holds class id 7 more than once"):
        torch.ops.kdfast.sparse_distill_fwd(student, ids, logits, None, None, 1.0, 1.0, 0.5, "kl", 0.5, PAD,
                                            0.0, True, True)
    # The functional API names the caller's own (3-D) position.
    ids3 = teacher.indices.clone().reshape(2, 2, 3)
    ids3[1, 0, 2] = 10
    with pytest.raises(ValueError, match=r"teacher.indices\[1, 0, 2\] = 10 is out of range"):
        kdfast.sparse_distillation_loss(student.reshape(2, 2, 10),
                                        kdfast.SparseTargets(ids3, teacher.logits.reshape(2, 2, 3)))


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_class_matches_the_dense_op(kind, dtype):
    student, dense, _ = _inputs((9,), 300, 1, seed=18, dtype=dtype)
    teacher = sparse_from_dense(dense.float(), 300, teacher_temperature=2.0, seed=19, pick="random")
    target = _target((9,), 300, seed=20)
    kw = dict(temperature=2.0, alpha=0.4, kind=kind, beta=0.3, ignore_index=PAD, label_smoothing=0.1)
    loss, grad = _loss_and_grad(kdfast.distillation_loss, student, dense.float(), target, **kw)
    sparse, sparse_grad = _loss_and_grad(kdfast.sparse_distillation_loss, student, teacher, target,
                                         tail="bucket", **kw)
    torch.testing.assert_close(sparse, loss, rtol=2e-5, atol=1e-6)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(sparse_grad.float(), grad.float(), rtol=tol, atol=tol * 1e-2)
    assert math.isfinite(sparse.item())
