"""The sparse rows of ``kdfast bench --sparse``: the fused sparse op against the eager sparse
baseline (:func:`kdfast.reference.sparse_eager_baseline`), its torch.compile version, and the
dense kdfast op on the same (N, C) with the full teacher. fp32, forward+backward, tail="bucket",
kind="kl", T = 2, alpha = 0.5, a target on every row.

Timing as :mod:`kdfast.bench.report`: providers interleaved repeat by repeat in rotating
order, warm-up steps (and compilation) excluded, medians and 20/80 % quantiles. Memory as
there too: the peak extra resident set of one step (the student's gradient included), beside
the size of that gradient (the issue's target for the fused op: extra memory = the gradient).
"""

from __future__ import annotations

import csv
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import kdfast
from kdfast.bench import machine
from kdfast.bench.providers import ALPHA, TEMPERATURE
from kdfast.bench.report import TIMING_MALLOC, _peak_extra_bytes, _set_malloc, memory_malloc
from kdfast.reference import sparse_eager_baseline

SPARSE_SHAPES = ((4096, 49152, 64), (1024, 128256, 128))
SPARSE_PROVIDERS = ("sparse_kdfast", "sparse_eager", "sparse_compiled", "dense_kdfast")
TAIL = "bucket"


def sparse_inputs(rows: int, cols: int, k: int, seed: int = 0):
    """Random fp32 student and teacher logits, the teacher's top-k SparseTargets (with the
    tail log-sum-exp at T) and targets."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, cols, generator=gen)
    dense = torch.randn(rows, cols, generator=gen)
    top = dense.topk(k, dim=-1)
    rest = dense.scatter(-1, top.indices, -torch.inf) / TEMPERATURE
    teacher = kdfast.SparseTargets(top.indices, top.values, rest.logsumexp(-1))
    target = torch.randint(0, cols, (rows,), generator=gen)
    return student, dense, teacher, target


def make_sparse_step(provider: str) -> Callable:
    """``step(student, dense, teacher, target)``: forward+backward on a fresh leaf."""
    if provider == "sparse_kdfast":
        def loss_fn(s, dense, teacher, y):
            return kdfast.sparse_distillation_loss(s, teacher, y, tail=TAIL, temperature=TEMPERATURE,
                                                   alpha=ALPHA)
    elif provider in ("sparse_eager", "sparse_compiled"):
        def loss_fn(s, dense, teacher, y):
            return sparse_eager_baseline(s, teacher, y, tail=TAIL, temperature=TEMPERATURE, alpha=ALPHA)

        if provider == "sparse_compiled":
            torch._dynamo.reset()
            loss_fn = torch.compile(loss_fn, dynamic=False)
    elif provider == "dense_kdfast":
        def loss_fn(s, dense, teacher, y):
            return kdfast.distillation_loss(s, dense, y, temperature=TEMPERATURE, alpha=ALPHA)
    else:
        raise ValueError(f"provider must be one of {SPARSE_PROVIDERS}, got {provider!r}")

    def step(student, dense, teacher, target):
        leaf = student.detach().requires_grad_()
        loss_fn(leaf, dense, teacher, target).backward()

    return step


def time_sparse_case(rows: int, cols: int, k: int, repeats: int,
                     warmup: int = 2) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per forward+backward step of each provider, interleaved in rotating order, and
    each provider's peak extra resident memory of one step in MB (nan where unmeasurable)."""
    inputs = sparse_inputs(rows, cols, k)
    steps = {p: make_sparse_step(p) for p in SPARSE_PROVIDERS}
    times: dict[str, list[float]] = {p: [] for p in SPARSE_PROVIDERS}
    _set_malloc(*TIMING_MALLOC)
    for p in SPARSE_PROVIDERS:
        for _ in range(warmup):
            steps[p](*inputs)
    n = len(SPARSE_PROVIDERS)
    for r in range(repeats):
        for p in SPARSE_PROVIDERS[r % n:] + SPARSE_PROVIDERS[: r % n]:
            start = time.perf_counter()
            steps[p](*inputs)
            times[p].append(time.perf_counter() - start)
    memory = {}
    with memory_malloc():
        for p in SPARSE_PROVIDERS:
            peak = _peak_extra_bytes(steps[p], inputs)
            memory[p] = float("nan") if peak is None else peak / 2**20
    return times, memory


def _quantile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[round(q * 10) - 1]


def _cell(times: list[float]) -> str:
    """A median in ms with its 20-80 % quantiles."""
    lo, hi = _quantile(times, 0.2) * 1e3, _quantile(times, 0.8) * 1e3
    return f"{statistics.median(times) * 1e3:.1f} ({lo:.1f}-{hi:.1f})"


def run_sparse_report(
    out_dir: str | os.PathLike = "benchmarks/results",
    repeats: int = 7,
    threads: int = 2,
    shapes: tuple[tuple[int, int, int], ...] = SPARSE_SHAPES,
) -> Path:
    """Times every shape and writes sparse_results.csv and sparse_results.md into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = machine.describe()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows_csv, lines = [], [
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, kdfast {info['kdfast']} "
        f"({info['cpu_isa']}), {threads} threads. Sparse rows: fp32, forward+backward, tail={TAIL!r}, "
        f"kind='kl', T = {TEMPERATURE:g}, alpha = {ALPHA:g}; medians (20-80 % quantiles) of {repeats} "
        "interleaved repeats; x = speed-up of sparse kdfast; MB = peak extra resident memory of one "
        "step, gradient included, against the fp32 gradient's own size.",
        "",
        "| N | C | k | sparse kdfast ms | eager ms | compiled ms | dense kdfast ms | x eager | x compiled "
        "| x dense | gradient MB | MB sparse / eager / compiled / dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    try:
        for n, c, k in shapes:
            times, memory = time_sparse_case(n, c, k, repeats)
            med = {p: statistics.median(t) for p, t in times.items()}
            for p, t in times.items():
                rows_csv.append({"rows": n, "cols": c, "k": k, "threads": threads, "provider": p,
                                 "median_ms": med[p] * 1e3, "q20_ms": _quantile(t, 0.2) * 1e3,
                                 "q80_ms": _quantile(t, 0.8) * 1e3, "peak_extra_mb": memory[p]})

            ratios = [med[p] / med["sparse_kdfast"] for p in SPARSE_PROVIDERS[1:]]
            gradient_mb = n * c * 4 / 2**20
            lines.append(f"| {n} | {c} | {k} | " + " | ".join(_cell(times[p]) for p in SPARSE_PROVIDERS)
                         + " | " + " | ".join(f"{x:.1f}" for x in ratios) + f" | {gradient_mb:.0f} | "
                         + " / ".join(f"{memory[p]:.0f}" for p in SPARSE_PROVIDERS) + " |")
            print(lines[-1], flush=True)
    finally:
        torch.set_num_threads(previous)
    with open(out / "sparse_results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_csv[0]))
        writer.writeheader()
        writer.writerows(rows_csv)
    (out / "sparse_results.md").write_text("\n".join(lines) + "\n")
    return out
