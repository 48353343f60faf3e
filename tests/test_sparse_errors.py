"""Sparse targets: bad input raises a clear error naming the argument (functional, reference
and module), every check of distillation_loss included; SparseTargets; SparseKDLoss's
validation, config() and repr."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

import kdfast
from kdfast import reference
from tests.test_errors import CASES as DENSE_CASES

N, C, K = 6, 5, 3


def _inputs():
    g = torch.Generator().manual_seed(300)
    s = torch.randn(N, C, generator=g)
    t = torch.randn(N, C, generator=g)
    ids = torch.stack([torch.randperm(C, generator=g)[:K] for _ in range(N)])
    ids[1, 2] = -1
    teacher = kdfast.SparseTargets(ids, t.gather(-1, ids.clamp(min=0)), torch.randn(N, generator=g))
    y = torch.tensor([0, 4, -100, 1, 2, 3])
    return s, t, teacher, y


def _with(teacher, **changes):
    return teacher._replace(**changes)


def _set(x, where, value):
    x = x.clone()
    x[where] = value
    return x


# Each case: (student, teacher, target, kwargs) -> modified; the exception and a regex that
# must name the argument.
SPARSE_CASES = {
    "teacher_plain_tuple": (lambda s, tt, y, kw: (s, tuple(tt), y, kw), TypeError,
                            r"teacher must be a kdfast.SparseTargets\(indices, logits, tail_logsumexp\), "
                            r"got tuple"),
    "teacher_dense_tensor": (lambda s, tt, y, kw: (s, tt.logits, y, kw), TypeError,
                             r"teacher must be a kdfast.SparseTargets.*got Tensor"),
    "indices_float": (lambda s, tt, y, kw: (s, _with(tt, indices=tt.indices.float()), y, kw), TypeError,
                      r"teacher.indices must be an int32 or int64 tensor of class ids, got torch.float32"),
    "indices_bool": (lambda s, tt, y, kw: (s, _with(tt, indices=tt.indices > 0), y, kw), TypeError,
                     r"teacher.indices must be an int32 or int64 .*got torch.bool"),
    "indices_int16": (lambda s, tt, y, kw: (s, _with(tt, indices=tt.indices.short()), y, kw), TypeError,
                      r"teacher.indices must be an int32 or int64 .*got torch.int16"),
    "indices_list": (lambda s, tt, y, kw: (s, _with(tt, indices=tt.indices.tolist()), y, kw), TypeError,
                     r"teacher.indices must be an int32 or int64 .*got list"),
    "indices_rows": (lambda s, tt, y, kw: (s, _with(tt, indices=tt.indices[:4]), y, kw), ValueError,
                     r"teacher.indices shape \(4, 3\) must be \(\.\.\., k\) with \(\.\.\.\) = "
                     r"student_logits.shape\[:-1\] = \(6,\)"),
    "indices_no_k_dim": (lambda s, tt, y, kw: (s, _with(tt, indices=tt.indices[:, 0]), y, kw), ValueError,
                         r"teacher.indices shape \(6,\) must be \(\.\.\., k\)"),
    "indices_k0": (lambda s, tt, y, kw: (s, _with(tt, indices=tt.indices[:, :0], logits=tt.logits[:, :0]), y,
                                         kw), ValueError, r"teacher.indices must have at least one slot"),
    "logits_shape": (lambda s, tt, y, kw: (s, _with(tt, logits=tt.logits[:, :2]), y, kw), ValueError,
                     r"teacher.logits shape \(6, 2\) must be \(6, 3\) \(from teacher.indices\)"),
    "logits_int": (lambda s, tt, y, kw: (s, _with(tt, logits=tt.logits.long()), y, kw), TypeError,
                   r"teacher.logits must be float32, bfloat16, float16 or float64, got torch.int64"),
    "logits_none": (lambda s, tt, y, kw: (s, _with(tt, logits=None), y, kw), TypeError,
                    r"teacher.logits must be a torch.Tensor, got NoneType"),
    "tail_shape": (lambda s, tt, y, kw: (s, _with(tt, tail_logsumexp=tt.tail_logsumexp[:, None]), y, kw),
                   ValueError, r"teacher.tail_logsumexp shape \(6, 1\) must be \(6,\)"),
    "tail_int": (lambda s, tt, y, kw: (s, _with(tt, tail_logsumexp=tt.tail_logsumexp.int()), y, kw),
                 TypeError, r"teacher.tail_logsumexp must be float32"),
    "logits_requires_grad": (lambda s, tt, y, kw: (s, _with(tt, logits=tt.logits.clone().requires_grad_()), y,
                                                   kw), ValueError,
                             r"teacher.logits requires grad.*teacher.logits.detach\(\)"),
    "tail_requires_grad": (lambda s, tt, y, kw: (
        s, _with(tt, tail_logsumexp=tt.tail_logsumexp.clone().requires_grad_()), y, kw), ValueError,
        r"teacher.tail_logsumexp requires grad.*detach\(\)"),
    "logits_on_meta": (lambda s, tt, y, kw: (s, _with(tt, logits=tt.logits.to("meta")), y, kw), ValueError,
                       r"teacher.logits is on meta but student_logits is on cpu"),
    "indices_on_meta": (lambda s, tt, y, kw: (s, _with(tt, indices=tt.indices.to("meta")), y, kw), ValueError,
                        r"teacher.indices is on meta but student_logits is on cpu"),
    "id_too_large": (lambda s, tt, y, kw: (s, _with(tt, indices=_set(tt.indices, (2, 1), C)), y, kw),
                     ValueError, rf"teacher.indices\[2, 1\] = {C} is out of range: expected a class id in "
                     rf"\[0, {C}\) or -1 \(an empty slot\)"),
    "id_below_minus_one": (lambda s, tt, y, kw: (s, _with(tt, indices=_set(tt.indices, (4, 0), -2)), y, kw),
                           ValueError, r"teacher.indices\[4, 0\] = -2 is out of range"),
    "id_twice": (lambda s, tt, y, kw: (s, _with(tt, indices=_set(tt.indices, 3, torch.tensor([4, 1, 4]))), y,
                                       kw), ValueError,
                 r"teacher.indices\[3\] holds class id 4 more than once: expected distinct ids per row"),
    "bucket_without_tail": (lambda s, tt, y, kw: (s, _with(tt, tail_logsumexp=None), y, kw), ValueError,
                            r"tail='bucket' needs teacher.tail_logsumexp"),
    "tail_unknown": (lambda s, tt, y, kw: (s, tt, y, {**kw, "tail": "topk"}), ValueError,
                     r"tail must be one of \('renormalize', 'bucket'\), got 'topk'"),
    "tail_not_str": (lambda s, tt, y, kw: (s, tt, y, {**kw, "tail": None}), TypeError,
                     r"tail must be a str, one of \('renormalize', 'bucket'\), got NoneType"),
    "renormalize_with_jsd": (lambda s, tt, y, kw: (s, tt, y, {**kw, "tail": "renormalize"}), ValueError,
                             r"kind must be 'kl' with tail='renormalize'.*got kind='jsd'.*tail='bucket'"),
    "renormalize_with_reverse_kl": (lambda s, tt, y, kw: (s, tt, y, {**kw, "tail": "renormalize",
                                                                     "kind": "reverse_kl"}), ValueError,
                                    r"kind must be 'kl' with tail='renormalize'.*got kind='reverse_kl'"),
}
for _v in (0.0, -1.0, math.inf, math.nan):
    SPARSE_CASES[f"teacher_temperature={_v}"] = (
        lambda s, tt, y, kw, v=_v: (s, tt, y, {**kw, "teacher_temperature": v}), ValueError,
        r"teacher_temperature must be finite and > 0, or None \(= temperature\)")
for _v in ("2", True):
    SPARSE_CASES[f"teacher_temperature={_v!r}"] = (
        lambda s, tt, y, kw, v=_v: (s, tt, y, {**kw, "teacher_temperature": v}), TypeError,
        r"teacher_temperature must be a real number")


def _from_dense(make):
    """A case of tests/test_errors.py (student, target, scalars), with the sparse teacher."""
    def sparse_make(s, tt, y, kw):
        student, _, target, kwargs = make(s, torch.zeros_like(s), y, kw)
        return student, tt, target, kwargs
    return sparse_make


for _name, (_make, _exc, _pattern) in DENSE_CASES.items():
    if not _name.startswith("teacher_"):  # the dense teacher's own checks
        SPARSE_CASES[f"dense:{_name}"] = (_from_dense(_make), _exc, _pattern)

BASE_KW = dict(tail="bucket", temperature=2.0, alpha=0.5, kind="jsd", label_smoothing=0.1)


@pytest.mark.parametrize("impl", ["functional", "reference", "module"])
@pytest.mark.parametrize("case", list(SPARSE_CASES))
def test_bad_input_raises_naming_the_argument(case, impl):
    make, exc, pattern = SPARSE_CASES[case]
    s, _, teacher, y = _inputs()
    s.requires_grad_()
    student, teacher, target, kw = make(s, teacher, y, dict(BASE_KW))
    with pytest.raises(exc, match=pattern):
        if impl == "functional":
            kdfast.sparse_distillation_loss(student, teacher, target, **kw)
        elif impl == "reference":
            reference.sparse_distillation_loss(student, teacher, target, **kw)
        else:
            # Hyper-parameters fail when the module is built, tensors when it is called.
            kdfast.SparseKDLoss(**kw)(student, teacher, target)
    assert s.grad is None


def test_accepted_edge_inputs():
    s, _, teacher, y = _inputs()
    # Several empty slots in a row are not duplicates; int32 ids; a tail of -inf; no grad mode
    # lets a teacher that requires grad through.
    ids = _set(teacher.indices, 0, torch.tensor([-1, 3, -1])).int()
    edge = teacher._replace(indices=ids, tail_logsumexp=torch.full((N,), -math.inf))
    assert torch.isfinite(kdfast.sparse_distillation_loss(s, edge, y, tail="bucket", kind="jsd"))
    with torch.no_grad():
        grad_teacher = edge._replace(logits=edge.logits.clone().requires_grad_())
        out = kdfast.sparse_distillation_loss(s, grad_teacher, y)
    assert torch.equal(out, kdfast.sparse_distillation_loss(s, edge, y))
    # renormalize ignores tail_logsumexp (may be None); a 1-D student is one row.
    bare = teacher._replace(tail_logsumexp=None)
    one = kdfast.sparse_distillation_loss(s[0], kdfast.SparseTargets(bare.indices[0], bare.logits[0]))
    assert one.shape == ()


def test_sparse_targets_is_a_named_tuple():
    ids, logits = torch.tensor([[0, 2]]), torch.tensor([[1.0, 2.0]])
    teacher = kdfast.SparseTargets(ids, logits)
    assert kdfast.SparseTargets._fields == ("indices", "logits", "tail_logsumexp")
    assert teacher.tail_logsumexp is None and teacher.indices is ids and isinstance(teacher, tuple)
    indices, values, tail = teacher
    assert values is logits and tail is None


# --------------------------------------------------------------------------------------------
# SparseKDLoss
# --------------------------------------------------------------------------------------------

DEFAULTS = {"tail": "renormalize", "temperature": 1.0, "teacher_temperature": None, "alpha": 0.5,
            "kind": "kl", "beta": 0.5, "ignore_index": -100, "label_smoothing": 0.0, "reduction": "mean",
            "scale_by_t2": True}
CUSTOM = {"tail": "bucket", "temperature": 3.0, "teacher_temperature": 1.5, "alpha": 0.7, "kind": "jsd",
          "beta": 0.3, "ignore_index": -1, "label_smoothing": 0.1, "reduction": "sum", "scale_by_t2": False}


def test_module_config_holds_every_constructor_argument():
    assert list(kdfast.SparseKDLoss().config()) == list(inspect.signature(kdfast.SparseKDLoss).parameters)
    assert kdfast.SparseKDLoss().config() == DEFAULTS
    assert kdfast.SparseKDLoss(**CUSTOM).config() == CUSTOM
    config = json.loads(json.dumps(kdfast.SparseKDLoss(**CUSTOM).config()))
    assert kdfast.SparseKDLoss(**config).config() == CUSTOM
    # The functional's keyword arguments are exactly the module's.
    functional = inspect.signature(kdfast.sparse_distillation_loss).parameters
    assert [n for n, p in functional.items() if p.kind is p.KEYWORD_ONLY] == list(DEFAULTS)
    assert {n: functional[n].default for n in DEFAULTS} == DEFAULTS


def test_module_numbers_do_not_depend_on_int_or_float():
    loss = kdfast.SparseKDLoss(temperature=2, teacher_temperature=3, alpha=1, label_smoothing=0)
    assert loss.config() == kdfast.SparseKDLoss(temperature=2.0, teacher_temperature=3.0, alpha=1.0).config()
    assert all(type(loss.config()[k]) is float for k in ("temperature", "teacher_temperature", "alpha"))


def test_module_repr_shows_every_argument():
    assert repr(kdfast.SparseKDLoss(**CUSTOM)) == (
        "SparseKDLoss(tail='bucket', temperature=3.0, teacher_temperature=1.5, alpha=0.7, kind='jsd', "
        "beta=0.3, ignore_index=-1, label_smoothing=0.1, reduction='sum', scale_by_t2=False)")
    assert "teacher_temperature=None" in repr(kdfast.SparseKDLoss())


def test_module_forward_uses_the_configuration():
    s, _, teacher, y = _inputs()
    y = _set(y, 2, -1)
    expected = reference.sparse_distillation_loss(
        s.double(), teacher._replace(logits=teacher.logits.double()), y, **CUSTOM)
    torch.testing.assert_close(kdfast.SparseKDLoss(**CUSTOM)(s, teacher, y).double(), expected,
                               rtol=1e-5, atol=1e-6)


MODULE_BAD = [
    ("tail", None, TypeError, r"tail must be a str, one of \('renormalize', 'bucket'\), got NoneType None"),
    ("tail", "topk", ValueError, r"tail must be one of \('renormalize', 'bucket'\), got 'topk'"),
    ("kind", "jsd", ValueError, r"kind must be 'kl' with tail='renormalize'"),
    ("kind", "kld", ValueError, r"kind must be one of \('kl', 'reverse_kl', 'jsd', 'logit_mse'\), got 'kld'"),
    ("teacher_temperature", 0, ValueError, r"teacher_temperature must be finite and > 0, or None"),
    ("teacher_temperature", "1", TypeError, r"teacher_temperature must be a real number, got str"),
    ("temperature", -1.0, ValueError, r"temperature must be finite and > 0"),
    ("alpha", 1.5, ValueError, r"alpha must be in \[0, 1\]"),
    ("beta", 1.0, ValueError, r"beta must be in \(0, 1\)"),
    ("label_smoothing", None, TypeError, r"label_smoothing must be a real number"),
    ("reduction", "max", ValueError, r"reduction must be one of"),
    ("ignore_index", -100.0, TypeError, r"ignore_index must be an int"),
    ("scale_by_t2", 1, TypeError, r"scale_by_t2 must be a bool \(True or False\), got int 1"),
]


@pytest.mark.parametrize("name,value,exc,pattern", MODULE_BAD,
                         ids=[f"{n}={v!r}" for n, v, _, _ in MODULE_BAD])
def test_module_checks_arguments_at_construction(name, value, exc, pattern):
    with pytest.raises(exc, match=pattern):
        kdfast.SparseKDLoss(**{name: value})
