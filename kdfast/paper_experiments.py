"""The paper's other MNIST experiments (Hinton, Vinyals & Dean 2015, sections 3 and 6), run from
the teacher and the soft-target cache of :func:`kdfast.mnist_experiment.run_mnist`.

- ``omit-3``: the 784-800-800-10 student is distilled on a transfer set with every 3 removed.
  A 3 is never the argmax target, only soft mass, and the 3's output bias ends up too low;
  raising it by delta repairs most errors on the 3s.
- ``only-7-8``: the transfer set holds only 7s and 8s; lowering the 7 and 8 biases repairs
  most of the errors on the other digits.
- ``few-data``: students on 3 % of the training set, with hard labels and with the soft
  targets of the teacher trained on all the data (soft targets as a regularizer).

The bias shifts are chosen on a validation split held out of the training set (the students
never train on it); the paper chose them on the test set, which this module also reports.
Results go to ``OUT/<experiment>/results.json`` (+ a plot); students checkpoint there too.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import kdfast
from kdfast._io import atomic_write_json
from kdfast.cache import open_cache
from kdfast.data.mnist import load_mnist
from kdfast.mnist_experiment import (
    PRESETS,
    STUDENT_SIZES,
    Preset,
    load_results,
    machine_info,
    teacher_and_cache,
)
from kdfast.models import build_model, mlp_spec
from kdfast.train import CachedTeacher, TrainConfig, evaluate, fit, load_checkpoint

EXPERIMENTS = ("omit-3", "only-7-8", "few-data")
# Section 3 (MNIST) and table 5 (speech: frame accuracy of the 85M-parameter acoustic model).
PAPER = {
    "omit-3": {"test_errors": 206, "class_errors": 133, "class_n": 1010, "bias_shift": 3.5,
               "test_errors_shifted": 109, "class_errors_shifted": 14, "chosen_on": "test set"},
    "only-7-8": {"test_error_rate": 0.473, "test_error_rate_shifted": 0.132, "bias_shift": -7.6,
                 "chosen_on": "test set"},
    "few-data": {"task": "speech frame classification (accuracy)",
                 "hard_full_data": {"train_accuracy": 0.634, "test_accuracy": 0.589},
                 "hard_3pct": {"train_accuracy": 0.673, "test_accuracy": 0.445},
                 "soft_3pct": {"train_accuracy": 0.654, "test_accuracy": 0.570}},
}


@dataclass(frozen=True)
class ExperimentConfig:
    """What the experiments add to a :class:`~kdfast.mnist_experiment.Preset` (whose student
    recipe, T and alpha they use): the validation split, the bias grid and the few-data runs."""

    val_fraction: float = 1 / 12  # 5,000 of MNIST's 60,000 training images
    bias_max: float = 12.0  # |delta| searched in [0, bias_max]
    bias_step: float = 0.1
    few_data_fraction: float = 0.03  # of the whole training set: 1,800 MNIST images
    few_data_epochs: int = 60  # fixed schedule; early stopping picks an epoch of it
    few_data_seeds: tuple[int, ...] = (0, 1, 2)


# ------------------------------------------------------------------------------ helpers
def split_validation(n: int, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_rows, val_rows)``: a seeded random ``fraction`` of ``range(n)`` held out, both
    sorted."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def subset(data: TensorDataset, rows: torch.Tensor) -> TensorDataset:
    """The rows ``rows`` of a TensorDataset, as a TensorDataset."""
    return TensorDataset(*(t[rows] for t in data.tensors))


@torch.no_grad()
def logits_of(model: torch.nn.Module, data: TensorDataset, batch_size: int = 2000) -> torch.Tensor:
    """The model's logits over a dataset, in eval mode (mode restored)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x) for x in data.tensors[0].split(batch_size)])
    finally:
        model.train(was_training)


def shift_errors(logits: torch.Tensor, labels: torch.Tensor, classes: list[int],
                 shifts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each delta in ``shifts``: errors over all rows, and over the rows labelled with one
    of ``classes``, when delta is added to the logits (i.e. the output biases) of ``classes``."""
    mask = torch.zeros(logits.shape[-1], dtype=logits.dtype)
    mask[classes] = 1.0
    wrong = (logits[None] + shifts[:, None, None] * mask).argmax(-1) != labels[None]  # (S, N)
    affected = torch.isin(labels, torch.tensor(classes))
    return wrong.sum(1), wrong[:, affected].sum(1)


def bias_grid(cfg: ExperimentConfig, sign: float) -> torch.Tensor:
    """The deltas searched: 0, sign*step, ..., sign*bias_max (0 first, so ties keep the
    smallest shift)."""
    steps = round(cfg.bias_max / cfg.bias_step)
    return sign * torch.arange(steps + 1, dtype=torch.float64).float() * cfg.bias_step + 0.0  # no -0.0


def output_bias(model: torch.nn.Module) -> torch.Tensor:
    """The bias of the model's last linear layer (the class biases)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].bias.detach().clone()


def _rate(errors: int | float, n: int) -> float:
    return float(errors) / max(n, 1)


# --------------------------------------------------------------------------- the context
@dataclass
class _Context:
    """What every experiment shares: data, splits, teacher, cache, and where results go."""

    preset: Preset
    cfg: ExperimentConfig
    out: Path
    seed: int
    progress: bool
    log: Callable[[str], None]
    train: TensorDataset
    test: TensorDataset
    train_rows: torch.Tensor  # training rows the students may train on
    val_rows: torch.Tensor  # held out: chooses the bias shifts, stops early
    teacher_test_errors: int
    stages: dict

    @property
    def cache_dir(self) -> Path:
        return self.out / "cache"

    def stage(self, name: str, t0: float) -> None:
        self.stages[name] = round(time.perf_counter() - t0, 2)
        self.log(f"[{name}] done in {self.stages[name]:.1f} s")

    def val(self) -> TensorDataset:
        return subset(self.train, self.val_rows)


def _train_student(ctx: _Context, name: str, rows: torch.Tensor, *, distil: bool, epochs: int, seed: int,
                   out_dir: Path | None = None, eval_test: bool = True, on_epoch=None):
    """The preset's 784-800-800-10 student on training rows ``rows``: hard labels, or distilled
    from the cache rows of the same images at the preset's T and alpha."""
    p = ctx.preset
    torch.manual_seed(seed)  # same initial weights for the same seed
    spec = mlp_spec(STUDENT_SIZES)
    student = build_model(spec)
    config = TrainConfig(epochs=epochs, batch_size=p.batch_size, lr=p.student_lr, seed=seed,
                         warmup_epochs=min(p.warmup_epochs, epochs), clip_grad_norm=p.student_clip_grad_norm)
    teacher = CachedTeacher(ctx.cache_dir, rows=rows) if distil else None
    loss = kdfast.KDLoss(temperature=p.temperature, alpha=p.alpha) if distil else None
    run = fit(student, subset(ctx.train, rows), teacher=teacher, loss=loss, config=config,
              eval_data=ctx.test if eval_test else None, out_dir=out_dir, model_spec=spec, name=name,
              progress=ctx.progress, on_epoch=on_epoch)
    return student, run


# ------------------------------------------------------------------ omit-3 and only-7-8
@dataclass(frozen=True)
class _BiasSetup:
    """One bias-shift experiment: the transfer set keeps the rows whose label ``keep`` accepts;
    ``classes`` get the shift, in direction ``sign``; ``focus`` marks the test rows it repairs."""

    name: str
    keep: Callable[[torch.Tensor], torch.Tensor]
    classes: tuple[int, ...]
    sign: float
    focus: Callable[[torch.Tensor], torch.Tensor]
    focus_label: str


BIAS_SETUPS = {
    "omit-3": _BiasSetup("omit-3", keep=lambda y: y != 3, classes=(3,), sign=1.0,
                         focus=lambda y: y == 3, focus_label="3s"),
    "only-7-8": _BiasSetup("only-7-8", keep=lambda y: (y == 7) | (y == 8), classes=(7, 8), sign=-1.0,
                           focus=lambda y: (y != 7) & (y != 8), focus_label="digits other than 7 and 8"),
}


def _margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logit of the true class minus the largest other logit (< 0: misclassified)."""
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - others.max(1).values


def bias_analysis(student: torch.nn.Module, transfer_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  test_logits: torch.Tensor, test_labels: torch.Tensor, setup: _BiasSetup,
                  temperature: float) -> dict:
    """Why the shifted classes' biases are off, in numbers: each class's output bias minus the
    mean of the others; the soft mass the teacher and the student give the shifted classes on
    the transfer set at T and at 1; how often they are the teacher's argmax there; and the
    margins of the test rows the shift repairs."""
    bias = output_bias(student)
    c = bias.numel()
    gaps = [float(bias[k] - (bias.sum() - bias[k]) / (c - 1)) for k in range(c)]
    classes = list(setup.classes)

    def mass(logits: torch.Tensor, t: float) -> float:
        return float(torch.softmax(logits.double() / t, -1)[:, classes].sum(-1).mean())

    focus = setup.focus(test_labels)
    margins = _margins(test_logits[focus], test_labels[focus])
    return {
        "output_bias": bias.tolist(), "bias_minus_mean_of_others": gaps,
        "teacher_mass_at_T": mass(teacher_logits, temperature),
        "student_mass_at_T": mass(transfer_logits, temperature),
        "teacher_mass_at_1": mass(teacher_logits, 1.0), "student_mass_at_1": mass(transfer_logits, 1.0),
        "teacher_argmax_rows": int(torch.isin(teacher_logits.argmax(-1), torch.tensor(classes)).sum()),
        "transfer_rows": len(transfer_logits),
        "focus_test_rows": int(focus.sum()),
        "focus_margin_quantiles": {f"{q:g}": float(margins.quantile(q)) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
    }


def _shift_summary(grid, errors, class_errors, i: int) -> dict:
    return {"bias_shift": round(float(grid[i]), 6), "test_errors": int(errors[i]),
            "class_errors": int(class_errors[i])}


def _bias_experiment(ctx: _Context, setup: _BiasSetup) -> dict:
    """Distils the student on the reduced transfer set, then searches the bias shift."""
    labels = ctx.train.tensors[1]
    rows = ctx.train_rows[setup.keep(labels[ctx.train_rows])]
    t0 = time.perf_counter()
    student, run = _train_student(ctx, setup.name, rows, distil=True, epochs=ctx.preset.student_epochs,
                                  seed=ctx.seed, out_dir=ctx.out / setup.name / "student")
    ctx.stage(f"{setup.name}: student", t0)

    val, test_labels = ctx.val(), ctx.test.tensors[1]
    grid = bias_grid(ctx.cfg, setup.sign)
    test_logits = logits_of(student, ctx.test)
    val_errors, _ = shift_errors(logits_of(student, val), val.tensors[1], list(setup.classes), grid)
    test_errors, test_class = shift_errors(test_logits, test_labels, list(setup.classes), grid)
    focus = setup.focus(test_labels)
    test_focus = shift_errors(test_logits[focus], test_labels[focus], list(setup.classes), grid)[0]
    chosen, best_on_test = int(val_errors.argmin()), int(test_errors.argmin())  # first: smallest |delta|

    def at(i: int) -> dict:
        return {**_shift_summary(grid, test_errors, test_class, i), "focus_errors": int(test_focus[i]),
                "val_errors": int(val_errors[i])}

    teacher_rows = open_cache(ctx.cache_dir)[rows].float()
    return {
        "transfer_rows": len(rows), "val_rows": len(ctx.val_rows), "shifted_classes": list(setup.classes),
        "focus": setup.focus_label, "test_n": len(test_labels), "focus_n": int(focus.sum()),
        "class_n": int(torch.isin(test_labels, torch.tensor(setup.classes)).sum()),
        "before": at(0), "chosen_on_validation": at(chosen), "chosen_on_test": at(best_on_test),
        "curve": {"bias_shift": [round(float(d), 6) for d in grid], "val_errors": val_errors.tolist(),
                  "test_errors": test_errors.tolist(), "focus_errors": test_focus.tolist()},
        "errors_per_epoch": [h.get("test_errors") for h in run.history],
        "train_seconds": round(sum(h["seconds"] for h in run.history), 1),
        "bias": bias_analysis(student, logits_of(student, subset(ctx.train, rows)), teacher_rows, test_logits,
                              test_labels, setup, ctx.preset.temperature),
    }


# ------------------------------------------------------------------------------- few-data
def few_data_rows(train_rows: torch.Tensor, n_total: int, fraction: float, seed: int) -> torch.Tensor:
    """``round(fraction * n_total)`` rows drawn from ``train_rows`` by ``seed`` (sorted)."""
    n = max(1, round(fraction * n_total))
    if n > len(train_rows):
        raise ValueError(f"few_data_fraction {fraction} of {n_total} rows is more than the {len(train_rows)} "
                         "rows outside the validation split")
    pick = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(seed))[:n]
    return train_rows[pick].sort().values


def _few_data_run(ctx: _Context, kind: str, rows: torch.Tensor, seed: int) -> dict:
    """One student on the few rows: the fixed schedule's last epoch, and early stopping (the
    epoch of the schedule with the fewest validation errors; first on ties)."""
    val = ctx.val()
    best: dict = {"val_errors": None}
    val_curve: list[int] = []

    def on_epoch(model: torch.nn.Module, record: dict) -> None:
        errors = evaluate(model, val)["errors"]
        record["val_errors"] = errors
        val_curve.append(errors)
        if best["val_errors"] is None or errors < best["val_errors"]:
            best.update(val_errors=errors, epoch=record["epoch"], state=copy.deepcopy(model.state_dict()))

    student, run = _train_student(ctx, f"few-data {kind} seed {seed}", rows, distil=kind == "soft",
                                  epochs=ctx.cfg.few_data_epochs, seed=seed, eval_test=False,
                                  on_epoch=on_epoch)
    few = subset(ctx.train, rows)

    def scores(epoch: int, val_errors: int) -> dict:
        return {"epoch": epoch, "train_errors": evaluate(student, few)["errors"], "train_n": len(few),
                "test_errors": evaluate(student, ctx.test)["errors"], "test_n": len(ctx.test),
                "val_errors": val_errors, "val_n": len(val)}

    fixed = scores(ctx.cfg.few_data_epochs, val_curve[-1])
    student.load_state_dict(best["state"])
    return {"kind": kind, "seed": seed, "rows": len(rows), "fixed_schedule": fixed,
            "early_stopping": scores(best["epoch"], best["val_errors"]), "val_errors_per_epoch": val_curve,
            "train_seconds": round(sum(h["seconds"] for h in run.history), 1)}


def _mean_std(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(t) > 1 else 0.0, "values": values}


def _few_data_summary(runs: dict[str, list[dict]]) -> dict:
    """Train and test error rates (mean, std over seeds) per kind and stopping rule."""
    summary = {}
    for kind, kind_runs in runs.items():
        for rule in ("fixed_schedule", "early_stopping"):
            picked = [r[rule] for r in kind_runs]
            summary[f"{kind}/{rule}"] = {
                "train_error_rate": _mean_std([_rate(p["train_errors"], p["train_n"]) for p in picked]),
                "test_error_rate": _mean_std([_rate(p["test_errors"], p["test_n"]) for p in picked]),
                "test_errors": _mean_std([p["test_errors"] for p in picked]),
                "epoch": [p["epoch"] for p in picked],
            }
    return summary


def _full_data_reference(ctx: _Context) -> dict:
    """Train and test errors of the main experiment's full-data students (``kdfast mnist``
    in the same OUT), when they have been trained."""
    reference = {}
    for name in ("student_hard", "student_distilled"):
        path = ctx.out / name / "checkpoint.pt"
        if not path.exists():
            continue
        model, payload = load_checkpoint(path)
        reference[name] = {"epochs": payload["epoch"], "train_errors": evaluate(model, ctx.train)["errors"],
                           "train_n": len(ctx.train), "test_errors": evaluate(model, ctx.test)["errors"],
                           "test_n": len(ctx.test)}
    return reference


def _few_data_experiment(ctx: _Context) -> dict:
    """Hard-label and soft-target students on the same few rows, for each seed (each run's
    result is kept in OUT/few-data/runs/, so a rerun only trains the missing ones)."""
    runs: dict[str, list[dict]] = {"hard": [], "soft": []}
    run_dir = ctx.out / "few-data" / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    for seed in ctx.cfg.few_data_seeds:
        rows = few_data_rows(ctx.train_rows, len(ctx.train), ctx.cfg.few_data_fraction, seed)
        for kind in runs:
            path = run_dir / f"{kind}-seed{seed}.json"
            if path.exists():
                result = load_results(path)
            else:
                t0 = time.perf_counter()
                result = _few_data_run(ctx, kind, rows, seed)
                ctx.stage(f"few-data: {kind}, seed {seed}", t0)
                atomic_write_json(path, result)
            runs[kind].append(result)
    return {"rows": len(rows), "epochs": ctx.cfg.few_data_epochs, "seeds": list(ctx.cfg.few_data_seeds),
            "runs": runs, "summary": _few_data_summary(runs), "full_data": _full_data_reference(ctx)}


# ------------------------------------------------------------------------------- driver
def _context(preset: Preset, cfg: ExperimentConfig, out: Path, data_dir, seed: int, progress: bool,
             log) -> _Context:
    """Loads MNIST, trains (or resumes) the teacher and its cache, splits off validation."""
    train, test = load_mnist("train", data_dir), load_mnist("test", data_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    ctx = _Context(preset, cfg, out, seed, progress, log, train, test, *split_validation(
        len(train), cfg.val_fraction, seed), teacher_test_errors=-1, stages=stages)
    teacher, _, _ = teacher_and_cache(preset, train, test, out, seed, progress, ctx.stage)
    open_cache(ctx.cache_dir, teacher=teacher, dataset=train)  # the cache is this teacher's, on this set
    ctx.teacher_test_errors = evaluate(teacher, test)["errors"]
    return ctx


def run_experiment(experiment: str, preset: str | Preset = "quick", out_dir: str | Path | None = None,
                   data_dir: str | Path | None = None, seed: int = 0, config: ExperimentConfig | None = None,
                   plot: bool = True, progress: bool = True, log=print) -> dict:
    """Runs one of :data:`EXPERIMENTS` and returns its results, also written to
    ``OUT/<experiment>/results.json`` (and a PNG when ``plot``).

    ``OUT`` (default ``runs/mnist-<preset>``) is :func:`~kdfast.mnist_experiment.run_mnist`'s
    run directory: the teacher and the cache there are reused (trained first if missing), so
    every experiment distils from the teacher of the main table. Rerunning resumes.
    """
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {EXPERIMENTS}, got {experiment!r}")
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        preset = PRESETS[preset]
    cfg = config or ExperimentConfig()
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"mnist-{preset.name}"
    began = time.perf_counter()
    ctx = _context(preset, cfg, out, data_dir, seed, progress, log)
    t0 = time.perf_counter()
    if experiment == "few-data":
        body = _few_data_experiment(ctx)
    else:
        body = _bias_experiment(ctx, BIAS_SETUPS[experiment])
    results = {
        "experiment": experiment, "preset": asdict(preset), "config": asdict(cfg), "seed": seed,
        "teacher_test_errors": ctx.teacher_test_errors, **body, "paper": PAPER[experiment],
        "experiment_seconds": round(time.perf_counter() - t0, 1), "stage_seconds": ctx.stages,
        "wall_seconds": round(time.perf_counter() - began, 1), "machine": machine_info(),
    }
    exp_dir = out / experiment
    exp_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(exp_dir / "results.json", results)
    if plot:
        (plot_few_data if experiment == "few-data" else plot_bias_shift)(results, exp_dir)
    log(format_experiment(results))
    log(f"wrote {exp_dir / 'results.json'}")
    return results


# ------------------------------------------------------------------------ tables, plots
def _bias_table(r: dict) -> list[str]:
    p, before, val, test = r["paper"], r["before"], r["chosen_on_validation"], r["chosen_on_test"]
    classes = " and ".join(str(c) for c in r["shifted_classes"])
    if r["experiment"] == "omit-3":
        focus = f"errors on the {r['focus_n']:,} test 3s"
        paper_before, paper_after = (p["test_errors"], p["class_errors"]), (p["test_errors_shifted"],
                                                                           p["class_errors_shifted"])
    else:
        focus = f"errors on the {r['focus_n']:,} test {r['focus']}"
        paper_before = (f"{100 * p['test_error_rate']:.1f} %", "")
        paper_after = (f"{100 * p['test_error_rate_shifted']:.1f} %", "")
    pct = 100 / r["test_n"]
    return [
        f"| {r['experiment']} (transfer set: {r['transfer_rows']:,} rows) | kdfast | paper |",
        "| --- | ---: | ---: |",
        f"| test errors (of {r['test_n']:,}) | {before['test_errors']} ({before['test_errors'] * pct:.1f} %) "
        f"| {paper_before[0]} |",
        f"| {focus} | {before['focus_errors']} | {paper_before[1]} |",
        f"| bias shift of class {classes}, chosen on validation (paper: on the test set) | "
        f"{val['bias_shift']:+.1f} | {p['bias_shift']:+.1f} |",
        f"| test errors after the shift | {val['test_errors']} ({val['test_errors'] * pct:.1f} %) "
        f"| {paper_after[0]} |",
        f"| {focus} after the shift | {val['focus_errors']} | {paper_after[1]} |",
        f"| shift chosen on the test set, as in the paper: errors / on the focus digits | "
        f"{test['bias_shift']:+.1f}: {test['test_errors']} / {test['focus_errors']} | |",
    ]


def _few_data_table(r: dict) -> list[str]:
    s = r["summary"]
    lines = [f"| MNIST, {r['rows']:,} training images (3 %), {len(r['seeds'])} seeds | train error % | "
             "test error % | test errors | epoch |", "| --- | ---: | ---: | ---: | ---: |"]
    for key, label in (("hard/fixed_schedule", "hard labels, fixed schedule"),
                       ("hard/early_stopping", "hard labels, early stopping"),
                       ("soft/fixed_schedule", "soft targets, fixed schedule"),
                       ("soft/early_stopping", "soft targets, early stopping")):
        v = s[key]
        lines.append(f"| {label} | {100 * v['train_error_rate']['mean']:.2f} "
                     f"| {100 * v['test_error_rate']['mean']:.2f} ± {100 * v['test_error_rate']['std']:.2f} "
                     f"| {v['test_errors']['mean']:.0f} | {', '.join(str(e) for e in v['epoch'])} |")
    for name, ref in r["full_data"].items():
        lines.append(f"| full data ({ref['train_n']:,}), {name.replace('student_', '')} (`kdfast mnist`) "
                     f"| {100 * ref['train_errors'] / ref['train_n']:.2f} "
                     f"| {100 * ref['test_errors'] / ref['test_n']:.2f} | {ref['test_errors']} "
                     f"| {ref['epochs']} |")
    return lines


def format_experiment(results: dict) -> str:
    """The experiment's table (markdown) beside the paper's numbers, and its wall time."""
    lines = (_few_data_table(results) if results["experiment"] == "few-data" else _bias_table(results))
    lines += ["", f"teacher: {results['teacher_test_errors']} test errors; experiment "
              f"{results['experiment_seconds']:.0f} s, wall {results['wall_seconds']:.0f} s "
              f"({results['machine']['threads']} threads)"]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_axis(ax) -> None:
    """Log y axis labelled 0.5, 1, 2, ... instead of 10^0."""
    import matplotlib.ticker

    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)


def plot_bias_shift(results: dict, out: Path) -> None:
    """``bias_shift.png``: validation and test error rates, and the errors on the focus digits,
    against the bias shift; the shifts chosen on validation and by the paper marked."""
    plt = _pyplot()
    curve = results["curve"]
    shifts = curve["bias_shift"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(shifts, [100 * e / results["val_rows"] for e in curve["val_errors"]], color="tab:blue",
            label=f"validation ({results['val_rows']:,} training images held out)")
    ax.plot(shifts, [100 * e / results["test_n"] for e in curve["test_errors"]], color="tab:green",
            label="test, all digits")
    ax.plot(shifts, [100 * e / results["focus_n"] for e in curve["focus_errors"]], color="tab:red",
            label=f"test, {results['focus']}")
    ax.axvline(results["chosen_on_validation"]["bias_shift"], color="tab:blue", ls="--", lw=1,
               label="chosen on validation")
    ax.axvline(results["paper"]["bias_shift"], color="gray", ls=":", lw=1, label="paper's shift (test set)")
    _plain_log_axis(ax)
    classes = ", ".join(str(c) for c in results["shifted_classes"])
    ax.set_xlabel(f"shift added to the output bias of class {classes}")
    ax.set_ylabel("error rate (%)")
    ax.set_title(f"{results['experiment']}: 800-800 student distilled at T="
                 f"{results['preset']['temperature']:g}, {results['transfer_rows']:,} transfer images",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bias_shift.png", dpi=100)
    plt.close(fig)


def plot_few_data(results: dict, out: Path) -> None:
    """``few_data.png``: validation error rate per epoch of every few-data run (hard labels
    red, soft targets green), the full-data students' test error rates dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"hard": "tab:red", "soft": "tab:green"}
    names = {"hard": "hard labels", "soft": "soft targets"}
    for kind, runs in results["runs"].items():
        for i, run in enumerate(runs):
            curve = run["val_errors_per_epoch"]
            n = run["fixed_schedule"]["val_n"]
            ax.plot(range(1, len(curve) + 1), [100 * e / n for e in curve], color=colors[kind], lw=1,
                    alpha=0.8, label=f"{names[kind]}, {results['rows']:,} images" if i == 0 else None)
    for name, ref in results["full_data"].items():
        ax.axhline(100 * ref["test_errors"] / ref["test_n"], ls="--", lw=1,
                   color="tab:red" if name == "student_hard" else "tab:green",
                   label=f"all data, {name.replace('student_', '')} (test)")
    _plain_log_axis(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation error rate (%)")
    ax.set_title(f"few-data: {results['rows']:,} MNIST images, seeds {results['seeds']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "few_data.png", dpi=100)
    plt.close(fig)
