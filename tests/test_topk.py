"""kdfast.topk_targets and the compiled builder op (torch.ops.kdfast.topk_targets), against a
float64 oracle: a stable descending sort for the ids, torch.logsumexp for the tails."""

import math
import os
from contextlib import contextmanager

import pytest
import torch

import kdfast
from kdfast.topk import uses_compiled_op

HAS_OP = kdfast.HAS_EXTENSION
needs_op = pytest.mark.skipif(not HAS_OP, reason="needs the compiled extension")
TEMPS = (1.0, 2.0, 20.0)
ISAS = kdfast.build_info().get("cpu_isas_supported", []) if HAS_OP else []


def oracle(z: torch.Tensor, k: int, temperatures):
    """Ids, values and tails from the exact inputs widened to float64 (never re-rounded)."""
    z = z.double()
    ids = torch.sort(z, dim=-1, descending=True, stable=True).indices[..., :k]
    rest = z.scatter(-1, ids, -math.inf)
    tails = torch.stack([torch.logsumexp(rest / t, dim=-1) for t in temperatures], dim=-1)
    return ids, z.gather(-1, ids), tails


def assert_matches_oracle(out, z, k, temperatures):
    ids, values, tails = oracle(z, k, temperatures)
    lead = tuple(z.shape[:-1])
    assert out.indices.shape == out.logits.shape == lead + (k,)
    assert out.tail_logsumexp.shape == lead + (len(temperatures),)
    assert out.indices.dtype == torch.int64
    wide = torch.float64 if z.dtype == torch.float64 else torch.float32
    assert out.logits.dtype == out.tail_logsumexp.dtype == wide
    assert torch.equal(out.indices, ids)
    assert torch.equal(out.logits.double(), values)
    torch.testing.assert_close(out.tail_logsumexp.double(), tails, rtol=1e-5, atol=1e-6)


@contextmanager
def env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def random_rows(shape, dtype, seed, scale=4.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


# ---- the public function (compiled op where it applies, reference for float64) ----

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("k", [1, 7, 99, 100])
def test_topk_targets_match_the_oracle(dtype, k):
    z = random_rows((3, 5, 100), dtype, seed=k)
    assert_matches_oracle(kdfast.topk_targets(z, k, TEMPS), z, k, TEMPS)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_public_function_uses_the_op(dtype):
    z = random_rows((2, 10), dtype, seed=0)
    assert uses_compiled_op(z)
    assert not uses_compiled_op(z.double())
    assert not uses_compiled_op(z.float().requires_grad_())


def test_ties_are_broken_by_smaller_id():
    z = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]])
    assert kdfast.topk_targets(z, 2).indices.tolist() == [[1, 2]]


def test_unselected_ties_at_the_kth_value_are_in_the_tail():
    # Selected: ids 0 and 1 (3.0, 3.0); the tail is {3.0 (id 2), 1.0}.
    z = torch.tensor([[3.0, 3.0, 3.0, 1.0]])
    out = kdfast.topk_targets(z, 2, (1.0, 2.0))
    assert out.indices.tolist() == [[0, 1]]
    expected = [math.log(math.exp(3.0) + math.exp(1.0)), math.log(math.exp(1.5) + math.exp(0.5))]
    torch.testing.assert_close(out.tail_logsumexp[0].double(), torch.tensor(expected, dtype=torch.float64))


# ---- the compiled op ----

def op(z, k, temperatures=TEMPS):
    return kdfast.TopKTargets(*torch.ops.kdfast.topk_targets(z, k, list(temperatures)))


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_cols", [1, 2, 63, 1000, 4097])
def test_op_random_rows(dtype, n_cols):
    z = random_rows((2, 3, n_cols), dtype, seed=n_cols)
    for k in sorted({1, min(64, n_cols), max(1, n_cols - 1), n_cols}):
        assert_matches_oracle(op(z, k), z, k, TEMPS)


@needs_op
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("prefetch", ["0", "1"])
def test_op_every_isa_and_prefetch_mode(isa, prefetch):
    z = random_rows((6, 3001), torch.float32, seed=1)
    with env("KDFAST_CPU_ISA", isa), env("KDFAST_TOPK_PREFETCH", prefetch):
        for k in (1, 64, 3000):
            assert_matches_oracle(op(z, k), z, k, TEMPS)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_op_ties_everywhere(dtype):
    # Integer logits in a small range: long runs of equal values, ties at every k-th value.
    z = torch.randint(-3, 4, (16, 700), generator=torch.Generator().manual_seed(2)).to(dtype)
    for k in (1, 5, 64, 350, 699, 700):
        assert_matches_oracle(op(z, k), z, k, TEMPS)


@needs_op
def test_op_ascending_and_descending_rows():
    # Ascending: every element enters the candidate buffer (many compactions).
    ramp = torch.arange(5000, dtype=torch.float32) / 100
    z = torch.stack([ramp, ramp.flip(0), torch.zeros(5000)])
    for k in (1, 64, 300, 4999):
        assert_matches_oracle(op(z, k), z, k, TEMPS)


@needs_op
def test_op_masked_entries():
    z = random_rows((6, 300), torch.float32, seed=3)
    z[0, ::2] = -math.inf                  # half the row masked
    z[1, 5:] = -math.inf                   # fewer than k + 1 finite entries
    z[2] = -math.inf                       # all masked
    z[3, 0] = -math.inf                    # one masked entry at the start
    z[4, :150] = -math.inf                 # masked prefix
    z[5, 64:] = -math.inf                  # exactly k finite entries: the tail is all -inf
    for k in (1, 5, 64, 65, 299, 300):
        assert_matches_oracle(op(z, k), z, k, TEMPS)


@needs_op
def test_op_signed_zeros_tie():
    z = torch.tensor([[-0.0, 0.0, -1.0]])
    assert op(z, 1).indices.tolist() == [[0]]


@needs_op
def test_op_extreme_magnitudes():
    # Tail terms that underflow float32 next to the tail maximum's term (exactly 1); every
    # tail log-sum-exp stays within float32's range (z / T of -3e34 at T = 1e-3 is -3e37).
    z = torch.tensor([[1e4, 5e3, 0.0, -1e4, -3e34, 3e38]])
    for k in (1, 2, 5):
        assert_matches_oracle(op(z, k, (1.0, 1e-3, 1e6)), z, k, (1.0, 1e-3, 1e6))


@needs_op
def test_op_strided_and_empty_inputs():
    wide = random_rows((8, 900), torch.float32, seed=4)
    sliced = wide[:, :700]                 # row stride 900
    transposed = random_rows((700, 8), torch.float32, seed=5).t()  # class stride 8
    for z in (sliced, transposed, wide[::2]):
        assert_matches_oracle(op(z, 64), z, 64, TEMPS)
    empty = torch.zeros(0, 3, 50)
    out = op(empty, 4)
    assert out.indices.shape == (0, 3, 4) and out.tail_logsumexp.shape == (0, 3, 3)


@needs_op
def test_op_threads_agree():
    z = random_rows((64, 2000), torch.bfloat16, seed=6)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(z, 32)
        torch.set_num_threads(max(2, previous))
        many = op(z, 32)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


@needs_op
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_large_vocabulary(dtype):
    z = random_rows((3, 131072), dtype, seed=7)
    z[1, ::3] = -math.inf
    for k in (1, 64, 131071, 131072):
        assert_matches_oracle(op(z, k), z, k, TEMPS)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck(dtype):
    z = random_rows((2, 3, 130), dtype, seed=8)
    torch.library.opcheck(torch.ops.kdfast.topk_targets.default, (z, 5, [1.0, 4.0]))
    torch.library.opcheck(torch.ops.kdfast.topk_targets.default, (z[:, 0], 130, [0.5]))


@needs_op
def test_op_compiles_fullgraph():
    z = random_rows((4, 500), torch.float32, seed=9)

    def build(t):
        out = torch.ops.kdfast.topk_targets(t, 8, [1.0, 2.0])
        return out[0], out[1] * 2, out[2]

    compiled = torch.compile(build, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(z), build(z), strict=True):
        assert torch.equal(a, b)


# ---- errors ----

@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(2, 4), 0), "k: expected"),
        ((torch.zeros(2, 4), 5), "k: expected"),
        ((torch.zeros(2, 4, dtype=torch.long), 1), "teacher_logits: expected a floating"),
        ((torch.tensor([[0.0, math.nan]]), 1), "teacher_logits: NaN"),
        ((torch.tensor([[0.0, math.inf]]), 1), "teacher_logits: NaN or \\+inf"),
        ((torch.tensor([[0.0, math.nan]], dtype=torch.float64), 1), "teacher_logits: NaN"),
        ((torch.zeros(2, 4), 1, (1.0, 0.0)), "temperatures: expected"),
        ((torch.zeros(2, 4), 1, ()), "temperatures: expected"),
    ],
)
def test_bad_arguments_are_named(args, match):
    with pytest.raises((TypeError, ValueError), match=match):
        kdfast.topk_targets(*args)


@needs_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("position", [0, 64, 4999])
def test_op_refuses_nan_and_posinf_anywhere(dtype, bad, position):
    z = random_rows((5, 5000), torch.float32, seed=10)
    z[3, position] = bad
    z = z.to(dtype)
    with pytest.raises(ValueError, match="teacher_logits: NaN or \\+inf entries .*row 3"):
        op(z, 64)


@needs_op
@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(2, 4), 0, [1.0]), "k: expected an int in \\[1, C = 4\\], got 0"),
        ((torch.zeros(2, 4), 5, [1.0]), "k: expected an int in \\[1, C = 4\\], got 5"),
        ((torch.zeros(2, 4), 1, []), "temperatures: expected one or more"),
        ((torch.zeros(2, 4), 1, [1.0, -2.0]), "temperatures: expected one or more"),
        ((torch.zeros(2, 4), 1, [math.inf]), "temperatures: expected one or more"),
        ((torch.zeros(2, 4, dtype=torch.float64), 1, [1.0]), "teacher_logits: expected float32"),
        ((torch.zeros(2, 0), 1, [1.0]), "teacher_logits: expected shape"),
        ((torch.tensor(1.0), 1, [1.0]), "teacher_logits: expected shape"),
    ],
)
def test_op_bad_arguments_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.kdfast.topk_targets(*args)


def test_builder_bench_row(tmp_path):
    from kdfast.bench.builder import run_builder_bench

    result = run_builder_bench((8, 300), k=5, threads=1, repeats=3, out_dir=tmp_path)
    assert result["kdfast"]["median_ms"] > 0 and result["torch"]["median_ms"] > 0
    assert "| 8 | 300 | 5 |" in (tmp_path / "builder.md").read_text()
