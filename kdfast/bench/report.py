"""Runs the benchmark grid and writes CSV, a Markdown table and a plot.

Timing: providers are interleaved repeat by repeat in rotating order, with a short probe of
the exp rate after each repeat (so drift hits all alike), warm-up steps
(and torch.compile's compilation) are excluded, inputs are random normals, and each cell
reports the median and the 20/80 % quantiles. Peak extra memory is the resident-set
high-water mark of one step above the resident set before it, reset between providers through
/proc/self/clear_refs (Linux).
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import gc
import itertools
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import kdfast
from kdfast.bench import machine
from kdfast.bench.providers import ALPHA, PROVIDERS, TEMPERATURE, exps_per_element, make_step

FULL_SHAPES = ((8192, 10), (4096, 1000), (1024, 32000), (256, 128256))
QUICK_SHAPES = ((8192, 10), (1024, 32000))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXP_PROBE_SECONDS = 0.05


@dataclass
class Case:
    kind: str
    dtype: str
    rows: int
    cols: int
    threads: int
    times: dict = field(default_factory=dict)  # provider -> list of seconds
    memory: dict = field(default_factory=dict)  # provider -> bytes
    exp_rates: list = field(default_factory=list)  # exps/s, probed between the repeats


def _rss_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# glibc malloc: by default the mmap threshold adapts (up to 32 MiB) so freed blocks below it
# stay in the heap, resident and invisible to RSS. Timing runs with that steady state pinned
# (the same for every provider); memory runs with every block >= 1 MiB mapped and unmapped on
# its own, so RSS sees each allocation. mallopt parameters: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3.
TIMING_MALLOC = (64 << 20, 32 << 20)
MEMORY_MALLOC = (1 << 20, 1 << 20)


def _set_malloc(trim_threshold: int, mmap_threshold: int) -> None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, trim_threshold)
        libc.mallopt(-3, mmap_threshold)
    except (OSError, AttributeError):  # not glibc: RSS numbers are then approximate
        pass


@contextlib.contextmanager
def memory_malloc():
    """glibc in the memory-measuring mode for the block, back to the timing mode after it."""
    _set_malloc(*MEMORY_MALLOC)
    try:
        yield
    finally:
        _set_malloc(*TIMING_MALLOC)


def _reset_high_water() -> bool:
    gc.collect()
    # Resident free memory (kdfast's cached gradient buffers, glibc's free heap chunks) would
    # be reused without a page fault and hide the next step's allocations from RSS.
    kdfast.release_buffers()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


def _peak_extra_bytes(step, inputs) -> int | None:
    if not _reset_high_water():
        return None
    before = _rss_bytes("VmRSS")
    step(*inputs)
    peak = _rss_bytes("VmHWM")
    return None if before is None or peak is None else max(0, peak - before)


def _peak_extra_bytes_inplace(kind: str, inputs) -> int | None:
    """kdfast with inplace=True on logits that, as a model's output would be, are not a leaf;
    our reference to them is dropped before backward, as a training loop's would be."""
    student, teacher, target = inputs
    leaf = student.detach().requires_grad_()
    logits = leaf.clone()
    if not _reset_high_water():
        return None
    before = _rss_bytes("VmRSS")
    loss = kdfast.distillation_loss(logits, teacher, target, temperature=TEMPERATURE, alpha=ALPHA,
                                    kind=kind, inplace=True)
    del logits
    loss.backward()
    peak = _rss_bytes("VmHWM")
    return None if before is None or peak is None else max(0, peak - before)


def run_case(case: Case, repeats: int, warmup: int = 2) -> None:
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[case.dtype]
    student = torch.randn(case.rows, case.cols, generator=gen).to(dtype)
    teacher = torch.randn(case.rows, case.cols, generator=gen).to(dtype)
    target = torch.randint(0, case.cols, (case.rows,), generator=gen)
    inputs = (student, teacher, target)
    steps = {p: make_step(p, case.kind) for p in PROVIDERS}
    for p in PROVIDERS:
        for _ in range(warmup):
            steps[p](*inputs)
        case.times[p] = []
    for r in range(repeats):
        # Rotating order: whatever one step leaves behind (caches, a throttled or re-clocked
        # core after the exp probe) falls on every provider alike.
        for p in PROVIDERS[r % len(PROVIDERS):] + PROVIDERS[: r % len(PROVIDERS)]:
            start = time.perf_counter()
            steps[p](*inputs)
            case.times[p].append(time.perf_counter() - start)
        # The roofline's exp rate is interleaved with the steps too: on a shared host the
        # core's speed drifts by 2x over minutes, and drift must hit every number alike.
        case.exp_rates.append(machine.exp_rate(EXP_PROBE_SECONDS))
    with memory_malloc():
        for p in PROVIDERS:
            case.memory[p] = _peak_extra_bytes(steps[p], inputs)
        case.memory["kdfast_inplace"] = _peak_extra_bytes_inplace(case.kind, inputs)


def _quantile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[round(q * 10) - 1]


def case_metrics(case: Case, bandwidth: float, exp_rate: float) -> dict:
    """Per-provider metrics for one case; bandwidth in bytes/s and exp_rate in exps/s measured
    with the case's thread count."""
    elem = DTYPES[case.dtype].itemsize
    n = case.rows * case.cols
    moved = n * 3 * elem  # read student + teacher, write the gradient
    roofline = max(moved / bandwidth, exps_per_element(case.kind) * n / exp_rate)
    med = {p: statistics.median(t) for p, t in case.times.items()}

    def megabytes(key):
        value = case.memory.get(key)
        return value / 2**20 if value is not None else float("nan")

    out = {}
    for p in PROVIDERS:
        out[p] = {
            "median_ms": med[p] * 1e3,
            "q20_ms": _quantile(case.times[p], 0.2) * 1e3,
            "q80_ms": _quantile(case.times[p], 0.8) * 1e3,
            "speedup_vs_eager": med["eager"] / med[p],
            "speedup_vs_compiled": med["compiled"] / med[p],
            "peak_extra_mb": megabytes(p),
            "effective_gbs": moved / med[p] / 1e9,
            "roofline_ms": roofline * 1e3,
            "roofline_fraction": roofline / med[p],
        }
    out["kdfast"]["inplace_peak_extra_mb"] = megabytes("kdfast_inplace")
    return out


def run_report(
    out_dir: str | os.PathLike = "benchmarks/results",
    quick: bool = False,
    repeats: int | None = None,
    kinds: tuple[str, ...] = ("kl", "jsd"),
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    threads: tuple[int, ...] | None = None,
    shapes: tuple[tuple[int, int], ...] | None = None,
    plot: bool = True,
) -> Path:
    """Runs the grid and writes results.csv, results.md and results.png into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    repeats = repeats or (5 if quick else 11)
    shapes = shapes or (QUICK_SHAPES if quick else FULL_SHAPES)
    threads = threads or tuple(sorted({1, os.cpu_count() or 1}))
    info = machine.describe()
    previous_threads = torch.get_num_threads()
    rows, cases = [], []
    _set_malloc(*TIMING_MALLOC)
    try:
        for t in threads:
            torch.set_num_threads(t)
            bandwidth = machine.bandwidth_gbs() * 1e9
            print(f"[{t} thread(s)] copy bandwidth {bandwidth / 1e9:.1f} GB/s, THP {info['thp']}",
                  flush=True)
            for kind, dtype, (n, c) in itertools.product(kinds, dtypes, shapes):
                case = Case(kind, dtype, n, c, t)
                run_case(case, repeats)
                exp_rate = statistics.median(case.exp_rates)
                metrics = case_metrics(case, bandwidth, exp_rate)
                cases.append((case, metrics, bandwidth, exp_rate))
                k = metrics["kdfast"]
                print(f"  {kind:<4} {dtype} ({n:>5}, {c:>6}) kdfast {k['median_ms']:8.2f} ms  "
                      f"eager {metrics['eager']['median_ms']:8.2f}  compiled "
                      f"{metrics['compiled']['median_ms']:8.2f}  x{k['speedup_vs_eager']:.1f} eager  "
                      f"x{k['speedup_vs_compiled']:.1f} compiled  {100 * k['roofline_fraction']:.0f}% "
                      f"roofline (exp rate {exp_rate / 1e9:.2f} G/s)", flush=True)
                for provider, values in metrics.items():
                    for metric, value in values.items():
                        rows.append({**info, "threads": t, "bandwidth_gbs": bandwidth / 1e9,
                                     "exp_rate_g": exp_rate / 1e9, "provider": provider,
                                     "kind": kind, "dtype": dtype, "rows": n, "cols": c,
                                     "metric": metric, "value": value})
    finally:
        torch.set_num_threads(previous_threads)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(markdown_table(cases, info))
    if plot:
        from kdfast.bench.plot import plot_cases

        plot_cases(cases, out / "results.png")
    return out


def markdown_table(cases, info: dict) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, THP `{info['thp']}`, torch {info['torch']}, "
        f"kdfast {info['kdfast']} ({info['cpu_isa']}). Forward+backward medians; x = speed-up of "
        "kdfast; memory = peak extra RSS of one step.",
        "",
        "| kind | dtype | N | C | threads | kdfast ms | eager ms | compiled ms | x eager | x compiled "
        "| kdfast GB/s | roofline ms | % roofline | MB kdfast / in-place / eager / compiled |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case, m, _, _ in cases:
        k, e, c = m["kdfast"], m["eager"], m["compiled"]
        lines.append(
            f"| {case.kind} | {case.dtype} | {case.rows} | {case.cols} | {case.threads} "
            f"| {k['median_ms']:.2f} | {e['median_ms']:.2f} | {c['median_ms']:.2f} "
            f"| {k['speedup_vs_eager']:.1f} | {k['speedup_vs_compiled']:.1f} "
            f"| {k['effective_gbs']:.1f} | {k['roofline_ms']:.2f} | {100 * k['roofline_fraction']:.0f} "
            f"| {k['peak_extra_mb']:.0f} / {k['inplace_peak_extra_mb']:.0f} / {e['peak_extra_mb']:.0f} "
            f"/ {c['peak_extra_mb']:.0f} |"
        )
    lines.append("")
    seen: dict[int, tuple[float, list[float]]] = {}
    for case, _, bandwidth, exp_rate in cases:
        seen.setdefault(case.threads, (bandwidth, []))[1].append(exp_rate)
    for t, (bandwidth, rates) in sorted(seen.items()):
        lines.append(f"- {t} thread(s): copy bandwidth {bandwidth / 1e9:.1f} GB/s; exp rate "
                     f"{min(rates) / 1e9:.2f}-{max(rates) / 1e9:.2f} G exps/s (each row's roofline "
                     "uses the median of probes interleaved with its timed steps).")
    return "\n".join(lines) + "\n"
