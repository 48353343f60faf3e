"""Throughput of 1 vs 2 processes (torchrun, gloo) for the cache build and for training.

    python benchmarks/scaling.py [--rows 60000] [--repeats 3] [--out benchmarks/results/scaling.md]

Workload shaped like the MNIST experiments on random inputs: a 784-1200-1200-10 teacher
writes a float16 cache of `--rows` rows (batch 4096), then a 784-800-800-10 student trains one
epoch from it (batch 128 per process). Each configuration runs `--repeats` times; the table
has the medians. The same script is the worker (`worker build|train ...`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [  # (label, processes, torch threads per process)
    ("1 process x 1 thread", 1, 1),
    ("1 process x 2 threads", 1, 2),
    ("2 processes x 1 thread (torchrun)", 2, 1),
]


def _data(rows: int):
    import torch

    return torch.rand(rows, 784, generator=torch.Generator().manual_seed(0))


def worker(argv: list[str]) -> None:
    import torch

    from kdfast import KDLoss, distributed
    from kdfast.cache import build_cache
    from kdfast.models import mlp
    from kdfast.train import TrainConfig, fit

    mode, rows, threads = argv[0], int(argv[1]), int(argv[2])
    torch.set_num_threads(threads)
    distributed.init_from_env("cpu")
    x = _data(rows)
    if mode == "build":
        torch.manual_seed(0)
        result = build_cache(mlp([784, 1200, 1200, 10]), x, argv[3], batch_size=4096, progress=False)
        if distributed.is_main():
            print(json.dumps({"rows_per_s": result.rows_per_s}))
    else:
        torch.manual_seed(0)
        from torch.utils.data import TensorDataset

        train = TensorDataset(x)
        result = fit(mlp([784, 800, 800, 10]), train, teacher=argv[3], loss=KDLoss(temperature=4.0),
                     config=TrainConfig(epochs=1, batch_size=128, lr=0.05), out_dir=argv[4], progress=False)
        if distributed.is_main():
            print(json.dumps({"rows_per_s": result.history[-1]["rows_per_s"]}))
    distributed.shutdown()


def _launch(procs: int, threads: int, *args: str) -> float:
    cmd = [sys.executable, __file__, "worker", *args[:1], args[1], str(threads), *args[2:]]
    if procs > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
               "--master_addr=127.0.0.1", f"--master_port={port}", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=600).stdout
    return json.loads(out.strip().splitlines()[-1])["rows_per_s"]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/scaling.md")
    args = parser.parse_args()
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        thp = f.read().split("[")[1].split("]")[0]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for _ in range(args.repeats):  # configurations interleaved, repeat by repeat
            for label, procs, threads in CONFIGS:
                out = Path(tmp) / f"build-{procs}-{threads}-{time.monotonic_ns()}"
                build = _launch(procs, threads, "build", str(args.rows), str(out))
                if not cache.exists():
                    out.rename(cache)
                run = Path(tmp) / f"train-{procs}-{threads}-{time.monotonic_ns()}"
                train = _launch(procs, threads, "train", str(args.rows), str(cache), str(run))
                results.setdefault(label, {"build": [], "train": []})
                results[label]["build"].append(build)
                results[label]["train"].append(train)
                print(f"{label}: build {build:.0f} rows/s, train {train:.0f} rows/s", flush=True)
    lines = [
        f"Cache build and one training epoch, {args.rows} rows, medians of {args.repeats} "
        f"(THP `{thp}`, {os.cpu_count()} cores). Rows/s, higher is better.",
        "",
        "| configuration | cache build rows/s | training rows/s |",
        "|---|---|---|",
    ]
    for label, _, _ in CONFIGS:
        r = results[label]
        build, train = statistics.median(r["build"]), statistics.median(r["train"])
        lines.append(f"| {label} | {build:.0f} | {train:.0f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
