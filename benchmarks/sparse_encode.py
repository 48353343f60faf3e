"""What target extraction costs per batch of teacher logits: `encode_rows` for each sparse kind
at the LM preset's shape ((8 x 256) tokens x 49,152 classes, float32), with the compiled
sampler (`kdfast::inverse_cdf_draws`) and without it (the float64 cumsum + searchsorted
composition), interleaved in one run; medians of --repeats. The teacher forward of the same
batch is the yardstick (about 2.7 s for SmolLM2-135M on this 2-core host, `kdfast lm`).

    python benchmarks/sparse_encode.py [--rows 2048] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdfast.cache import sparse

KINDS = {  # the full LM preset's caches: 132 bytes per token each
    "topk k=32": ("topk", 32, None),
    "sampled n=33": ("sampled", None, 33),
    "topk+sampled k=16 n=16": ("topk+sampled", 16, 16),
}


def _encode(spec, z, keys, compiled: bool) -> float:
    original = sparse._has_draws_op
    if not compiled:
        sparse._has_draws_op = lambda: False
    try:
        start = time.perf_counter()
        sparse.encode_rows(spec, z, keys)
        return time.perf_counter() - start
    finally:
        sparse._has_draws_op = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=49_152)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # Logits shaped like a language model's: a few large, a long tail.
    z = torch.randn(args.rows, args.classes, generator=torch.Generator().manual_seed(0)) * 2.5
    keys = torch.stack([torch.arange(args.rows) // 256, torch.arange(args.rows) % 256], 1)
    cases = []
    for name, (targets, k, n) in KINDS.items():
        spec = sparse.make_spec(targets, args.classes, k=k, samples=n, temperatures=1.0 if n else None,
                                seed=0, logit_dtype="float16")
        cases += [(name, "compiled sampler", spec, True)]
        if n:
            cases += [(name, "cumsum + searchsorted", spec, False)]
    for _, _, spec, compiled in cases:  # warm-up
        _encode(spec, z[:64], keys[:64], compiled)
    times: dict[tuple[str, str], list[float]] = {(c[0], c[1]): [] for c in cases}
    for _ in range(args.repeats):  # interleaved: the host's load moves every case alike
        for name, how, spec, compiled in cases:
            times[(name, how)].append(_encode(spec, z, keys, compiled))
    print(f"encode_rows of ({args.rows}, {args.classes}) float32 logits, {args.threads} threads, "
          f"medians of {args.repeats}\n")
    print("| kind | sampler | seconds per batch |\n| --- | --- | --- |")
    for (name, how), values in times.items():
        print(f"| {name} | {how if 'sampled' in name else '-'} | {statistics.median(values):.3f} |")


if __name__ == "__main__":
    main()
