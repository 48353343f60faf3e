"""kdfast.linear_distillation_loss: the output layer fused with the loss, against the unfused
composition distillation_loss(F.linear(h, W, b), teacher, ...) (float64 oracle: kdfast.reference)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import kdfast
from kdfast import reference

pytestmark = pytest.mark.skipif(not kdfast.HAS_EXTENSION, reason="needs the compiled kernels")


def make(batch=(3, 7), hidden=12, classes=37, teacher_hidden=9, dtype=torch.float64, seed=0,
         ignore_some=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*batch, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(classes, hidden, generator=g, dtype=torch.float64) / hidden**0.5 * 3
    b = torch.randn(classes, generator=g, dtype=torch.float64)
    th = torch.randn(*batch, teacher_hidden, generator=g, dtype=torch.float64)
    tw = torch.randn(classes, teacher_hidden, generator=g, dtype=torch.float64) * 2
    tb = torch.randn(classes, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, batch, generator=g)
    if ignore_some:
        y.view(-1)[::4] = -100
    cast = [t.to(dtype) for t in (h, w, b, th, tw, tb)]
    return (*cast, y)


def fused_and_reference(h, w, b, th, tw, tb, y, *, form, use_bias, grad_scale=1.0,
                        chunk_rows=None, **kw):
    """(loss, grads) of the fused loss and of the float64 unfused composition from the same
    values."""
    teacher = {"teacher_logits": F.linear(th, tw, tb)} if form == "logits" else {
        "teacher_hidden": th, "teacher_weight": tw, "teacher_bias": tb}
    params = [t.detach().clone().requires_grad_() for t in (h, w, b)]
    loss = kdfast.linear_distillation_loss(params[0], params[1], y,
                                           student_bias=params[2] if use_bias else None,
                                           **teacher, chunk_rows=chunk_rows, **kw)
    (loss * grad_scale if loss.dim() == 0 else (loss * grad_scale).sum()).backward()
    ref_params = [t.detach().double().requires_grad_() for t in (h, w, b)]
    t64 = F.linear(th.double(), tw.double(), tb.double())
    ref = reference.distillation_loss(
        F.linear(ref_params[0], ref_params[1], ref_params[2] if use_bias else None), t64, y, **kw)
    (ref * grad_scale if ref.dim() == 0 else (ref * grad_scale).sum()).backward()
    n = 3 if use_bias else 2
    return (loss, [p.grad for p in params[:n]]), (ref, [p.grad for p in ref_params[:n]])


@pytest.mark.parametrize(
    ("kind", "form", "use_bias", "reduction", "chunk_rows"),
    [(k, f, bias, r, c) for k, f, bias, r, c in itertools.product(
        ("kl", "reverse_kl", "jsd"), ("logits", "hidden"), (True, False),
        ("mean", "sum", "none"), (None, 4, 7))
     if (f == "logits" or r == "mean") and (bias or c != 7)],
)
def test_float64_matches_the_unfused_composition(kind, form, use_bias, reduction, chunk_rows):
    inputs = make()
    (loss, grads), (ref, ref_grads) = fused_and_reference(
        *inputs, form=form, use_bias=use_bias, grad_scale=2.5, kind=kind, temperature=2.0,
        alpha=0.7, label_smoothing=0.1, reduction=reduction, chunk_rows=chunk_rows)
    assert loss.dtype == torch.float64 and loss.shape == ref.shape
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("chunk_rows", [1, 5, 21, 22, 1000])
@pytest.mark.parametrize("with_target", [True, False])
def test_chunk_sizes_and_unlabeled_rows(chunk_rows, with_target):
    h, w, b, th, tw, tb, y = make(batch=(21,), seed=chunk_rows)
    (loss, grads), (ref, ref_grads) = fused_and_reference(
        h, w, b, th, tw, tb, y if with_target else None, form="hidden", use_bias=True,
        temperature=4.0, alpha=0.5, chunk_rows=chunk_rows)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)


def test_every_row_ignored_gives_zero_and_zero_gradients():
    h, w, b, th, tw, tb, y = make(batch=(6,))
    y[:] = -100
    (loss, grads), _ = fused_and_reference(h, w, b, th, tw, tb, y, form="logits", use_bias=True,
                                           alpha=0.5)
    assert loss.item() == 0.0
    assert all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 2e-5), (torch.bfloat16, 3e-2),
                                            (torch.float16, 5e-3)])
def test_low_precision_against_the_float64_composition_of_the_same_values(dtype, tol):
    h, w, b, th, tw, tb, y = make(batch=(40,), hidden=32, classes=300, dtype=dtype)
    (loss, grads), (ref, ref_grads) = fused_and_reference(
        h, w, b, th, tw, tb, y, form="logits", use_bias=True, temperature=2.0, alpha=0.5,
        chunk_rows=16)
    assert loss.dtype == torch.float32
    assert grads[0].dtype == grads[1].dtype == dtype
    # The student logits are a `dtype` matmul in the fused path and a float64 one in the
    # reference: compare at that precision.
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    for g, r in zip(grads, ref_grads, strict=True):
        scale = r.abs().max()
        torch.testing.assert_close(g.double() / scale, r / scale, rtol=tol * 4, atol=tol * 4)


MIXED_GEMM = kdfast.HAS_EXTENSION and kdfast.build_info().get("mixed_bf16_gemm", False)


@pytest.mark.parametrize("mixed_gemm", ["1", "0"])
@pytest.mark.parametrize(("reduction", "use_bias", "grad_scale"),
                         [("mean", True, 1.7), ("none", False, 0.6), ("sum", True, 1.0)])
def test_bfloat16_gradients_with_and_without_the_mixed_gemm(monkeypatch, mixed_gemm, reduction,
                                                            use_bias, grad_scale):
    """The bfloat16 CPU gradients by MKL's bf16 x bf16 -> float32 gemm (summed over chunks in
    float32, grad_output as its alpha) and by the generic ATen path agree with the float64
    composition of the same values, over chunks that do not divide N, 3-D input."""
    if mixed_gemm == "1" and not MIXED_GEMM:
        pytest.skip("torch carries no MKL cblas_gemm_bf16bf16f32")
    monkeypatch.setenv("KDFAST_MIXED_GEMM", mixed_gemm)
    h, w, b, th, tw, tb, y = make(batch=(3, 17), hidden=24, classes=300, dtype=torch.bfloat16)
    (loss, grads), (ref, ref_grads) = fused_and_reference(
        h, w, b, th, tw, tb, y, form="logits", use_bias=use_bias, grad_scale=grad_scale,
        temperature=2.0, alpha=0.5, reduction=reduction, chunk_rows=7)
    torch.testing.assert_close(loss.double(), ref, rtol=3e-2, atol=3e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == torch.bfloat16
        scale = r.abs().max()
        torch.testing.assert_close(g.double() / scale, r / scale, rtol=0.1, atol=0.1 / 8)


@pytest.mark.skipif(not MIXED_GEMM, reason="torch carries no MKL cblas_gemm_bf16bf16f32")
def test_bfloat16_gradient_products_go_through_the_mixed_gemm(monkeypatch):
    h, w, b, th, tw, tb, y = make(batch=(30,), dtype=torch.bfloat16)
    teacher = F.linear(th, tw, tb)

    def aten_products(setting):
        monkeypatch.setenv("KDFAST_MIXED_GEMM", setting)
        params = [t.clone().requires_grad_() for t in (h, w, b)]
        with torch.profiler.profile() as prof:
            kdfast.linear_distillation_loss(params[0], params[1], y, student_bias=params[2],
                                            teacher_logits=teacher, chunk_rows=10).backward()
        return sum(e.count for e in prof.key_averages() if e.key == "aten::mm")

    assert aten_products("1") == 0  # the logits' addmm only; the products by MKL
    assert aten_products("0") == 6  # hidden and weight products of 3 chunks


@pytest.mark.parametrize(("dtype", "hidden", "grad", "chunks"), [
    (torch.float32, 16, True, 1),      # 1100 x 37 logits: far below the 2^26 budget
    (torch.bfloat16, 16, False, 1),    # no gradient, no float32 sum: the logits budget
    (torch.bfloat16, 16, True, 3),     # 512-row chunks (1100 / 512 = 2.1: 3 even chunks)
    (torch.bfloat16, 1500, True, 2),   # H / 2 = 750 rows per chunk at most
])
def test_default_chunks(dtype, hidden, grad, chunks):
    h, w, b, th, tw, tb, y = make(batch=(1100,), hidden=hidden, dtype=dtype)
    teacher = F.linear(th, tw, tb)
    w.requires_grad_(grad)
    with torch.set_grad_enabled(grad), torch.profiler.profile() as prof:
        kdfast.linear_distillation_loss(h, w, y, student_bias=b, teacher_logits=teacher)
    assert sum(e.count for e in prof.key_averages() if e.key == "aten::addmm") == chunks


def test_no_gradient_matmul_under_no_grad():
    h, w, b, th, tw, tb, y = make(batch=(30,), dtype=torch.float32)
    w.requires_grad_()
    teacher = F.linear(th, tw, tb)

    def matmuls(grad_enabled):
        with torch.set_grad_enabled(grad_enabled), torch.profiler.profile() as prof:
            kdfast.linear_distillation_loss(h, w, y, teacher_logits=teacher, chunk_rows=10)
        names = ("aten::mm", "aten::addmm", "aten::addmm_")
        return sum(e.count for e in prof.key_averages() if e.key in names)

    assert matmuls(False) == 3  # one logits matmul per chunk
    assert matmuls(True) == 9  # + hidden and weight gradients


def test_tied_weights_accumulate_both_uses():
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(50, 16, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 50, (4, 9), generator=g)
    teacher = torch.randn(4, 9, 50, generator=g, dtype=torch.float64)
    y = torch.randint(0, 50, (4, 9), generator=g)

    def grad_of(loss_fn):
        w = emb.clone().requires_grad_()
        hidden = torch.tanh(F.embedding(tokens, w))
        loss_fn(hidden, w).backward()
        return w.grad

    fused = grad_of(lambda hid, w: kdfast.linear_distillation_loss(
        hid, w, y, teacher_logits=teacher, temperature=2.0, chunk_rows=5))
    unfused = grad_of(lambda hid, w: reference.distillation_loss(
        hid @ w.T, teacher, y, temperature=2.0))
    torch.testing.assert_close(fused, unfused, rtol=1e-10, atol=1e-12)


def test_autocast_behaves_like_the_unfused_path():
    h, w, b, th, tw, tb, y = make(batch=(24,), hidden=32, classes=100, dtype=torch.float32)
    teacher = F.linear(th, tw, tb)
    results = []
    for fused in (True, False):
        params = [t.clone().requires_grad_() for t in (h, w, b)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if fused:
                loss = kdfast.linear_distillation_loss(params[0], params[1], y,
                                                       student_bias=params[2],
                                                       teacher_logits=teacher)
            else:
                loss = kdfast.distillation_loss(F.linear(*params), teacher, y)
        loss.backward()
        results.append((loss, [p.grad for p in params]))
    (loss, grads), (ref, ref_grads) = results
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-3)


def test_gradcheck():
    h, w, b, th, tw, tb, y = make(batch=(5,), hidden=4, classes=6)
    params = [t.requires_grad_() for t in (h, w, b)]

    def fn(hid, weight, bias):
        return kdfast.linear_distillation_loss(hid, weight, y, student_bias=bias,
                                               teacher_hidden=th, teacher_weight=tw,
                                               temperature=2.0, kind="jsd", chunk_rows=2)

    assert torch.autograd.gradcheck(fn, params)


def test_opcheck():
    h, w, b, th, tw, tb, y = make(batch=(9,), dtype=torch.float32)
    args = (h, w, b, y, None, th, tw, tb, None, None, None, 2.0, 2.0, 0.5, "kl", 0.5, -100, 0.0,
            True, 4, True, torch.tensor([0.25]))
    torch.library.opcheck(torch.ops.kdfast.linear_distill_fwd.default, args)
    no_grad = (h, w, None, None, F.linear(th, tw, tb), None, None, None, None, None, None, 1.0,
               1.0, 0.5, "jsd", 0.5, -100, 0.0, True, 0, False, None)
    torch.library.opcheck(torch.ops.kdfast.linear_distill_fwd.default, no_grad)


def test_torch_compile_fullgraph_step():
    h, w, b, th, tw, tb, y = make(batch=(16,), dtype=torch.float32)
    teacher = F.linear(th, tw, tb)
    layer = torch.nn.Linear(12, 37)

    def step(x):
        return kdfast.linear_distillation_loss(x, layer.weight, y, student_bias=layer.bias,
                                               teacher_logits=teacher, temperature=2.0)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(h)
    loss.backward()
    compiled_grad = layer.weight.grad.clone()
    layer.weight.grad = None
    ref = step(h)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(compiled_grad, layer.weight.grad)


def test_module_form_and_config():
    h, w, b, th, tw, tb, y = make(batch=(8,))
    loss_fn = kdfast.LinearKDLoss(temperature=3, alpha=0.25, kind="jsd", chunk_rows=3)
    assert kdfast.LinearKDLoss(**loss_fn.config()).config() == loss_fn.config()
    assert "kind='jsd'" in repr(loss_fn)
    by_module = loss_fn(h, w, y, teacher=(th, tw, tb), bias=b)
    by_function = kdfast.linear_distillation_loss(
        h, w, y, student_bias=b, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb,
        temperature=3.0, alpha=0.25, kind="jsd")
    torch.testing.assert_close(by_module, by_function)
    torch.testing.assert_close(loss_fn(h, w, y, teacher=F.linear(th, tw, tb), bias=b), by_function)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one teacher form"),
        ({"teacher_logits": "T", "teacher_hidden": "TH"}, ValueError, "exactly one teacher form"),
        ({"teacher_hidden": "TH"}, ValueError, "teacher_hidden needs teacher_weight"),
        ({"teacher_logits": "T", "chunk_rows": 0}, ValueError, "chunk_rows must be"),
        ({"teacher_logits": "T", "teacher_temperature": 3.0}, ValueError, "teacher_temperature"),
        ({"teacher_logits": "T", "temperature": 0.0}, ValueError, "temperature must be"),
        ({"teacher_logits": "T_grad"}, ValueError, "teacher_logits requires grad"),
        ({"teacher_hidden": "TH_grad", "teacher_weight": "TW"}, ValueError,
         "teacher_hidden requires grad"),
        ({"teacher_logits": "T_short"}, ValueError, "teacher_logits shape"),
        ({"teacher_sparse": "S", "tail": "bucket"}, ValueError, "tail_logsumexp"),
        ({"teacher_sparse": "S", "tail": "other"}, ValueError, "tail"),
        ({"teacher_sparse": "S_bad_shape"}, ValueError, "teacher.indices shape"),
        ({"teacher_sparse": "S_out_of_range"}, ValueError, "teacher.indices"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    h, w, b, th, tw, tb, y = make(batch=(6,), dtype=torch.float32)
    values = {"T": F.linear(th, tw, tb), "TH": th, "TW": tw, "T_short": F.linear(th, tw, tb)[:5],
              "T_grad": F.linear(th, tw, tb).requires_grad_(), "TH_grad": th.requires_grad_(),
              "S": kdfast.SparseTargets(torch.arange(12).view(6, 2), torch.zeros(6, 2)),
              "S_bad_shape": kdfast.SparseTargets(torch.arange(10).view(5, 2), torch.zeros(5, 2)),
              "S_out_of_range": kdfast.SparseTargets(torch.full((6, 2), 99), torch.zeros(6, 2))}
    with pytest.raises(error, match=match):
        kdfast.linear_distillation_loss(h, w, y, **{k: values.get(v, v) if isinstance(v, str) else v
                                                    for k, v in kwargs.items()})


def test_layer_shape_and_dtype_errors_name_the_argument():
    h, w, b, th, tw, tb, y = make(batch=(6,), dtype=torch.float32)
    teacher = F.linear(th, tw, tb)
    with pytest.raises(ValueError, match="student_weight must be"):
        kdfast.linear_distillation_loss(h, w.T, y, teacher_logits=teacher)
    with pytest.raises(ValueError, match="student_weight dtype"):
        kdfast.linear_distillation_loss(h, w.double(), y, teacher_logits=teacher)
    with pytest.raises(ValueError, match="student_bias must be"):
        kdfast.linear_distillation_loss(h, w, y, student_bias=b[:3], teacher_logits=teacher)
    with pytest.raises(ValueError, match="target shape"):
        kdfast.linear_distillation_loss(h, w, y[:3], teacher_logits=teacher)


def test_reduction_none_with_a_different_grad_output_per_row():
    h, w, b, th, tw, tb, y = make(batch=(4, 5))
    weights = torch.rand(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    teacher = F.linear(th, tw, tb)
    params = [t.clone().requires_grad_() for t in (h, w, b)]
    rows = kdfast.linear_distillation_loss(params[0], params[1], y, student_bias=params[2],
                                           teacher_logits=teacher, reduction="none", chunk_rows=3)
    (rows * weights).sum().backward()
    ref_params = [t.clone().requires_grad_() for t in (h, w, b)]
    ref_rows = reference.distillation_loss(F.linear(*ref_params), teacher, y, reduction="none")
    (ref_rows * weights).sum().backward()
    torch.testing.assert_close(rows, ref_rows, rtol=1e-10, atol=1e-12)
    for p, r in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-9, atol=1e-11)


def test_a_retained_graph_gives_the_same_gradients_again():
    h, w, b, th, tw, tb, y = make(batch=(10,))
    w.requires_grad_()
    loss = kdfast.linear_distillation_loss(h, w, y, teacher_logits=F.linear(th, tw, tb),
                                           chunk_rows=4)
    (first,) = torch.autograd.grad(loss, w, retain_graph=True)
    first = first.clone()
    (second,) = torch.autograd.grad(loss * 3, w)
    torch.testing.assert_close(second, 3 * first, rtol=1e-12, atol=1e-14)


def sparse_teacher(z: torch.Tensor, k: int, t_t: float, seed: int = 0) -> kdfast.SparseTargets:
    """k teacher ids per row (random, not the top ones) with -1 slots and an empty row; the
    exact tail logsumexp at T_t."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(z.shape[-1], generator=g)[:k] for _ in range(z[..., 0].numel())])
    ids = ids.view(*z.shape[:-1], k)
    ids.view(-1, k)[::3, -1] = -1
    ids.view(-1, k)[1] = -1
    logits = z.gather(-1, ids.clamp(min=0))
    rest = z.scatter(-1, ids.clamp(min=0), float("-inf"))
    rest.view(-1, z.shape[-1])[1] = (z.view(-1, z.shape[-1])[1])  # the empty row keeps every class
    return kdfast.SparseTargets(ids, logits, torch.logsumexp(rest / t_t, dim=-1))


@pytest.mark.parametrize(("tail", "kind"), [("renormalize", "kl"), ("bucket", "kl"),
                                            ("bucket", "reverse_kl"), ("bucket", "jsd")])
@pytest.mark.parametrize("with_target", [True, False])
@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_sparse_teacher_matches_the_sparse_loss_on_materialized_logits(tail, kind, with_target,
                                                                         chunk_rows):
    h, w, b, th, tw, tb, y = make(batch=(3, 5), classes=40)
    teacher = sparse_teacher(F.linear(th, tw, tb), k=6, t_t=1.5)
    y = y if with_target else None
    kw = {"tail": tail, "kind": kind, "temperature": 2.0, "teacher_temperature": 1.5,
          "alpha": 0.6, "label_smoothing": 0.05}
    params = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = kdfast.linear_distillation_loss(params[0], params[1], y, student_bias=params[2],
                                           teacher_sparse=teacher, chunk_rows=chunk_rows, **kw)
    (loss * 1.7).backward()
    ref_params = [t.clone().requires_grad_() for t in (h, w, b)]
    ref = reference.sparse_distillation_loss(F.linear(*ref_params), teacher, y, **kw)
    (ref * 1.7).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for p, r in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sparse_teacher_low_precision(dtype):
    h, w, b, th, tw, tb, y = make(batch=(24,), hidden=16, classes=200, dtype=dtype)
    teacher = sparse_teacher(F.linear(th, tw, tb).float(), k=8, t_t=2.0)
    params = [t.clone().requires_grad_() for t in (h, w, b)]
    loss = kdfast.linear_distillation_loss(params[0], params[1], y, student_bias=params[2],
                                           teacher_sparse=teacher, tail="bucket", temperature=2.0,
                                           chunk_rows=10)
    loss.backward()
    ref_params = [t.detach().double().requires_grad_() for t in (h, w, b)]
    ref = reference.sparse_distillation_loss(F.linear(*ref_params), teacher, y, tail="bucket",
                                             temperature=2.0)
    ref.backward()
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    for p, r in zip(params, ref_params, strict=True):
        assert p.grad.dtype == dtype
        scale = r.grad.abs().max()
        torch.testing.assert_close(p.grad.double() / scale, r.grad / scale, rtol=4 * tol, atol=4 * tol)


def test_sparse_teacher_module_form_and_opcheck():
    h, w, b, th, tw, tb, y = make(batch=(9,), dtype=torch.float32)
    teacher = sparse_teacher(F.linear(th, tw, tb), k=5, t_t=1.0)
    by_module = kdfast.LinearKDLoss(tail="bucket")(h, w, y, teacher=teacher, bias=b)
    by_function = kdfast.linear_distillation_loss(h, w, y, student_bias=b, teacher_sparse=teacher,
                                                  tail="bucket")
    torch.testing.assert_close(by_module, by_function)
    args = (h, w, b, y, None, None, None, None, teacher.indices, teacher.logits,
            teacher.tail_logsumexp, 2.0, 1.0, 0.5, "kl", 0.5, -100, 0.0, True, 4, True,
            torch.tensor([0.5]))
    torch.library.opcheck(torch.ops.kdfast.linear_distill_fwd.default, args)
