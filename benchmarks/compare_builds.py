"""Two builds of kdfast timed against each other, alternated in fresh processes.

On a shared, drifting host a build's speed is only comparable with another's measured in the
same minutes: this runs forward+backward of `kdfast.distillation_loss` for each case in a fresh
process per build and repeat, alternating the order, and prints medians and spreads.

    # a build of the previous commit beside the working tree's:
    git worktree add /tmp/kdfast-base HEAD~1 && (cd /tmp/kdfast-base && \
        ../path/to/.venv/bin/python setup.py -q build_ext --inplace)
    .venv/bin/python benchmarks/compare_builds.py /tmp/kdfast-base . --threads 2 --reps 9

Each DIR is a folder holding a built `kdfast` package (its `_C` extension next to it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = [
    ("kl", "float32", 1024, 32000), ("kl", "float32", 4096, 1000), ("kl", "float32", 8192, 10),
    ("jsd", "float32", 8192, 10), ("kl", "bfloat16", 1024, 32000), ("jsd", "float32", 1024, 32000),
    ("reverse_kl", "float32", 1024, 32000), ("kl", "float32", 256, 128256),
]

# Runs in the child: times every case with the kdfast found first on sys.path.
CHILD = r"""
import json, sys, time, torch, kdfast
threads, cases = int(sys.argv[1]), json.loads(sys.argv[2])
torch.set_num_threads(threads)
out = {}
for kind, dtype, n, c in cases:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, c, generator=g).to(getattr(torch, dtype)).requires_grad_()
    t = torch.randn(n, c, generator=g).to(getattr(torch, dtype))
    y = torch.randint(0, c, (n,), generator=g)
    def step():
        kdfast.distillation_loss(s, t, y, temperature=2.0, alpha=0.5, kind=kind).backward()
        s.grad = None
    for _ in range(2):
        step()
    times = []
    for _ in range(7):
        t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
    out[f"{kind} {dtype} {n}x{c}"] = sorted(times)[3] * 1e3
print(json.dumps(out))
"""


def run_build(path: str, threads: int, cases: list) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path), OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), json.dumps(cases)], env=env,
                         capture_output=True, text=True, check=True, cwd="/")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="folder holding the baseline build's kdfast package")
    parser.add_argument("new", help="folder holding the new build's kdfast package")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9, help="alternations of the two builds")
    parser.add_argument("--cases", default=None,
                        help="comma list of kind:dtype:NxC to time (default: all of CASES)")
    args = parser.parse_args()
    cases = CASES
    if args.cases:
        wanted = {tuple(c.split(":")) for c in args.cases.split(",")}
        cases = [c for c in CASES if (c[0], c[1], f"{c[2]}x{c[3]}") in wanted]
        if len(cases) != len(wanted):
            parser.error(f"--cases: unknown case in {args.cases!r}; known: "
                         + ", ".join(f"{k}:{d}:{n}x{c}" for k, d, n, c in CASES))
    times: dict[str, dict[str, list[float]]] = {"base": {}, "new": {}}
    for rep in range(args.reps):
        order = [("base", args.base), ("new", args.new)]
        for name, path in order if rep % 2 == 0 else order[::-1]:
            for case, ms in run_build(path, args.threads, cases).items():
                times[name].setdefault(case, []).append(ms)
    print(f"{'case':34s} {'base ms':>8s} {'new ms':>8s} {'new/base':>8s}  spreads")
    for case, base in times["base"].items():
        new = times["new"][case]
        b, n = statistics.median(base), statistics.median(new)
        print(f"{case:34s} {b:8.2f} {n:8.2f} {n / b:8.3f}  [{min(base):.2f}-{max(base):.2f}] "
              f"[{min(new):.2f}-{max(new):.2f}]")


if __name__ == "__main__":
    main()
