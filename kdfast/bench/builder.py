"""`kdfast bench --builder`: the sparse-cache builder row. kdfast.topk_targets (one op: top-k
ids and logits plus the tail log-sum-exp at each temperature) against what one writes in
PyTorch: torch.topk, then one masked torch.logsumexp per temperature.

Timing: the two are interleaved repeat by repeat in alternating order after a warm-up on the
same inputs (random normals times 4, float32 unless asked), medians and 20/80 % quantiles;
the speed-up is the ratio of the medians.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import kdfast

DEFAULT_SHAPE = (4096, 49152)
DEFAULT_K = 64
DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_topk_targets(
    teacher_logits: torch.Tensor, k: int, temperatures: Sequence[float]
) -> kdfast.TopKTargets:
    """The baseline: torch.topk and one masked torch.logsumexp per temperature (float32)."""
    z = teacher_logits.float()
    values, ids = torch.topk(z, k, dim=-1)
    rest = z.scatter(-1, ids, -math.inf)
    tails = [torch.logsumexp(rest / t, dim=-1) for t in temperatures]
    return kdfast.TopKTargets(ids, values, torch.stack(tails, dim=-1))


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[round(q * 10) - 1]


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict:
    """Seconds per call of each function, alternating them call by call (rotating order)."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def run_builder_bench(
    shape: tuple[int, int] = DEFAULT_SHAPE,
    k: int = DEFAULT_K,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    dtype: str = "fp32",
    threads: int = 2,
    repeats: int = 7,
    out_dir: str | Path | None = None,
) -> dict:
    """Times the builder op against torch_topk_targets; returns (and, with out_dir, writes as
    builder.md) the medians, quantiles and the speed-up. Checks first that both agree."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        z = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 4).to(DTYPES[dtype])
        ours = kdfast.topk_targets(z, k, temperatures)
        theirs = torch_topk_targets(z, k, temperatures)
        torch.testing.assert_close(ours.logits, theirs.logits)
        torch.testing.assert_close(ours.tail_logsumexp, theirs.tail_logsumexp, rtol=1e-5, atol=1e-5)
        del ours, theirs
        times = time_interleaved(
            {
                "kdfast": lambda: kdfast.topk_targets(z, k, temperatures),
                "torch": lambda: torch_topk_targets(z, k, temperatures),
            },
            repeats,
        )
    finally:
        torch.set_num_threads(previous)
    result = {"shape": shape, "k": k, "temperatures": tuple(temperatures), "dtype": dtype,
              "threads": threads, "repeats": repeats}
    for name, values in times.items():
        result[name] = {"median_ms": statistics.median(values) * 1e3,
                        "q20_ms": _quantile(values, 0.2) * 1e3, "q80_ms": _quantile(values, 0.8) * 1e3}
    result["speedup"] = result["torch"]["median_ms"] / result["kdfast"]["median_ms"]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "builder.md").write_text(markdown_row(result))
    return result


def markdown_row(result: dict) -> str:
    n, c = result["shape"]
    ours, theirs = result["kdfast"], result["torch"]
    temps = ", ".join(f"{t:g}" for t in result["temperatures"])
    return (
        "| N | C | k | temperatures | dtype | threads | kdfast ms (q20-q80) | torch.topk + logsumexp ms "
        "(q20-q80) | x |\n|---|---|---|---|---|---|---|---|---|\n"
        f"| {n} | {c} | {result['k']} | {temps} | {result['dtype']} | {result['threads']} "
        f"| {ours['median_ms']:.1f} ({ours['q20_ms']:.1f}-{ours['q80_ms']:.1f}) "
        f"| {theirs['median_ms']:.1f} ({theirs['q20_ms']:.1f}-{theirs['q80_ms']:.1f}) "
        f"| {result['speedup']:.1f} |\n"
    )
