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
