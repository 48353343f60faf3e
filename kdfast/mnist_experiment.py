"""The MNIST experiment of Hinton, Vinyals & Dean (2015), section 3, end to end.

1. Teacher 784-1200-1200-10 (ReLU, dropout) trained on inputs jittered by up to 2 pixels.
2. Its logits over the 60,000 training images, cached once (float16).
3. Student 784-800-800-10, no regularization, on hard labels.
4. The same student distilled from the cache at T = 20, alpha weighted toward the soft term.
5. Epoch time of distillation from the cache against a live teacher.
6. A temperature sweep of a small student (784-30-30-10) from the same cache: one cache
   serves every T.

Every stage checkpoints into ``out_dir``; running the same command again resumes.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import kdfast
from kdfast._io import atomic_write_json
from kdfast.cache import build_cache, open_cache
from kdfast.data.mnist import load_mnist
from kdfast.models import build_model, jitter, mlp, mlp_spec
from kdfast.train import TrainConfig, evaluate, fit

PAPER_ERRORS = {"teacher": 67, "student_hard": 146, "student_distilled": 74}
TEACHER_SIZES = (784, 1200, 1200, 10)
STUDENT_SIZES = (784, 800, 800, 10)
SWEEP_SIZES = (784, 30, 30, 10)


@dataclass(frozen=True)
class Preset:
    """One schedule of the experiment. The presets share the models and the recipe (SGD with
    Nesterov momentum, lr 0.1, 1 epoch of linear warm-up then cosine decay to 0, batch 128;
    students' gradients clipped to norm 5, which the T=20 soft term of a confident teacher
    needs in its first steps; float16 cache) and differ in epochs, in the teacher's
    regularization and in the temperature sweep. The defaults are the quick preset's teacher
    (dropout 0.2 on hidden units only); the paper preset's longer schedule affords the
    stronger regularization of Hinton et al. (2012): dropout 0.3, input dropout 0.1 and
    max-norm 3.5 on every unit's incoming weights (see the README for what each bought)."""

    name: str
    teacher_epochs: int
    student_epochs: int
    sweep_epochs: int
    batch_size: int = 128
    teacher_lr: float = 0.1
    student_lr: float = 0.1
    warmup_epochs: float = 1.0
    student_clip_grad_norm: float | None = 5.0
    teacher_dropout: float = 0.2
    teacher_input_dropout: float = 0.0
    teacher_max_norm: float | None = None
    jitter: int = 2
    temperature: float = 20.0
    alpha: float = 0.9
    sweep_temperatures: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 8.0, 20.0)
    sweep_alpha: float = 0.9
    cache_dtype: str = "float16"
    speed_batches: int = 100


PRESETS = {
    # Sized for <= 10 minutes on 2 CPU cores (about 5 when the cores are not shared).
    "quick": Preset("quick", teacher_epochs=20, student_epochs=12, sweep_epochs=4),
    # The full schedule, sized for <= 60 minutes on 2 cores; see the README for its wall time.
    "paper": Preset("paper", teacher_epochs=200, student_epochs=60, sweep_epochs=20,
                    teacher_dropout=0.3, teacher_input_dropout=0.1, teacher_max_norm=3.5,
                    sweep_temperatures=(1.0, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 20.0)),
}


def _history_errors(history: list[dict]) -> list[int | None]:
    return [h.get("test_errors") for h in history]


def _train_model(name, sizes, train, test, out, *, dropout=0.0, input_dropout=0.0, epochs, lr,
                 batch_size, warmup, seed, clip=None, max_norm=None, teacher=None, loss=None,
                 augment=None, progress=True):
    torch.manual_seed(seed)  # same initial weights for the same seed and sizes
    spec = mlp_spec(sizes, dropout=dropout, input_dropout=input_dropout)
    model = build_model(spec)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                      warmup_epochs=min(warmup, epochs), clip_grad_norm=clip, max_norm=max_norm)
    result = fit(model, train, teacher=teacher, loss=loss, config=cfg, eval_data=test, augment=augment,
                 out_dir=out / name, model_spec=spec, name=name, progress=progress)
    return model, result


def _measure_speed(train, teacher_model, cache_dir, preset: Preset, seed: int) -> dict:
    """Student rows/s with teacher rows from the cache vs from the live teacher, on the same
    batches; interleaved twice, best of each (the machine may be shared)."""
    loss = kdfast.KDLoss(temperature=preset.temperature, alpha=preset.alpha)
    cfg = TrainConfig(epochs=1, batch_size=preset.batch_size, max_batches=preset.speed_batches, seed=seed,
                      clip_grad_norm=preset.student_clip_grad_norm)
    cache = open_cache(cache_dir)
    best = {"cache": 0.0, "live": 0.0}
    for _ in range(2):
        for kind, source in (("cache", cache), ("live", teacher_model)):
            torch.manual_seed(seed)
            student = mlp(STUDENT_SIZES)
            rows_per_s = fit(student, train, teacher=source, loss=loss, config=cfg,
                             progress=False).final["rows_per_s"]
            best[kind] = max(best[kind], rows_per_s)
    n = len(train)
    return {
        "batches": preset.speed_batches, "batch_size": preset.batch_size,
        "cache_rows_per_s": best["cache"], "live_rows_per_s": best["live"],
        "cache_epoch_s": n / best["cache"], "live_epoch_s": n / best["live"],
        "speedup": best["cache"] / best["live"],
    }


def teacher_and_cache(preset: Preset, train, test, out: Path, seed: int = 0, progress: bool = True,
                      stage=None) -> tuple[torch.nn.Module, object, dict]:
    """Stages 1-2: trains the teacher into ``out/teacher`` and caches its logits over ``train``
    into ``out/cache`` (each resumed, i.e. skipped, when already complete). Returns the teacher,
    its :class:`~kdfast.train.TrainResult` and the cache build's statistics. ``stage(name, t0)``
    is called after each stage (timing/log). Shared by :func:`run_mnist` and the experiments of
    :mod:`kdfast.paper_experiments`, so they all distil from one teacher."""
    t0 = time.perf_counter()
    teacher, teacher_run = _train_model(
        "teacher", TEACHER_SIZES, train=train, test=test, out=out, batch_size=preset.batch_size, seed=seed,
        warmup=preset.warmup_epochs, progress=progress, dropout=preset.teacher_dropout,
        input_dropout=preset.teacher_input_dropout, max_norm=preset.teacher_max_norm,
        epochs=preset.teacher_epochs, lr=preset.teacher_lr,
        augment=(lambda x, g: jitter(x, g, max_shift=preset.jitter)))
    if stage is not None:
        stage("teacher", t0)

    t0 = time.perf_counter()
    built = build_cache(teacher, train, out / "cache", dtype=preset.cache_dtype, batch_size=4096,
                        progress=progress)
    if stage is not None:
        stage("cache build", t0)
    stats_path = out / "cache_build.json"
    if built.rows_computed or not stats_path.exists():
        # A resumed run finds the cache complete: keep the first build's numbers.
        atomic_write_json(stats_path, {
            "rows": len(train), "dtype": preset.cache_dtype, "rows_computed": built.rows_computed,
            "seconds": built.seconds, "rows_per_s": built.rows_per_s,
            "bytes": sum((out / "cache" / s["file"]).stat().st_size for s in built.manifest["shards"]),
        })
    return teacher, teacher_run, load_results(stats_path)


def run_mnist(preset: str | Preset = "quick", out_dir: str | Path | None = None,
              data_dir: str | Path | None = None, seed: int = 0, plot: bool = True,
              progress: bool = True, log=print) -> dict:
    """Runs the experiment; returns the results dict also written to ``out_dir/results.json``
    (and ``errors_per_epoch.png`` / ``temperature_sweep.png`` when ``plot``)."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        preset = PRESETS[preset]
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"mnist-{preset.name}"
    began = time.perf_counter()
    stages: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        stages[name] = round(time.perf_counter() - t0, 2)
        log(f"[{name}] done in {stages[name]:.1f} s (total {time.perf_counter() - began:.0f} s)")

    t0 = time.perf_counter()
    train, test = load_mnist("train", data_dir), load_mnist("test", data_dir)
    stage("load data", t0)
    out.mkdir(parents=True, exist_ok=True)  # after the data: a missing dataset leaves no empty run

    common = dict(train=train, test=test, out=out, batch_size=preset.batch_size, seed=seed,
                  warmup=preset.warmup_epochs, progress=progress)
    teacher, teacher_run, cache_stats = teacher_and_cache(preset, train, test, out, seed, progress, stage)

    t0 = time.perf_counter()
    clip = preset.student_clip_grad_norm
    _, hard_run = _train_model("student_hard", STUDENT_SIZES, epochs=preset.student_epochs,
                               lr=preset.student_lr, clip=clip, **common)
    stage("student, hard labels", t0)

    t0 = time.perf_counter()
    kd = kdfast.KDLoss(temperature=preset.temperature, alpha=preset.alpha)
    _, kd_run = _train_model("student_distilled", STUDENT_SIZES, epochs=preset.student_epochs,
                             lr=preset.student_lr, clip=clip, teacher=out / "cache", loss=kd, **common)
    stage("student, distilled", t0)

    t0 = time.perf_counter()
    speed = _measure_speed(train, teacher, out / "cache", preset, seed)
    stage("speed: cache vs live teacher", t0)

    t0 = time.perf_counter()
    sweep = {"sizes": list(SWEEP_SIZES), "epochs": preset.sweep_epochs, "alpha": preset.sweep_alpha,
             "hard_errors": None, "errors": {}}
    _, run = _train_model("sweep/hard", SWEEP_SIZES, epochs=preset.sweep_epochs, lr=preset.student_lr,
                          clip=clip, **common)
    sweep["hard_errors"] = run.final["test_errors"]
    for t in preset.sweep_temperatures:
        loss = kdfast.KDLoss(temperature=t, alpha=preset.sweep_alpha)
        _, run = _train_model(f"sweep/T{t:g}", SWEEP_SIZES, epochs=preset.sweep_epochs,
                              lr=preset.student_lr, clip=clip, teacher=out / "cache", loss=loss, **common)
        sweep["errors"][f"{t:g}"] = run.final["test_errors"]
    stage("temperature sweep", t0)

    results = {
        "preset": asdict(preset), "seed": seed,
        "test_errors": {
            "teacher": evaluate(teacher, test)["errors"],
            "student_hard": hard_run.final["test_errors"],
            "student_distilled": kd_run.final["test_errors"],
        },
        "paper_test_errors": PAPER_ERRORS,
        "errors_per_epoch": {
            "teacher": _history_errors(teacher_run.history),
            "student_hard": _history_errors(hard_run.history),
            "student_distilled": _history_errors(kd_run.history),
        },
        # Training time per model summed over its epochs (eval excluded): survives resumes,
        # unlike stage_seconds, which only times this invocation.
        "train_seconds": {name: round(sum(h["seconds"] for h in run.history), 1) for name, run in
                          (("teacher", teacher_run), ("student_hard", hard_run),
                           ("student_distilled", kd_run))},
        "cache": cache_stats, "speed": speed, "sweep": sweep,
        "stage_seconds": stages, "wall_seconds": round(time.perf_counter() - began, 1),
        "machine": machine_info(),
    }
    atomic_write_json(out / "results.json", results)
    if plot:
        plot_results(results, out)
    log(format_table(results))
    log(f"wrote {out / 'results.json'}" + (", errors_per_epoch.png, temperature_sweep.png" if plot else ""))
    return results


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info() -> dict:
    """Where a run ran. The CPU model, torch's CPU capability and the thread count are part
    of the result: with the same seed, MKL's matrix products round differently on another
    instruction set or another thread count, and training amplifies the last-bit difference
    into other test errors (see the README's MNIST section)."""
    return {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "cpu_model": _cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "kdfast": kdfast.__version__, "python": platform.python_version(),
            "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def format_table(results: dict) -> str:
    """The headline table (markdown): test errors out of 10,000 beside the paper's."""
    e, p = results["test_errors"], results["paper_test_errors"]
    pre = results["preset"]
    rows = [
        ("teacher 784-1200-1200-10, dropout, 2-px jitter", "teacher"),
        ("student 784-800-800-10, hard labels", "student_hard"),
        (f"student 784-800-800-10, distilled from the cache, T={pre['temperature']:g}, "
         f"alpha={pre['alpha']:g}", "student_distilled"),
    ]
    lines = [f"| model | kdfast `{pre['name']}` | paper |", "| --- | ---: | ---: |"]
    lines += [f"| {label} | {e[key]} | {p[key]} |" for label, key in rows]
    s, c = results["speed"], results["cache"]
    lines.append("")
    lines.append(f"cache build: {c['rows_per_s']:.0f} rows/s; student epoch from the cache "
                 f"{s['cache_epoch_s']:.1f} s vs live teacher {s['live_epoch_s']:.1f} s "
                 f"({s['speedup']:.2f}x); wall time {results['wall_seconds']:.0f} s")
    return "\n".join(lines)


def plot_results(results: dict, out: Path) -> None:
    """``errors_per_epoch.png`` (three models, paper values dashed) and
    ``temperature_sweep.png`` (small student's errors against T)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"teacher": "tab:blue", "student_hard": "tab:red", "student_distilled": "tab:green"}
    labels = {"teacher": "teacher 1200-1200 (dropout, jitter)",
              "student_hard": "student 800-800, hard labels",
              "student_distilled": f"student 800-800, distilled T={results['preset']['temperature']:g}"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, errors in results["errors_per_epoch"].items():
        epochs = [i + 1 for i, v in enumerate(errors) if v is not None]
        ax.plot(epochs, [v for v in errors if v is not None], "o-", ms=3, color=colors[key],
                label=labels[key])
        ax.axhline(results["paper_test_errors"][key], ls="--", lw=1, color=colors[key], alpha=0.6)
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test errors (of 10,000)")
    ax.set_title(f"MNIST, preset {results['preset']['name']!r} (dashed: the paper's final errors)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "errors_per_epoch.png", dpi=100)
    plt.close(fig)

    sweep = results["sweep"]
    temps = [float(t) for t in sweep["errors"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(temps, list(sweep["errors"].values()), "o-", color="tab:green",
            label=f"distilled from one cache (alpha={sweep['alpha']:g})")
    ax.axhline(sweep["hard_errors"], ls="--", color="tab:red", label="hard labels")
    ax.set_xscale("log")
    ax.set_xticks(temps, [f"{t:g}" for t in temps])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("test errors (of 10,000)")
    sizes = "-".join(str(s) for s in sweep["sizes"])
    ax.set_title(f"student {sizes}, {sweep['epochs']} epochs per T")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "temperature_sweep.png", dpi=100)
    plt.close(fig)


def load_results(path: str | Path) -> dict:
    """Reads a results.json written by :func:`run_mnist`."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)
