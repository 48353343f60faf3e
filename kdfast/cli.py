"""The `kdfast` command line."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _cmd_info(_args: argparse.Namespace) -> int:
    import kdfast

    info = {"kdfast": kdfast.__version__, "torch": torch.__version__, **kdfast.build_info()}
    print(json.dumps(info, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kdfast.demo import run_demo

    run_demo(rows=args.rows, classes=args.classes, repeats=args.repeats)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.builder:
        return _cmd_bench_builder(args)
    from kdfast.bench import run_report

    if args.suite == "linear":
        from kdfast.bench.linear import run_linear_report

        threads = int(args.threads) if args.threads else None
        out = run_linear_report(args.out, quick=args.quick, repeats=args.repeats,
                                dtypes=tuple(args.dtypes.split(",")), threads=threads,
                                plot=not args.no_plot)
        print(f"wrote {out}/linear.md" + ("" if args.no_plot else ", linear.png"))
        return 0
    if args.sparse:
        from kdfast.bench.sparse import run_sparse_report

        threads = int(args.threads) if args.threads else 2
        out = run_sparse_report(args.out, repeats=args.repeats or 7, threads=threads)
        print(f"wrote {out}/sparse_results.csv, sparse_results.md")
        return 0

    shapes = None
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    threads = tuple(int(t) for t in args.threads.split(",")) if args.threads else None
    out = run_report(
        args.out, quick=args.quick, repeats=args.repeats, kinds=tuple(args.kinds.split(",")),
        dtypes=tuple(args.dtypes.split(",")), threads=threads, shapes=shapes, plot=not args.no_plot,
    )
    print(f"wrote {out}/results.csv, results.md" + ("" if args.no_plot else ", results.png"))
    return 0


def _cmd_bench_builder(args: argparse.Namespace) -> int:
    from kdfast.bench.builder import DEFAULT_SHAPE, markdown_row, run_builder_bench

    shape = tuple(int(v) for v in args.shapes.split("x")) if args.shapes else DEFAULT_SHAPE
    threads = int(args.threads) if args.threads else 2
    result = run_builder_bench(shape, k=args.k, dtype=args.dtypes.split(",")[0],
                               threads=threads, repeats=args.repeats or 7, out_dir=args.out)
    print(markdown_row(result), end="")
    print(f"wrote {args.out}/builder.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdfast",
        description="Fused knowledge-distillation losses for PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the build: backends, CPU instruction sets, CUDA archs")
    info.set_defaults(func=_cmd_info)
    demo = sub.add_parser(
        "demo",
        help="check the fused loss against the reference, time it, and distill a small student",
    )
    demo.add_argument("--rows", type=int, default=1024, help="N of the timed batch (default 1024)")
    demo.add_argument(
        "--classes", type=int, default=32000, help="C of the timed batch (default 32000)"
    )
    demo.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    demo.set_defaults(func=_cmd_demo)
    bench = sub.add_parser(
        "bench",
        help="time kdfast vs eager PyTorch vs torch.compile (forward+backward), with the roofline",
        description="Times forward+backward of kdfast, the eager F.kl_div + F.cross_entropy loss "
        "and its torch.compile'd version, interleaved, over (N, C) shapes, dtypes, kinds and "
        "thread counts; writes results.csv, results.md and results.png.",
    )
    bench.add_argument("--out", default="benchmarks/results", help="output directory")
    bench.add_argument("--suite", choices=("loss", "linear"), default="loss",
                       help="loss: the fused loss on logits (default); linear: the output layer "
                            "fused with the loss, from hidden states (one thread count)")
    bench.add_argument("--quick", action="store_true", help="2 shapes, 5 repeats")
    bench.add_argument("--repeats", type=int, default=None, help="timed repeats per case")
    bench.add_argument("--kinds", default="kl,jsd", help="comma list (default kl,jsd)")
    bench.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16")
    bench.add_argument("--threads", default=None, help="comma list (default 1 and all cores)")
    bench.add_argument("--shapes", default=None, help="comma list of NxC, e.g. 1024x32000,256x128256")
    bench.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    bench.add_argument("--builder", action="store_true",
                       help="the sparse-cache builder row instead: kdfast.topk_targets vs torch.topk + "
                       "one logsumexp per temperature (--shapes NxC, default 4096x49152; --k; "
                       "--threads N, default 2; --dtypes one of fp32,bf16,fp16)")
    bench.add_argument("--k", type=int, default=64, help="--builder: ids per row (default 64)")
    bench.add_argument("--sparse", action="store_true",
                       help="the sparse-target rows instead: (N, C, k) = (4096, 49152, 64) and (1024, "
                            "128256, 128), fp32, against the sparse eager/compiled baselines and the "
                            "dense op (--threads: one count, default 2)")
    bench.set_defaults(func=_cmd_bench)
    from kdfast.cli_distill import add_commands

    add_commands(sub)  # cache build|info|verify, train, mnist, data mnist|fashion-mnist, specialists
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"kdfast: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
