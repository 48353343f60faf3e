"""What bounds a distillation loss on this machine: memory bandwidth and vectorized exp rate,
both measured in the same process as the kernels they judge."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page in buffers, spin up threads
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth_gbs(n_bytes: int = 512 << 20, repeats: int = 7, rounds: int = 3) -> float:
    """Copy bandwidth in GB/s (read + write bytes) of a large in-memory float32 copy, with the
    current torch thread count: the best of `rounds` medians over fresh buffers. (On the
    2-core machine of the README, medians came out either ~47 or ~80 GB/s depending on the
    buffers' pages; the roofline takes what the machine can do.)"""
    best = 0.0
    for _ in range(rounds):
        src = torch.ones(n_bytes // 4)
        dst = torch.empty_like(src)
        seconds = _median_seconds(lambda src=src, dst=dst: dst.copy_(src), repeats)
        best = max(best, 2 * n_bytes / seconds / 1e9)
    return best


def exp_rate(seconds: float = 0.3) -> float:
    """Vectorized float32 exps per second with the current torch thread count: the exp the
    fused kernel itself runs (kd_math.h exp_nonpos, selected ISA) on in-cache data. (torch.exp
    measured 0.47 G/s per thread here, 5x slower, so it would flatter every provider.)"""
    from kdfast import _C

    return _C.exp_rate(seconds)


def thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
        return text[text.index("[") + 1 : text.index("]")]
    except (OSError, ValueError):
        return "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict:
    import kdfast

    info = kdfast.build_info()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "thp": thp_mode(),
        "torch": torch.__version__,
        "kdfast": kdfast.__version__,
        "cpu_isa": info.get("cpu_isa_selected", "none"),
    }
