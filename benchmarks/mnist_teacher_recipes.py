"""What each change of the paper preset's teacher recipe buys: teacher and distilled-student
test errors for one recipe per process.

    python benchmarks/mnist_teacher_recipes.py RECIPE [--epochs 150] [--out DIR]
    RECIPE: old | paper | paper-no-max-norm | hinton2012        (needs MNIST: kdfast data mnist)

Each run trains the 784-1200-1200-10 teacher with the paper preset's optimizer, schedule and
2-pixel jitter under the recipe's regularizers, caches its logits, distils the paper preset's
student (784-800-800-10, T = 20, alpha = 0.9, 60 epochs) from that cache, and writes
``DIR/RECIPE/summary.json`` with both models' test errors per epoch. One thread per process,
so two recipes run side by side on the 2-core machine (numbers are then the 1-thread draw:
another thread count gives other last bits, see benchmarks/mnist_determinism.py). The README's
"what each change bought" table comes from these runs.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import kdfast
from kdfast.data.mnist import load_mnist
from kdfast.mnist_experiment import PRESETS, STUDENT_SIZES, _train_model, teacher_and_cache

# Teacher regularizers: dropout on hidden units, input dropout, max-norm (None: off).
RECIPES = {
    "old": dict(teacher_dropout=0.2, teacher_input_dropout=0.0, teacher_max_norm=None),
    "paper": dict(teacher_dropout=0.3, teacher_input_dropout=0.1, teacher_max_norm=3.5),
    "paper-no-max-norm": dict(teacher_dropout=0.3, teacher_input_dropout=0.1, teacher_max_norm=None),
    "hinton2012": dict(teacher_dropout=0.5, teacher_input_dropout=0.2, teacher_max_norm=3.5),
}


def run(recipe: str, epochs: int, out: Path) -> dict:
    """Teacher + cache (resumable) and the distilled student; returns the summary."""
    preset = replace(PRESETS["paper"], name=recipe, teacher_epochs=epochs, **RECIPES[recipe])
    train, test = load_mnist("train"), load_mnist("test")
    t0 = time.perf_counter()
    _, teacher_run, _ = teacher_and_cache(preset, train, test, out, progress=False)
    teacher_s = time.perf_counter() - t0
    loss = kdfast.KDLoss(temperature=preset.temperature, alpha=preset.alpha)
    t0 = time.perf_counter()
    # The paper preset's distilled student, trained exactly as run_mnist trains it.
    _, student_run = _train_model("student", STUDENT_SIZES, train, test, out, epochs=preset.student_epochs,
                                  lr=preset.student_lr, batch_size=preset.batch_size,
                                  warmup=preset.warmup_epochs, seed=0, clip=preset.student_clip_grad_norm,
                                  teacher=out / "cache", loss=loss, progress=False)
    summary = {
        "recipe": recipe, **RECIPES[recipe], "teacher_epochs": epochs, "threads": torch.get_num_threads(),
        "teacher_errors": [h.get("test_errors") for h in teacher_run.history],
        "student_errors": [h.get("test_errors") for h in student_run.history],
        "teacher_seconds": round(teacher_s, 1), "student_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("--epochs", type=int, default=150, help="teacher epochs (default 150)")
    parser.add_argument("--out", type=Path, default=Path("runs/teacher-recipes"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    summary = run(args.recipe, args.epochs, args.out / args.recipe)
    print(f"{args.recipe}: teacher {summary['teacher_errors'][-1]} test errors, distilled student "
          f"{summary['student_errors'][-1]}")


if __name__ == "__main__":
    main()
