"""CUDA twins of the CPU tests: the CUDA kernels vs the CPU op and vs the float64 reference.

The whole module skips without a CUDA device. (KDFAST_TEST_DEVICE=cpu runs the same tests
against the CPU op, to dry-run the test logic on a machine without a GPU.)
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kdfast
from kdfast.sparse import sparse_distillation_loss_inplace
from tests.conftest import (
    IGNORE,
    KINDS,
    Logits,
    assert_within,
    check_case,
    gen,
    grad_error_bound,
    make_logits,
    make_target,
    mask_teacher_,
)

DEVICE = os.environ.get("KDFAST_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPE_PAIRS = [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32), (F16, BF16), (F32, F16), (F64, F64),
               (F32, F64)]


def _on(logits: Logits, device) -> Logits:
    return Logits(logits.base.to(device), logits.n_cols, logits.layout)


def _problem(batch, n_cols, s_dtype, t_dtype, *, layout="contiguous", target="ignored", masked=False,
             scale=3.0, seed=0):
    student = make_logits(batch, n_cols, dtype=s_dtype, scale=scale, layout=layout, seed=seed)
    teacher = make_logits(batch, n_cols, dtype=t_dtype, scale=scale, layout=layout, seed=seed + 1).value
    if masked:
        mask_teacher_(teacher, fraction=0.3)
    return student, teacher, make_target(batch, n_cols, target)


def _both(student, teacher, target, **kw):
    """check_case on CUDA and on the CPU; then CUDA vs CPU within twice the reference bound."""
    dev = torch.device(DEVICE)
    res_dev = check_case(_on(student, dev), teacher.to(dev), None if target is None else target.to(dev), **kw)
    res_cpu = check_case(student, teacher, target, **kw)
    assert res_dev.loss.device.type == dev.type
    assert res_dev.loss.dtype == res_cpu.loss.dtype
    torch.testing.assert_close(res_dev.loss.cpu(), res_cpu.loss,
                               rtol=2e-5 if res_cpu.loss.dtype == F32 else 1e-12,
                               atol=2 * float((res_cpu.loss - res_cpu.ref_loss).abs().max()) + 1e-6)
    if res_cpu.grad is not None:
        kwargs = {k: v for k, v in kw.items() if k not in ("upstream", "inplace")}
        acc = F64 if F64 in (student.base.dtype, teacher.dtype) else F32
        bound, rtol = grad_error_bound(student.value, teacher, target, res_cpu.upstream,
                                       grad_dtype=student.base.dtype, acc=acc,
                                       roundings=2 if student.base.dtype == BF16 else 1, **kwargs)
        assert_within(student.view(res_dev.grad.cpu()), student.view(res_cpu.grad), 2 * bound, 2 * rtol,
                      what="CUDA vs CPU gradient")
    return res_dev, res_cpu


def test_build_has_cuda_backend():
    if DEVICE != "cuda":
        pytest.skip("dry run on the CPU")
    assert "cuda" in kdfast.build_info()["backends"]


# Sub-warp path (C <= 1024: 4..32 lanes per row) and block-per-row path (C > 1024).
SHAPES = [((7,), 1), ((64,), 10), ((5, 9), 33), ((33,), 1000), ((3, 4), 1025), ((2, 3), 4099), ((3,), 32003)]


@pytest.mark.parametrize("batch,n_cols", SHAPES, ids=[f"C={c}" for _, c in SHAPES])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_paths_match_cpu_and_reference(batch, n_cols, kind):
    student, teacher, target = _problem(batch, n_cols, F32, F32, masked=kind != "reverse_kl", seed=400)
    _both(student, teacher, target, upstream=3.7, temperature=2.0, alpha=0.5, kind=kind, label_smoothing=0.1,
          reduction="mean")
    _both(student, teacher, None, upstream="random", temperature=0.5, kind=kind, reduction="none")


@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda p: "-".join(str(d)[6:] for d in p))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_cols", [10, 4099])
def test_cuda_dtypes(dtypes, kind, n_cols):
    s_dtype, t_dtype = dtypes
    student, teacher, target = _problem((6, 5), n_cols, s_dtype, t_dtype, seed=410)
    _both(student, teacher, target, upstream=3.7, temperature=4.0, alpha=0.3, kind=kind, reduction="sum")


@pytest.mark.parametrize("layout", ["transposed", "row_strided", "col_sliced", "col_strided"])
@pytest.mark.parametrize("n_cols", [10, 1025])
def test_cuda_strided_inputs(layout, n_cols):
    # col_sliced starts every row 3 elements into a wider row: misaligned vector loads.
    student, teacher, target = _problem((4, 5), n_cols, BF16, BF16, layout=layout, seed=420)
    _both(student, teacher, target, upstream="random", temperature=1.0, alpha=0.5, kind="jsd",
          reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "none"])
def test_cuda_3d_ignored_and_all_ignored(reduction):
    upstream = "random" if reduction == "none" else 3.7
    for target_mode in ("ignored", "all_ignored", "none"):
        student, teacher, target = _problem((3, 7), 515, F32, BF16, target=target_mode, seed=430)
        res_dev, _ = _both(student, teacher, target, upstream=upstream, temperature=3.0, alpha=0.5, kind="kl",
                           label_smoothing=0.1, reduction=reduction)
        if target_mode == "all_ignored" and reduction != "none":
            assert res_dev.loss.item() == 0.0


def test_cuda_fp16_gradient_does_not_underflow():
    N, C = 512, 32000
    student, teacher, target = _problem((N,), C, F16, F16, scale=2.0, seed=440)
    res_dev, _ = _both(student, teacher, target, upstream=65536.0, temperature=2.0, alpha=0.5, kind="kl")
    ref16 = res_dev.ref_grad.to(F16)
    nonzero = int((res_dev.grad != 0).sum())
    assert abs(nonzero - int((ref16 != 0).sum())) <= 1e-5 * N * C


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_cuda_inplace_matches_out_of_place(dtype):
    dev = torch.device(DEVICE)
    w = torch.randn(16, 300, generator=gen(450)).to(dtype).to(dev).requires_grad_()
    x = torch.randn(40, 16, generator=gen(451)).to(dtype).to(dev)
    t = torch.randn(40, 300, generator=gen(452)).to(dtype).to(dev)
    y = torch.randint(0, 300, (40,), generator=gen(453)).to(dev)
    out = {}
    for inplace in (False, True):
        w.grad = None
        loss = kdfast.distillation_loss(x @ w, t, y, temperature=2.0, kind="jsd", inplace=inplace)
        (loss * 3.7).backward()
        out[inplace] = (loss.detach(), w.grad.clone())
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=0)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=0)


def test_cuda_errors():
    dev = torch.device(DEVICE)
    s = torch.randn(4, 6, device=dev)
    t = torch.randn(4, 6, device=dev)
    if dev.type == "cuda":
        with pytest.raises(ValueError, match="teacher_logits is on cpu"):
            kdfast.distillation_loss(s, t.cpu())
        with pytest.raises(ValueError, match="target is on cpu"):
            kdfast.distillation_loss(s, t, torch.tensor([0, 1, 2, 3]))
        return
    y = torch.tensor([0, 1, 9, 2], device=dev)
    s0 = s.clone()
    with pytest.raises(ValueError, match=r"target\[2\] = 9"):
        kdfast.distillation_loss(s, t, y)
    assert torch.equal(s, s0)


@pytest.mark.skipif(DEVICE != "cuda", reason="the device-side target check needs a GPU")
def test_cuda_bad_target_is_a_device_assert():
    # Validated on the device without a host sync (as torch's cross-entropy does): a bad label
    # is a device-side assert, which poisons the CUDA context, so it runs in its own process.
    code = (
        "import torch, kdfast\n"
        "s = torch.randn(4, 6, device='cuda'); t = torch.randn(4, 6, device='cuda')\n"
        "y = torch.tensor([0, 1, 9, 2], device='cuda')\n"
        "kdfast.distillation_loss(s, t, y).item()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "assert" in proc.stderr.lower()


def _opcheck_samples(dev):
    y = torch.tensor([0, 3, IGNORE, 10, 7, 1], device=dev)
    out = []
    for dtype, n_cols in ((F32, 11), (BF16, 1100), (F16, 11), (F64, 11)):
        s = torch.randn(6, n_cols, generator=gen(460)).to(dtype).to(dev).requires_grad_()
        t = torch.randn(6, n_cols, generator=gen(461)).to(dtype).to(dev)
        yy = y.clamp(max=n_cols - 1).where(y != IGNORE, y)
        out.append((s, t, yy, 2.0, 0.5, "kl", 0.5, IGNORE, 0.1, True, True))
        out.append((s.detach(), t, None, 1.0, 0.5, "jsd", 0.3, IGNORE, 0.0, True, False))
    return out


@pytest.mark.parametrize("sample", range(8))
def test_cuda_opcheck(sample):
    args = _opcheck_samples(torch.device(DEVICE))[sample]
    torch.library.opcheck(torch.ops.kdfast.distill_fwd.default, args)


def test_cuda_opcheck_inplace():
    dev = torch.device(DEVICE)
    s = torch.randn(6, 1100, generator=gen(462)).to(dev)
    t = torch.randn(6, 1100, generator=gen(463)).to(dev)
    torch.library.opcheck(torch.ops.kdfast.distill_fwd_inplace.default,
                          (s, t, None, 2.0, 0.5, "reverse_kl", 0.5, IGNORE, 0.0, True))


def test_cuda_compile_training_step():
    dev = torch.device(DEVICE)
    torch.manual_seed(470)
    lin = torch.nn.Linear(16, 50).to(dev)
    x = torch.randn(32, 16, generator=gen(471)).to(dev)
    t = torch.randn(32, 50, generator=gen(472)).to(dev)
    y = torch.randint(0, 50, (32,), generator=gen(473)).to(dev)

    def step(x, t, y):
        return kdfast.distillation_loss(lin(x), t, y, temperature=2.0, alpha=0.7, kind="jsd")

    eager = step(x, t, y)
    (g_eager,) = torch.autograd.grad(eager, lin.weight)
    loss = torch.compile(step, fullgraph=True)(x, t, y)
    (g,) = torch.autograd.grad(loss, lin.weight)
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [F64, F32, BF16])
@pytest.mark.parametrize("form", ["logits", "hidden"])
def test_cuda_linear_matches_cpu(dtype, form):
    """kdfast.linear_distillation_loss on the device vs on the CPU (the same device-generic op,
    the device's matmuls and row kernel)."""
    g = gen(11)
    h = torch.randn(50, 24, generator=g).to(dtype)
    w = torch.randn(300, 24, generator=g).to(dtype) / 5
    b = torch.randn(300, generator=g).to(dtype)
    th, tw = torch.randn(50, 16, generator=g).to(dtype), torch.randn(300, 16, generator=g).to(dtype)
    y = make_target((50,), 300, "ignored")
    results = []
    for dev in ("cpu", DEVICE):
        params = [t.to(dev).requires_grad_() for t in (h, w, b)]
        teacher = ({"teacher_logits": (th @ tw.T).to(dev)} if form == "logits" else
                   {"teacher_hidden": th.to(dev), "teacher_weight": tw.to(dev)})
        loss = kdfast.linear_distillation_loss(params[0], params[1], y.to(dev),
                                               student_bias=params[2], temperature=2.0,
                                               chunk_rows=16, **teacher)
        loss.backward()
        results.append([loss.cpu()] + [p.grad.cpu() for p in params])
    tol = {F64: 1e-10, F32: 1e-4, BF16: 3e-2}[dtype]
    for cpu_value, dev_value in zip(*results, strict=True):
        torch.testing.assert_close(dev_value.double(), cpu_value.double(), rtol=tol, atol=tol)


# ---- the sparse op (kdfast.sparse_distillation_loss; csrc/cuda/sparse_distill.cu) ----
SPARSE_TAIL_KINDS = [("renormalize", "kl"), ("bucket", "kl"), ("bucket", "reverse_kl"), ("bucket", "jsd")]


def _sparse_problem(batch, n_cols, k, *, dtype=F32, seed=0, t_t=1.5, ignored=True, **sparse_kw):
    from tests.sparse_helpers import sparse_from_dense

    g = gen(seed)
    student = (3.0 * torch.randn(*batch, n_cols, generator=g, dtype=F64)).to(dtype)
    dense = 3.0 * torch.randn(*batch, n_cols, generator=g, dtype=F64)
    teacher = sparse_from_dense(dense, k, teacher_temperature=t_t, seed=seed, **sparse_kw)
    teacher = kdfast.SparseTargets(teacher.indices, teacher.logits.float(), teacher.tail_logsumexp.float())
    return student, teacher, make_target(batch, n_cols, "ignored" if ignored else "labels")


def _sparse_f64(teacher):
    return kdfast.SparseTargets(teacher.indices, teacher.logits.double(), teacher.tail_logsumexp.double())


def _sparse_on(teacher, dev):
    tail = teacher.tail_logsumexp
    return kdfast.SparseTargets(teacher.indices.to(dev), teacher.logits.to(dev),
                                None if tail is None else tail.to(dev))


def _sparse_loss_grad(student, teacher, target, dev, *, inplace=False, **kw):
    leaf = student.detach().clone().to(dev).requires_grad_(not inplace)
    y = None if target is None else target.to(dev)
    if inplace:
        leaf.requires_grad_()
        loss = sparse_distillation_loss_inplace(leaf, _sparse_on(teacher, dev), y, **kw)
    else:
        loss = kdfast.sparse_distillation_loss(leaf, _sparse_on(teacher, dev), y, **kw)
    (grad,) = torch.autograd.grad(loss, leaf, torch.ones_like(loss))
    return loss.detach().cpu(), grad.cpu()


def _sparse_both(student, teacher, target, *, inplace=False, **kw):
    """The sparse loss and gradient on the device vs the CPU op: float32 accumulation in both,
    different summation orders (tolerances as the host simulation's)."""
    dev, cpu = torch.device(DEVICE), torch.device("cpu")
    loss_dev, grad_dev = _sparse_loss_grad(student, teacher, target, dev, inplace=inplace, **kw)
    loss_cpu, grad_cpu = _sparse_loss_grad(student, teacher, target, cpu, **kw)
    assert grad_dev.dtype == grad_cpu.dtype
    wide = student.dtype == F64
    t2 = kw.get("temperature", 1.0) ** 2
    torch.testing.assert_close(loss_dev, loss_cpu, rtol=1e-10 if wide else 2e-5,
                               atol=1e-12 if wide else 2e-5 * t2)
    g_atol = (1e-10 if wide else 1e-4) * float(grad_cpu.abs().max()) + 1e-7
    g_rtol = 1e-10 if wide else (8e-3 if student.dtype == BF16 else 5e-5)
    torch.testing.assert_close(grad_dev.double(), grad_cpu.double(), rtol=g_rtol, atol=g_atol)


@pytest.mark.parametrize("tail_kind", SPARSE_TAIL_KINDS, ids=lambda tk: "-".join(tk))
@pytest.mark.parametrize("n_cols,k", [(10, 1), (10, 10), (1000, 8), (4099, 64), (4099, 4099)])
def test_cuda_sparse_matches_cpu(tail_kind, n_cols, k):
    tail, kind = tail_kind
    student, teacher, y = _sparse_problem((2, 7), n_cols, k, seed=n_cols + k, empty_slots=min(k - 1, 2),
                                          empty_rows=(3,))
    for temperature, t_t, alpha, eps in ((1.0, 1.0, 0.5, 0.0), (2.0, 1.5, 0.0, 0.1), (3.7, 3.7, 1.0, 0.0),
                                         (4.0, 2.0, 0.5, 0.1)):
        _sparse_both(student, teacher, y, tail=tail, kind=kind, temperature=temperature,
                     teacher_temperature=t_t, alpha=alpha, label_smoothing=eps, beta=0.3)
    _sparse_both(student, teacher, None, tail=tail, kind=kind, temperature=20.0, reduction="sum")


@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cuda_sparse_dtypes(dtype, index_dtype):
    student, teacher, y = _sparse_problem((33,), 1025, 16, dtype=dtype, seed=5, index_dtype=index_dtype,
                                          empty_slots=3)
    if dtype == F64:
        teacher = _sparse_f64(teacher)
    _sparse_both(student, teacher, y, tail="bucket", kind="jsd", temperature=2.0, reduction="none")


@pytest.mark.parametrize("dtype", [F32, BF16, F64])
def test_cuda_sparse_inplace_matches_cpu(dtype):
    student, teacher, y = _sparse_problem((9,), 3001, 40, dtype=dtype, seed=6, empty_slots=2)
    if dtype == F64:
        teacher = _sparse_f64(teacher)
    _sparse_both(student, teacher, y, inplace=True, tail="bucket", kind="reverse_kl", temperature=2.0,
                 alpha=0.7)


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 64, 131071])
def test_cuda_sparse_large_vocabulary(k):
    student, teacher, y = _sparse_problem((3,), 131071, k, dtype=BF16, seed=7, ignored=False)
    _sparse_both(student, teacher, y, tail="bucket", kind="kl", temperature=2.0, label_smoothing=0.1)


def test_cuda_sparse_bad_ids_raise_and_leave_the_student_untouched():
    student, teacher, _ = _sparse_problem((6,), 2100, 5, seed=15)
    dev = torch.device(DEVICE)
    bad = teacher.indices.clone()
    bad[4, 0] = 2100
    s = student.to(dev).requires_grad_()
    saved = s.detach().clone()
    with pytest.raises(ValueError, match=r"teacher.indices\[4, 0\] = 2100 is out of range"):
        sparse_distillation_loss_inplace(s, _sparse_on(teacher._replace(indices=bad), dev))
    assert torch.equal(s.detach(), saved)


@pytest.mark.skipif(DEVICE != "cuda", reason="the device-side id check needs a GPU")
@pytest.mark.parametrize("inplace", [False, True])
def test_cuda_sparse_bad_id_is_a_device_assert(inplace):
    # The raw op checks ids on the device (no host sync): a device-side assert, which poisons
    # the CUDA context, so it runs in its own process.
    op = "sparse_distill_fwd_inplace" if inplace else "sparse_distill_fwd"
    extra = "" if inplace else ", True"
    code = (
        "import torch, kdfast\n"
        "s = torch.randn(4, 6, device='cuda')\n"
        "ids = torch.tensor([[0, 1], [2, -1], [9, 3], [4, 5]], device='cuda')\n"
        "z = torch.randn(4, 2, device='cuda')\n"
        f"out = torch.ops.kdfast.{op}(s, ids, z, None, None, 1.0, 1.0, 0.5, 'kl', 0.5, -100, 0.0, "
        f"True{extra})\n"
        "torch.cuda.synchronize()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "assert" in proc.stderr.lower()


def _sparse_opcheck_samples(dev):
    student, teacher, _ = _sparse_problem((6,), 11, 4, seed=9, t_t=2.0, empty_slots=1, empty_rows=(3,))
    ids, logits, tail = teacher.indices.to(dev), teacher.logits.to(dev), teacher.tail_logsumexp.to(dev)
    y = torch.tensor([0, 3, IGNORE, 10, 7, 1], device=dev)
    out = []
    for dtype, req in ((F32, True), (BF16, True), (F64, True), (F16, False)):
        s = student.to(dtype).to(dev).clone().requires_grad_(req)
        out.append((s, ids, logits, tail, y, 2.0, 1.5, 0.5, "kl", 0.5, IGNORE, 0.1, True, req))
    s = student.to(dev).clone().requires_grad_()
    out.append((s, ids.int(), logits, None, None, 1.0, 1.0, 0.5, "kl", 0.5, IGNORE, 0.0, True, True, True))
    out.append((s.detach(), ids, logits, tail, None, 4.0, 4.0, 0.5, "jsd", 0.5, IGNORE, 0.0, True, False))
    return out


@pytest.mark.parametrize("sample", range(6))
def test_cuda_sparse_opcheck(sample):
    torch.library.opcheck(torch.ops.kdfast.sparse_distill_fwd.default,
                          _sparse_opcheck_samples(torch.device(DEVICE))[sample])


def test_cuda_sparse_opcheck_inplace():
    s, ids, logits, tail, y, *rest = _sparse_opcheck_samples(torch.device(DEVICE))[0]
    for average_rows in (False, True):
        args = (s.detach().clone(), ids, logits, tail, y, *rest[:-1], average_rows)
        torch.library.opcheck(torch.ops.kdfast.sparse_distill_fwd_inplace.default, args)
