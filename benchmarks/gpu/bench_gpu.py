"""GPU version of `kdfast bench`: CUDA-event timings of forward+backward for kdfast, the eager
loss and torch.compile (and for the sparse loss, kdfast against its eager reference), with HBM
copy bandwidth as the roofline. Exits 0 with a message when
there is no CUDA device (so it can sit in any script).

    python benchmarks/gpu/bench_gpu.py [--out benchmarks/results/gpu]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import torch

SHAPES = ((8192, 10), (4096, 1000), (1024, 32000), (256, 128256), (4096, 128256))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cuda_ms(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def hbm_bandwidth_gbs() -> float:
    src = torch.ones(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = statistics.median(cuda_ms(lambda: dst.copy_(src), 10))
    return 2 * src.numel() * 4 / (ms / 1e3) / 1e9


def linear_rows(device: str, repeats: int) -> list[dict]:
    """The fused output layer (kdfast bench --suite linear's providers) on the GPU: time and
    peak extra device memory of forward+backward from hidden states."""
    from kdfast.bench.linear import PROVIDERS, SHAPES, make_linear_step

    rows = []
    for dtype_name, dtype in DTYPES.items():
        for n, h, c in SHAPES:
            gen = torch.Generator(device="cuda").manual_seed(0)
            inputs = (torch.randn(n, h, device="cuda", generator=gen).to(dtype),
                      (torch.randn(c, h, device="cuda", generator=gen) / h**0.5).to(dtype),
                      torch.zeros(c, device="cuda", dtype=dtype),
                      (torch.randn(n, c, device="cuda", generator=gen) * 2).to(dtype),
                      torch.randint(0, c, (n,), device="cuda", generator=gen))
            for provider in PROVIDERS:
                step = make_linear_step(provider)
                step(*inputs)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                ms = statistics.median(cuda_ms(lambda step=step, inputs=inputs: step(*inputs), repeats))
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                rows.append({"device": device, "kind": "linear", "dtype": dtype_name, "rows": n,
                             "cols": c, "provider": f"linear-{provider}", "median_ms": ms,
                             "peak_extra_mb": peak, "hidden": h})
                print(f"linear {dtype_name} ({n}, {h}, {c}) {provider}: {ms:.2f} ms, "
                      f"{peak:.0f} MiB")
    return rows


SPARSE_SHAPES = ((4096, 1000), (1024, 32000), (256, 128256), (4096, 128256))
SPARSE_KS = (8, 64)


def sparse_rows(device: str, bandwidth: float, repeats: int) -> list[dict]:
    """kdfast.sparse_distillation_loss (the CUDA sparse kernel) against its pure-PyTorch
    reference: forward+backward from top-k teacher targets with a tail bucket. The roofline
    counts the kernel's HBM traffic: the student row read twice and the gradient written once."""
    import kdfast
    from kdfast import reference

    rows = []
    for dtype_name, dtype in DTYPES.items():
        for n, c in SPARSE_SHAPES:
            for k in SPARSE_KS:
                gen = torch.Generator(device="cuda").manual_seed(0)
                s = torch.randn(n, c, device="cuda", generator=gen).to(dtype).requires_grad_()
                dense = torch.randn(n, c, device="cuda", generator=gen) * 2
                top = dense.topk(k, dim=-1)
                tail = dense.scatter(1, top.indices, float("-inf")).logsumexp(-1)
                teacher = kdfast.SparseTargets(top.indices, top.values, tail)
                y = torch.randint(0, c, (n,), device="cuda", generator=gen)
                medians = {}
                for provider, loss_fn in (("kdfast", kdfast.sparse_distillation_loss),
                                          ("eager", reference.sparse_distillation_loss)):
                    def step(loss_fn=loss_fn, s=s, teacher=teacher, y=y):
                        loss = loss_fn(s, teacher, y, tail="bucket", temperature=2.0)
                        torch.autograd.grad(loss, s)

                    step()
                    medians[provider] = statistics.median(cuda_ms(step, repeats))
                moved = n * c * (2 * dtype.itemsize + dtype.itemsize)
                roofline_ms = moved / (bandwidth * 1e9) * 1e3
                for provider, ms in medians.items():
                    rows.append({"device": device, "kind": f"sparse-kl-k{k}", "dtype": dtype_name, "rows": n,
                                 "cols": c, "provider": provider, "median_ms": ms,
                                 "speedup_vs_eager": medians["eager"] / ms,
                                 "roofline_fraction": roofline_ms / ms})
                ms = medians["kdfast"]
                print(f"sparse k={k} {dtype_name} ({n}, {c}): kdfast {ms:.3f} ms, eager "
                      f"{medians['eager']:.3f}, {100 * roofline_ms / ms:.0f}% of HBM roofline")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; nothing to measure (skipped)")
        return 0
    from kdfast.bench.providers import PROVIDERS, exps_per_element, make_step

    bandwidth = hbm_bandwidth_gbs()
    device = torch.cuda.get_device_name()
    print(f"{device}: copy bandwidth {bandwidth:.0f} GB/s")
    rows = []
    for kind in ("kl", "jsd"):
        for dtype_name, dtype in DTYPES.items():
            for n, c in SHAPES:
                gen = torch.Generator(device="cuda").manual_seed(0)
                s = torch.randn(n, c, device="cuda", generator=gen).to(dtype)
                t = torch.randn(n, c, device="cuda", generator=gen).to(dtype)
                y = torch.randint(0, c, (n,), device="cuda", generator=gen)
                medians = {}
                for provider in PROVIDERS:
                    step = make_step(provider, kind)
                    step(s, t, y)
                    step(s, t, y)
                    timed = lambda step=step, s=s, t=t, y=y: step(s, t, y)  # noqa: E731
                    medians[provider] = statistics.median(cuda_ms(timed, args.repeats))
                moved = n * c * 3 * dtype.itemsize
                roofline_ms = moved / (bandwidth * 1e9) * 1e3
                for provider, ms in medians.items():
                    rows.append({"device": device, "kind": kind, "dtype": dtype_name, "rows": n,
                                 "cols": c, "provider": provider, "median_ms": ms,
                                 "speedup_vs_eager": medians["eager"] / ms,
                                 "speedup_vs_compiled": medians["compiled"] / ms,
                                 "roofline_fraction": roofline_ms / ms,
                                 "exps_per_element": exps_per_element(kind)})
                k = medians["kdfast"]
                print(f"{kind:<4} {dtype_name} ({n}, {c}): kdfast {k:.3f} ms, eager "
                      f"{medians['eager']:.3f}, compiled {medians['compiled']:.3f}, "
                      f"{100 * roofline_ms / k:.0f}% of HBM roofline")
    rows += sparse_rows(device, bandwidth, args.repeats)
    rows += linear_rows(device, args.repeats)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
