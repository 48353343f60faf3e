"""Students from sparse vs dense soft-target caches on sklearn digits (issue 12's acceptance).

The 64-256-256-10 teacher of tests/test_train.py (all 1,204 labelled training digits), its
caches on the unlabelled transfer set (dense float16; top-k k = 3 with the tail at T = 4;
n = 12 samples at T_s = 4), and a 64-32-10 student per cache and seed, trained at T = 4 with
the soft term only, 30 epochs. Prints a markdown table of test errors (of 593).

    python benchmarks/sparse_cache_digits.py [--seeds 0 1 2] [--out /tmp/sparse-digits]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import kdfast
from kdfast.cache import SoftTargetCache, build_cache
from kdfast.data import load_digits_split
from kdfast.models import mlp
from kdfast.train import TrainConfig, evaluate, fit

T = 4.0
CACHES = {  # name -> build_cache arguments
    "dense (float16)": {},
    "top-3, bucket": {"targets": "topk", "k": 3, "temperatures": (T,)},
    "top-3, renormalize": {"targets": "topk", "k": 3, "temperatures": (T,)},
    "sampled, n = 12": {"targets": "sampled", "samples": 12, "temperature": T},
}


def loss_for(name: str) -> kdfast.KDLoss | kdfast.SparseKDLoss:
    if name.startswith("dense"):
        return kdfast.KDLoss(temperature=T)
    if name.startswith("sampled"):
        return kdfast.SparseKDLoss(temperature=T, teacher_temperature=1.0)
    return kdfast.SparseKDLoss(temperature=T, tail="bucket" if "bucket" in name else "renormalize")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="cache directory (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="sparse-digits-"))
    train, test = load_digits_split()
    torch.manual_seed(0)
    teacher = mlp([64, 256, 256, 10], dropout=0.2)
    fit(teacher, train, config=TrainConfig(epochs=30, batch_size=64, lr=0.05, seed=0), progress=False)
    transfer = TensorDataset(train.tensors[0])
    rows = []
    for name, kwargs in CACHES.items():
        path = out / name.split(",")[0].split(" ")[0]
        build_cache(teacher, transfer, path, batch_size=512, progress=False, **kwargs)
        errors = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            student = mlp([64, 32, 10])
            fit(student, transfer, teacher=path, loss=loss_for(name),
                config=TrainConfig(epochs=30, batch_size=64, lr=0.05, seed=seed), progress=False)
            errors.append(evaluate(student, test)["errors"])
        rows.append((name, SoftTargetCache(path).bytes_per_row, errors))
    print(f"teacher: {evaluate(teacher, test)['errors']} errors of {len(test)}\n")
    print("| cache | bytes per row | test errors (of 593), seeds " + ", ".join(map(str, args.seeds))
          + " | mean ± spread |")
    print("| --- | --- | --- | --- |")
    for name, size, errors in rows:
        spread = (max(errors) - min(errors)) / 2
        print(f"| {name} | {size} | {', '.join(map(str, errors))} | "
              f"{statistics.mean(errors):.1f} ± {spread:.1f} |")


if __name__ == "__main__":
    main()
