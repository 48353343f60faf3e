"""`kdfast bench --suite linear`: the fused output layer (kdfast.linear_distillation_loss)
against the unfused paths, forward+backward from the student's hidden states, with dense
teacher logits given as input.

Providers: ``fused`` (linear_distillation_loss), ``kdfast`` (F.linear + kdfast.distillation_loss),
``eager`` (F.linear + the eager loss every benchmark uses, kdfast.reference.eager_baseline),
``compiled`` (that under torch.compile), and ``matmuls`` (the three matmuls alone: logits,
hidden and weight gradients), so the time outside the matmuls is reported separately.
Timing is interleaved repeat by repeat in rotating order; memory is the peak extra resident
set of one step minus the gradients of hidden, weight and bias (report.py's method).
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import kdfast
from kdfast.bench import machine
from kdfast.bench.providers import ALPHA, TEMPERATURE
from kdfast.bench.report import (
    DTYPES,
    TIMING_MALLOC,
    _peak_extra_bytes,
    _quantile,
    _set_malloc,
    memory_malloc,
)
from kdfast.reference import eager_baseline

PROVIDERS = ("fused", "kdfast", "eager", "compiled", "matmuls")
SHAPES = ((4096, 128, 49152), (4096, 576, 49152))  # (N, H, C)
FULL_ONLY = ((2048, 2048, 128256),)  # three repeats, full run only


@dataclass
class LinearCase:
    dtype: str
    rows: int
    hidden: int
    cols: int
    times: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)


def make_linear_step(provider: str):
    """A forward+backward step on fresh leaf copies of (hidden, weight, bias), which it returns
    (with their .grad) for tests."""

    def fused(h, w, b, t, y):
        return kdfast.linear_distillation_loss(h, w, y, student_bias=b, teacher_logits=t,
                                               temperature=TEMPERATURE, alpha=ALPHA)

    def unfused(h, w, b, t, y):
        return kdfast.distillation_loss(F.linear(h, w, b), t, y, temperature=TEMPERATURE,
                                        alpha=ALPHA)

    def eager(h, w, b, t, y):
        return eager_baseline(F.linear(h, w, b), t, y, temperature=TEMPERATURE, alpha=ALPHA)

    if provider == "matmuls":
        def step(h, w, b, t, y):
            logits = torch.addmm(b, h, w.T)
            torch.mm(logits, w)
            torch.mm(logits.T, h)
        return step
    if provider == "compiled":
        torch._dynamo.reset()
        eager = torch.compile(eager, dynamic=False)
    loss_fn = {"fused": fused, "kdfast": unfused, "eager": eager, "compiled": eager}[provider]

    def step(h, w, b, t, y):
        leaves = [x.detach().requires_grad_() for x in (h, w, b)]
        loss_fn(*leaves, t, y).backward()
        return leaves

    return step


def run_linear_case(case: LinearCase, repeats: int, warmup: int = 1) -> None:
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[case.dtype]
    hidden = torch.randn(case.rows, case.hidden, generator=gen).to(dtype)
    weight = (torch.randn(case.cols, case.hidden, generator=gen) / case.hidden**0.5).to(dtype)
    bias = torch.zeros(case.cols, dtype=dtype)
    teacher = (torch.randn(case.rows, case.cols, generator=gen) * 2).to(dtype)
    target = torch.randint(0, case.cols, (case.rows,), generator=gen)
    inputs = (hidden, weight, bias, teacher, target)
    steps = {p: make_linear_step(p) for p in PROVIDERS}
    for p in PROVIDERS:
        for _ in range(warmup):
            steps[p](*inputs)
        case.times[p] = []
    for r in range(repeats):
        for p in PROVIDERS[r % len(PROVIDERS):] + PROVIDERS[: r % len(PROVIDERS)]:
            start = time.perf_counter()
            steps[p](*inputs)
            case.times[p].append(time.perf_counter() - start)
    grads = (case.rows * case.hidden + case.cols * case.hidden + case.cols) * dtype.itemsize
    with memory_malloc():
        for p in PROVIDERS[:4]:
            peak = _peak_extra_bytes(steps[p], inputs)
            case.memory[p] = None if peak is None else max(0, peak - grads)


def linear_metrics(case: LinearCase) -> dict:
    med = {p: statistics.median(t) for p, t in case.times.items()}
    out = {}
    for p in PROVIDERS:
        memory = case.memory.get(p)
        out[p] = {
            "median_ms": med[p] * 1e3,
            "q20_ms": _quantile(case.times[p], 0.2) * 1e3,
            "q80_ms": _quantile(case.times[p], 0.8) * 1e3,
            "outside_matmuls_ms": (med[p] - med["matmuls"]) * 1e3,
            "peak_extra_mb": memory / 2**20 if memory is not None else float("nan"),
        }
    return out


def run_linear_report(out_dir: str | Path = "benchmarks/results", quick: bool = False,
                      repeats: int | None = None, dtypes: tuple[str, ...] = ("fp32", "bf16"),
                      threads: int | None = None, plot: bool = True) -> Path:
    """Runs the grid and writes linear.md (+ linear.png) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    repeats = repeats or (3 if quick else 5)
    previous = torch.get_num_threads()
    threads = threads or previous
    torch.set_num_threads(threads)
    shapes = [(s, repeats) for s in SHAPES] + ([] if quick else [(s, 3) for s in FULL_ONLY])
    cases = []
    _set_malloc(*TIMING_MALLOC)
    try:
        for dtype, ((n, h, c), reps) in itertools.product(dtypes, shapes):
            case = LinearCase(dtype, n, h, c)
            run_linear_case(case, reps)
            m = linear_metrics(case)
            cases.append((case, m))
            print(f"  {dtype} ({n}, {h}, {c}) " + "  ".join(
                f"{p} {m[p]['median_ms']:.0f} ms" for p in PROVIDERS), flush=True)
    finally:
        torch.set_num_threads(previous)
    info = machine.describe()
    (out / "linear.md").write_text(linear_table(cases, info, threads))
    if plot:
        plot_linear(cases, out / "linear.png")
    return out


def linear_table(cases, info: dict, threads: int) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {threads} "
        "thread(s). Forward+backward medians from hidden states (dense teacher logits given); "
        "memory = peak extra RSS of one step minus the gradients of hidden, weight and bias.",
        "",
        "| dtype | N | H | C | fused ms | kdfast ms | eager ms | compiled ms | matmuls ms "
        "| fused outside matmuls ms | fused / kdfast time | MB fused / kdfast / eager / compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, m in cases:
        f, k, e, c = (m[p] for p in ("fused", "kdfast", "eager", "compiled"))
        lines.append(
            f"| {case.dtype} | {case.rows} | {case.hidden} | {case.cols} | {f['median_ms']:.0f} "
            f"| {k['median_ms']:.0f} | {e['median_ms']:.0f} | {c['median_ms']:.0f} "
            f"| {m['matmuls']['median_ms']:.0f} | {f['outside_matmuls_ms']:.0f} "
            f"| {f['median_ms'] / k['median_ms']:.2f} | {f['peak_extra_mb']:.0f} / "
            f"{k['peak_extra_mb']:.0f} / {e['peak_extra_mb']:.0f} / {c['peak_extra_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_linear(cases, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{c.dtype}\nN {c.rows}\nH {c.hidden}\nC {c.cols}" for c, _ in cases]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.2
    for i, p in enumerate(PROVIDERS[:4]):
        xs = [j + (i - 1.5) * width for j in range(len(cases))]
        ax_time.bar(xs, [m[p]["median_ms"] for _, m in cases], width, label=p)
        ax_mem.bar(xs, [m[p]["peak_extra_mb"] for _, m in cases], width, label=p)
    for ax, ylabel in ((ax_time, "forward+backward median (ms)"), (ax_mem, "peak extra memory (MB)")):
        ax.set_xticks(range(len(cases)), labels, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    ax_time.set_title("output layer + loss: time")
    ax_mem.set_title("output layer + loss: memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
