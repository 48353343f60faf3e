"""Shared helpers for the kdfast test suite.

- ``pairwise``: a tiny covering-array generator (strength 2), so grids cover every pair of
  values of different factors without the full product.
- Input factories: logits in a given memory layout (contiguous, transposed, strided/sliced
  along rows or classes), teacher masks, targets with ignored rows.
- ``run_fused_and_reference``: runs kdfast.distillation_loss and kdfast.reference on the *same*
  values (low-precision inputs are upcast for the reference, never re-rounded) and returns
  both losses and both student gradients.
- ``row_loss_atol`` / ``grad_error_bound``: the error model behind every comparison (see their
  docstrings); ``check_case`` applies it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

import kdfast
from kdfast import reference

KINDS = ("kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "batchmean", "sum", "none")
IGNORE = -100

# Unit roundoff (half an ulp at 1.0) of the types the kernels accumulate in / store into.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    random.seed(0)
    yield


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Pairwise (strength-2) covering arrays
# --------------------------------------------------------------------------------------------


def _pairs_of(row: Sequence[int]) -> set[tuple[int, int, int, int]]:
    n = len(row)
    return {(i, row[i], j, row[j]) for i in range(n) for j in range(i + 1, n)}


def pairwise(
    factors: dict[str, Sequence],
    allowed: Callable[[dict], bool] = lambda partial: True,
    *,
    seed: int = 0,
    candidates: int = 24,
) -> list[dict]:
    """Rows (dicts factor -> value) such that every pair of values of two different factors
    appears in at least one row, except pairs that ``allowed`` rejects.

    ``allowed(partial_row)`` gets a dict of *some* factors and must return False only when the
    values given already violate a constraint; constraints must be between two factors (then
    every allowed pair can be completed into an allowed row). Greedy AETG construction,
    deterministic for a given seed.
    """
    names = list(factors)
    sizes = [len(factors[n]) for n in names]

    def named(partial: dict[int, int]) -> dict:
        return {names[k]: factors[names[k]][v] for k, v in partial.items()}

    uncovered = {
        (i, a, j, b)
        for i in range(len(names))
        for j in range(i + 1, len(names))
        for a in range(sizes[i])
        for b in range(sizes[j])
        if allowed(named({i: a, j: b}))
    }
    rng = random.Random(seed)
    rows: list[dict] = []
    while uncovered:
        ordered = sorted(uncovered)
        best_row, best_gain = None, -1
        for _ in range(candidates):
            i, a, j, b = rng.choice(ordered)
            row = {i: a, j: b}
            rest = [k for k in range(len(names)) if k not in row]
            rng.shuffle(rest)
            for k in rest:
                choices = list(range(sizes[k]))
                rng.shuffle(choices)
                pick, pick_gain = None, -1
                for v in choices:
                    trial = {**row, k: v}
                    if not allowed(named(trial)):
                        continue
                    gain = sum(
                        (min(k, m), trial[min(k, m)], max(k, m), trial[max(k, m)]) in uncovered
                        for m in row
                    )
                    if gain > pick_gain:
                        pick, pick_gain = v, gain
                if pick is None:
                    raise ValueError(f"pairwise: no allowed value for {names[k]} in {named(row)}")
                row[k] = pick
            full = [row[k] for k in range(len(names))]
            gain = len(_pairs_of(full) & uncovered)
            if gain > best_gain:
                best_row, best_gain = full, gain
        uncovered -= _pairs_of(best_row)
        rows.append(named(dict(enumerate(best_row))))
    return rows


def missing_pairs(rows: list[dict], factors: dict[str, Sequence], allowed=lambda p: True) -> list:
    """The allowed value pairs that no row covers (empty for a valid covering array)."""
    names = list(factors)
    missing = []
    for i, ni in enumerate(names):
        for nj in names[i + 1:]:
            for a in factors[ni]:
                for b in factors[nj]:
                    if not allowed({ni: a, nj: b}):
                        continue
                    if not any(r[ni] == a and r[nj] == b for r in rows):
                        missing.append((ni, a, nj, b))
    return missing


def case_id(row: dict) -> str:
    def short(v):
        if isinstance(v, torch.dtype):
            return str(v).replace("torch.", "")
        return str(v)

    return "-".join(f"{k}={short(v)}" for k, v in row.items())


# --------------------------------------------------------------------------------------------
# Input factories
# --------------------------------------------------------------------------------------------

LAYOUTS = ("contiguous", "transposed", "row_strided", "col_sliced", "col_strided")


def batch_shape_for(n_rows: int, ndim: int) -> tuple[int, ...]:
    """(N,) for 2-D logits, (B, T) with B*T = N for 3-D ones."""
    if ndim == 2:
        return (n_rows,)
    if n_rows == 0:
        return (0, 3)
    b = 1
    for cand in range(int(math.isqrt(n_rows)), 0, -1):
        if n_rows % cand == 0:
            b = cand
            break
    return (b, n_rows // b)


def layout_base_shape(batch: tuple[int, ...], n_cols: int, layout: str) -> tuple[int, ...]:
    if layout == "contiguous":
        return (*batch, n_cols)
    if layout == "transposed":
        return (n_cols, *batch)
    if layout == "row_strided":
        return (*batch[:-1], 2 * batch[-1], n_cols)
    if layout == "col_sliced":
        return (*batch, n_cols + 5)
    if layout == "col_strided":
        return (*batch, 2 * n_cols)
    raise ValueError(layout)


def layout_view(base: torch.Tensor, n_cols: int, layout: str) -> torch.Tensor:
    """The (..., C) logical logits inside ``base`` (a view, never a copy)."""
    if layout == "contiguous":
        return base
    if layout == "transposed":
        return base.movedim(0, -1)
    if layout == "row_strided":
        return base[..., ::2, :]
    if layout == "col_sliced":
        return base[..., 3:3 + n_cols]
    if layout == "col_strided":
        return base[..., ::2]
    raise ValueError(layout)


@dataclass
class Logits:
    """Logits stored in ``base`` (contiguous) and seen through ``view(base)``."""

    base: torch.Tensor
    n_cols: int
    layout: str

    def view(self, base: torch.Tensor | None = None) -> torch.Tensor:
        return layout_view(self.base if base is None else base, self.n_cols, self.layout)

    @property
    def value(self) -> torch.Tensor:
        return self.view()


def make_logits(
    batch: tuple[int, ...],
    n_cols: int,
    *,
    dtype: torch.dtype = torch.float64,
    scale: float = 1.0,
    layout: str = "contiguous",
    seed: int = 0,
) -> Logits:
    base_shape = layout_base_shape(batch, n_cols, layout)
    base = (torch.randn(base_shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)
    logits = Logits(base, n_cols, layout)
    v = logits.value
    assert v.shape == (*batch, n_cols)
    if layout != "contiguous" and v.numel() > 0 and n_cols > 1 and len(batch) and batch[-1] > 1:
        assert not v.is_contiguous()
    return logits


def mask_teacher_(teacher: torch.Tensor, *, fraction: float = 0.3, seed: int = 1) -> torch.Tensor:
    """Sets about ``fraction`` of each row to -inf in place, keeping one finite entry per row
    (a fully masked row has no distribution). Returns the mask."""
    n_cols = teacher.shape[-1]
    g = gen(seed)
    mask = torch.rand(teacher.shape, generator=g) < fraction
    if teacher.numel():
        keep = torch.randint(0, n_cols, teacher.shape[:-1], generator=g)
        mask.scatter_(-1, keep.unsqueeze(-1), False)
    teacher.masked_fill_(mask, float("-inf"))
    return mask


TARGET_MODES = ("labels", "ignored", "all_ignored", "none")


def make_target(
    batch: tuple[int, ...], n_cols: int, mode: str, *, seed: int = 2, ignore_index: int = IGNORE
) -> torch.Tensor | None:
    """Class indices of shape ``batch``: all valid ("labels"), about a quarter set to
    ignore_index with at least one ignored and one counted row when there is room
    ("ignored"), every row ignored ("all_ignored"), or None."""
    if mode == "none":
        return None
    g = gen(seed)
    y = torch.randint(0, n_cols, batch, generator=g)
    flat = y.view(-1)
    if mode == "ignored":
        flat[torch.rand(flat.shape, generator=g) < 0.25] = ignore_index
        if flat.numel() >= 1:
            flat[0] = ignore_index
        if flat.numel() >= 2:
            flat[-1] = int(torch.randint(0, n_cols, (), generator=g))
    elif mode == "all_ignored":
        flat.fill_(ignore_index)
    else:
        assert mode == "labels"
    return y


# --------------------------------------------------------------------------------------------
# Running both implementations
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    loss: torch.Tensor
    grad: torch.Tensor | None  # gradient of the student's storage (the base leaf)
    ref_loss: torch.Tensor
    ref_grad: torch.Tensor | None
    upstream: torch.Tensor | None


def make_upstream(loss_shape: torch.Size, how: str | float, *, seed: int = 3) -> torch.Tensor:
    """float64 upstream gradient values, representable in float32 (the fused loss' dtype)."""
    if how == "random":
        g = torch.randn(loss_shape, generator=gen(seed), dtype=torch.float64)
    else:
        g = torch.full(loss_shape, float(how), dtype=torch.float64)
    return g.to(torch.float32).to(torch.float64)


def run_fused_and_reference(
    student: Logits,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    *,
    upstream: str | float | None = 1.0,
    inplace: bool = False,
    ref_dtype: torch.dtype = torch.float64,
    **kwargs,
) -> Result:
    """Fused loss (and d loss / d student.base via autograd with the given upstream gradient)
    next to the reference computed in ``ref_dtype`` from the same values upcast exactly.

    ``upstream``: None (no backward), a number (grad_output, e.g. 3.7) or "random" (a random
    upstream tensor, for reduction="none").
    """
    want_grad = upstream is not None
    leaf = student.base.detach().clone().requires_grad_(want_grad)
    logits = student.view(leaf.clone() if inplace else leaf)
    loss = kdfast.distillation_loss(logits, teacher, target, inplace=inplace, **kwargs)

    ref_leaf = student.base.detach().to(ref_dtype).requires_grad_(want_grad)
    ref_loss = reference.distillation_loss(
        student.view(ref_leaf), teacher.to(ref_dtype), target, **kwargs
    )
    grad = ref_grad = go = None
    if want_grad:
        go = make_upstream(loss.shape, upstream).to(loss.device)
        (grad,) = torch.autograd.grad(loss, leaf, go.to(loss.dtype))
        (ref_grad,) = torch.autograd.grad(ref_loss, ref_leaf, go.to(ref_dtype))
    return Result(loss.detach(), grad, ref_loss.detach(), ref_grad, go)


# --------------------------------------------------------------------------------------------
# Error model and comparisons
# --------------------------------------------------------------------------------------------


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The kernels accumulate in float64 when an input is float64, else in float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def finite_max_abs(*tensors: torch.Tensor | None) -> float:
    m = 0.0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        a = t.detach().abs()
        m = max(m, float(torch.where(torch.isfinite(a), a, torch.zeros_like(a)).max()))
    return m


def row_loss_atol(
    *, acc: torch.dtype, n_cols: int, max_logit: float, temperature: float, alpha: float,
    has_target: bool, scale_by_t2: bool = True,
) -> float:
    """Absolute error bound of one row's loss when the kernel accumulates in ``acc``.

    The soft term is a p-weighted sum of log ratios (t - s)/T + (lse(a) - lse(b)); each log
    ratio carries an absolute error of a few ulps of its largest part, |logit|/T + log C, and
    the exp sums inside the lse carry a relative summation error that grows like sqrt(C)
    (SIMD lanes, different order than torch). That absolute error is then multiplied by the
    soft coefficient alpha*T**2 (so at T = 100 a float32 kernel legitimately differs by
    ~1e-3 relative: the KL itself is ~1e-4 before the T**2 factor). The hard term is a
    log-sum-exp of the raw logits: a few ulps of |logit| + log C.
    """
    u = UNIT_ROUNDOFF[acc]
    a = alpha if has_target else 1.0
    soft_coef = a * (temperature**2 if scale_by_t2 else 1.0)
    hard_coef = (1.0 - alpha) if has_target else 0.0
    log_c = math.log(max(n_cols, 2))
    soft = soft_coef * (2.0 * max_logit / temperature + log_c + math.sqrt(n_cols))
    hard = hard_coef * (2.0 * max_logit + log_c + math.sqrt(n_cols))
    return 16.0 * u * (soft + hard + 1.0)


def assert_loss_close(res: Result, *, row_atol: float, reduction: str, n_rows: int, acc: torch.dtype):
    """Loss vs reference: per-row absolute error ``row_atol``; "sum" adds up n_rows of them;
    the reduction's own summation adds a relative error of a few ulps times sqrt(N)."""
    atol = row_atol * (max(n_rows, 1) if reduction == "sum" else 1.0)
    rtol = 16.0 * UNIT_ROUNDOFF[acc] * math.sqrt(max(n_rows, 1)) + 4.0 * UNIT_ROUNDOFF[acc]
    assert res.loss.dtype == (torch.float64 if acc == torch.float64 else torch.float32)
    assert not torch.isnan(res.loss).any(), res.loss
    torch.testing.assert_close(
        res.loss.to(torch.float64), res.ref_loss.to(torch.float64), rtol=rtol, atol=atol,
        equal_nan=False, check_dtype=False,
    )


def grad_error_bound(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None, upstream: torch.Tensor, *,
    grad_dtype: torch.dtype, acc: torch.dtype, temperature: float = 1.0, alpha: float = 0.5,
    label_smoothing: float = 0.0, reduction: str = "mean", scale_by_t2: bool = True,
    ignore_index: int = IGNORE, kind: str = "kl", beta: float = 0.5, roundings: int = 1, **_unused,
) -> tuple[torch.Tensor, float]:
    """Elementwise absolute error bound (same shape as ``student``, the logical (..., C)
    logits) and the relative rounding tolerance of a student gradient stored in ``grad_dtype``.

    - Computation in ``acc``: every gradient entry is a combination of probabilities
      (soft: q_k - p_k, or q_k * (log-ratio_k - row KL) for reverse_kl/jsd; hard:
      r_k - eps/C - onehot) times the row weight (upstream gradient, 1/N for the mean) and the
      coefficients alpha*T (soft, with T**2 scaling) and 1 - alpha (hard). Each term carries
      an error of a few ulps of its exponent / log argument, |logit|/min(T, 1) + log C,
      *relative to the term's size*, and the terms cancel (q ~ p at large T, log q - log m ~
      KL(q||m) for confident rows), so the bound is absolute, per element, proportional to the
      terms' magnitudes.
    - Storage: each rounding into grad_dtype adds its unit roundoff relative to the value
      (bfloat16 gets two: the kernel stores the per-row gradient, then grad_output/N scales it
      and rounds again; float16 gets one: the kernel keeps its per-row gradient in float32).
      Float16 subnormals add an absolute 2**-25 (half the smallest subnormal).
    """
    # Magnitudes in the accumulation type (float32 halves the cost of the big float16 test).
    n_cols = student.shape[-1]
    s = student.detach().reshape(-1, n_cols).to(acc)
    t = teacher.detach().reshape(-1, n_cols).to(acc)
    T = temperature
    has_target = target is not None
    soft_g = (alpha if has_target else 1.0) * (T**2 if scale_by_t2 else 1.0) / T
    if kind == "kl":
        mag = torch.softmax(t / T, dim=-1).nan_to_num_(0.0)
        mag += torch.softmax(s / T, dim=-1)
    else:
        # Mode-seeking gradients q_k * (ratio_k - KL): q's relative error times |ratio_k - KL|.
        log_q = torch.log_softmax(s / T, dim=-1)
        log_p = torch.log_softmax(t / T, dim=-1)
        q = log_q.exp()
        log_x = log_p
        if kind == "jsd":
            log_x = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
        ratio = torch.where(q > 0, log_q - log_x, torch.zeros_like(q))
        row_kl = (q * ratio).sum(-1, keepdim=True)
        factor = 1.0 + (ratio - row_kl).abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)
        mag = (q + log_p.exp().nan_to_num(0.0)) * factor
    mag *= soft_g
    n_rows = s.shape[0]
    upstream = upstream.to(s.device)
    if has_target:
        y = target.reshape(-1).long()
        counted = y != ignore_index
        if alpha < 1.0:
            hard = torch.softmax(s, dim=-1).add_(label_smoothing / n_cols)
            rows = counted.nonzero().squeeze(-1)
            hard[rows, y[rows]] += 1.0
            mag += (1.0 - alpha) * hard
    else:
        counted = torch.ones(n_rows, dtype=torch.bool, device=s.device)
    if reduction == "none":
        w = upstream.reshape(-1).abs()
    elif reduction == "sum":
        w = upstream.abs().expand(n_rows)
    else:
        w = upstream.abs().expand(n_rows) / max(int(counted.sum()), 1)
    w = torch.where(counted, w, torch.zeros_like(w)).to(acc)
    max_logit = finite_max_abs(student, teacher)
    spread = 2.0 * max_logit / min(T, 1.0) + math.log(max(n_cols, 2)) + 1.0
    # Probabilities that underflow acc's normal range lose their relative accuracy: an
    # absolute floor of acc's smallest normal number per term.
    mag += torch.finfo(acc).tiny * (2.0 * abs(soft_g) + 2.0)
    mag *= w[:, None]
    bound = mag.to(torch.float64) * (16.0 * UNIT_ROUNDOFF[acc] * spread)
    if grad_dtype == torch.float16:
        bound += 2.0**-25
    store = UNIT_ROUNDOFF[grad_dtype] * roundings if grad_dtype != acc else 0.0
    return bound.reshape(student.shape), store * 1.01


def assert_within(actual: torch.Tensor, expected: torch.Tensor, atol: torch.Tensor | float, rtol: float,
                  what: str = "gradient"):
    """|actual - expected| <= atol + rtol * |expected| elementwise (atol may be a tensor)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert torch.isfinite(a).all(), f"{what}: non-finite entries"
    allowed = atol + rtol * e.abs()
    excess = (a - e).abs() - allowed
    if a.numel() and bool((excess > 0).any()):
        k = int(excess.reshape(-1).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(k), a.shape))
        allowed_k = float(allowed.reshape(-1)[k]) if isinstance(allowed, torch.Tensor) else allowed
        raise AssertionError(
            f"{what} mismatch in {int((excess > 0).sum())}/{a.numel()} elements; worst at {idx}: "
            f"actual {float(a[idx])!r}, expected {float(e[idx])!r}, |diff| {float((a - e)[idx].abs())!r} "
            f"> allowed {allowed_k!r}"
        )


def check_case(
    student: Logits,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    *,
    upstream: str | float | None = 1.0,
    inplace: bool = False,
    **kwargs,
) -> Result:
    """run_fused_and_reference + the error-model comparison of loss and gradient."""
    res = run_fused_and_reference(student, teacher, target, upstream=upstream, inplace=inplace, **kwargs)
    s_dtype, t_dtype = student.base.dtype, teacher.dtype
    acc = acc_dtype(s_dtype, t_dtype)
    n_cols = student.n_cols
    n_rows = student.value.numel() // max(n_cols, 1)
    temperature = kwargs.get("temperature", 1.0)
    alpha = kwargs.get("alpha", 0.5)
    max_logit = finite_max_abs(student.base, teacher)
    row_atol = row_loss_atol(
        acc=acc, n_cols=n_cols, max_logit=max_logit, temperature=temperature, alpha=alpha,
        has_target=target is not None, scale_by_t2=kwargs.get("scale_by_t2", True),
    )
    assert_loss_close(res, row_atol=row_atol, reduction=kwargs.get("reduction", "mean"),
                      n_rows=n_rows, acc=acc)
    if res.grad is not None:
        assert res.grad.dtype == s_dtype
        assert res.grad.shape == student.base.shape
        grad, ref_grad = student.view(res.grad), student.view(res.ref_grad)
        # Storage outside the logical view gets exactly zero gradient.
        covered = torch.zeros(student.base.shape, dtype=torch.bool, device=student.base.device)
        student.view(covered).fill_(True)
        assert (res.grad[~covered] == 0).all()
        bound, rtol = grad_error_bound(
            student.value, teacher, target, res.upstream, grad_dtype=s_dtype, acc=acc,
            roundings=2 if s_dtype == torch.bfloat16 else 1, **kwargs,
        )
        assert_within(grad, ref_grad, bound, rtol)
    return res


# The host simulation of the CUDA rows reports its case count at the end of the run
# (tests/test_cuda_host_sim.py), so the default test output shows that it ran.
SIM_SUMMARY = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for line in config.stash.get(SIM_SUMMARY, []):
        terminalreporter.write_line(line)
