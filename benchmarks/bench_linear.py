"""The fused output layer against the unfused path: time and peak memory of forward+backward.

Unfused = what a training script writes: ``kdfast.distillation_loss(F.linear(h, W, b),
teacher_logits, y)`` (autograd keeps the (N, C) logits and their gradient). Fused =
``kdfast.linear_distillation_loss(h, W, y, student_bias=b, teacher_logits=...)``. Each
repetition runs every case in a fresh process, alternating which path goes first, so the two
are compared within the same minutes; peak memory is the process's peak RSS growth over the
inputs (Linux ru_maxrss), i.e. what the step itself allocates.

    .venv/bin/python benchmarks/bench_linear.py --threads 2 --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# (N, H, C): a small batch at a 32k vocabulary, and an LM batch at SmolLM2's 49,152.
CASES = [(256, 576, 32000), (2048, 576, 49152)]

CHILD = r"""
import json, resource, sys, time, torch
import torch.nn.functional as F
import kdfast
path, threads, n, h, c = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
hidden = torch.randn(n, h, generator=g).requires_grad_()
weight = (torch.randn(c, h, generator=g) / h**0.5).requires_grad_()
bias = torch.zeros(c).requires_grad_()
teacher = torch.randn(n, c, generator=g) * 2
y = torch.randint(0, c, (n,), generator=g)

def step():
    if path == "fused":
        loss = kdfast.linear_distillation_loss(hidden, weight, y, student_bias=bias,
                                               teacher_logits=teacher, temperature=2.0)
    else:
        loss = kdfast.distillation_loss(F.linear(hidden, weight, bias), teacher, y,
                                        temperature=2.0)
    loss.backward()
    for p in (hidden, weight, bias):
        p.grad = None

base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step()
times = []
for _ in range(5):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps({"ms": sorted(times)[2] * 1e3, "peak_mib": peak / 1024}))
"""


def run(path: str, threads: int, case: tuple[int, int, int]) -> dict[str, float]:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, "-c", CHILD, path, str(threads), *map(str, case)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    print(f"{'(N, H, C)':22s} {'unfused ms':>10s} {'fused ms':>9s} {'ratio':>6s} "
          f"{'unfused MiB':>11s} {'fused MiB':>9s}")
    for case in CASES:
        results: dict[str, list[dict[str, float]]] = {"unfused": [], "fused": []}
        for rep in range(args.reps):
            order = ["unfused", "fused"] if rep % 2 == 0 else ["fused", "unfused"]
            for path in order:
                results[path].append(run(path, args.threads, case))
        ms = {p: statistics.median(r["ms"] for r in rs) for p, rs in results.items()}
        mib = {p: statistics.median(r["peak_mib"] for r in rs) for p, rs in results.items()}
        print(f"{str(case):22s} {ms['unfused']:10.1f} {ms['fused']:9.1f} "
              f"{ms['unfused'] / ms['fused']:6.2f} {mib['unfused']:11.0f} {mib['fused']:9.0f}")


if __name__ == "__main__":
    main()
