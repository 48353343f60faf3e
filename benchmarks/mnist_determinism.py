"""Why the MNIST numbers depend on the machine: the quick preset's teacher, first N steps,
under several thread counts and MKL instruction sets, compared bit for bit.

    python benchmarks/mnist_determinism.py [--steps 40]      # needs MNIST (kdfast data mnist)

Each configuration runs in its own process (thread count and MKL_ENABLE_INSTRUCTIONS are
read at start-up) and prints the SHA-256 of the teacher's weights after the steps. Same
digest = bit-identical training so far. Measured on 2026-12-02 (Intel Xeon, AVX-512, torch
2.13.0): 1 thread != 2 threads; MKL AVX2 != AVX-512 at 2 threads; every configuration equal to
itself when rerun, and the README's commit (c268a96) equal to this one under each.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import warnings

CONFIGS = (
    ("1 thread", {"threads": "1"}),
    ("2 threads", {"threads": "2"}),
    ("2 threads, again", {"threads": "2"}),
    ("2 threads, MKL AVX2", {"threads": "2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
)


def probe(threads: int, steps: int) -> str:
    """SHA-256 (16 hex digits) of the quick teacher's weights after ``steps`` steps."""
    import torch

    torch.set_num_threads(threads)
    from kdfast.data.mnist import load_mnist
    from kdfast.mnist_experiment import PRESETS, TEACHER_SIZES
    from kdfast.models import jitter, mlp
    from kdfast.train import TrainConfig, fit

    preset = PRESETS["quick"]
    torch.manual_seed(0)
    teacher = mlp(TEACHER_SIZES, dropout=preset.teacher_dropout)
    cfg = TrainConfig(epochs=1, batch_size=preset.batch_size, lr=preset.teacher_lr, seed=0,
                      warmup_epochs=1.0, max_batches=steps)
    fit(teacher, load_mnist("train"), config=cfg, progress=False,
        augment=lambda x, g: jitter(x, g, max_shift=preset.jitter))
    h = hashlib.sha256()
    for tensor in teacher.state_dict().values():
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child-threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_threads is not None:
        warnings.filterwarnings("ignore")
        print(probe(args.child_threads, args.steps))
        return
    for label, config in CONFIGS:
        env = {**os.environ, **{k: v for k, v in config.items() if k != "threads"}}
        out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child-threads",
                              config["threads"]], env=env, capture_output=True, text=True, check=True)
        print(f"{label:24s} {out.stdout.strip()}")


if __name__ == "__main__":
    main()
