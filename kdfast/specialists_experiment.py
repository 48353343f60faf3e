"""The paper's specialists experiment (section 5, tables 3 and 4) on Fashion-MNIST, MNIST or
sklearn digits: a generalist MLP, specialists for its confusable classes, and the combination.

Stages: train the generalist (hard labels); cluster its classes from its predictions on the
training set; train one specialist per cluster (independent: in parallel processes when
``workers > 1``); on the test set, combine the generalist with the specialists active for each
example and compare test errors, overall and grouped by the number of active specialists
covering the true class (the paper's table 4).
"""

from __future__ import annotations

import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import kdfast
from kdfast._io import atomic_write_json
from kdfast.models import build_model, mlp_spec
from kdfast.specialists import (
    Specialist,
    active_specialists,
    combine,
    confusable_clusters,
    init_from_generalist,
    train_specialist,
)
from kdfast.train import TrainConfig, evaluate, fit

# Table 4 of the paper (JFT, 61 specialists): examples grouped by the number of active
# specialists covering the true class; relative top-1 accuracy change.
PAPER_TABLE4 = [
    {"covering": 0, "examples": 350037, "delta_correct": 0, "relative_change": 0.0},
    {"covering": 1, "examples": 141993, "delta_correct": 1421, "relative_change": 0.034},
    {"covering": 2, "examples": 67161, "delta_correct": 1572, "relative_change": 0.073},
    {"covering": 3, "examples": 38801, "delta_correct": 1124, "relative_change": 0.081},
    {"covering": 4, "examples": 26298, "delta_correct": 835, "relative_change": 0.087},
    {"covering": 5, "examples": 16474, "delta_correct": 561, "relative_change": 0.100},
    {"covering": 6, "examples": 10682, "delta_correct": 362, "relative_change": 0.113},
    {"covering": 7, "examples": 7376, "delta_correct": 232, "relative_change": 0.123},
    {"covering": 8, "examples": 4703, "delta_correct": 182, "relative_change": 0.137},
    {"covering": 9, "examples": 4706, "delta_correct": 208, "relative_change": 0.143},
    {"covering": "10 or more", "examples": 9082, "delta_correct": 324, "relative_change": 0.141},
]
# Table 3: JFT top-1 accuracy, baseline 25.0 %, with 61 specialists 26.1 % (+4.4 % relative).
PAPER_TABLE3 = {"baseline_top1": 0.250, "specialists_top1": 0.261}


@dataclass(frozen=True)
class SpecialistsPreset:
    """Schedule of the experiment: the generalist ``hidden``-``hidden`` MLP trained for
    ``generalist_epochs``; ``clusterings``: the k of each k-means clustering of the classes
    (several give overlapping specialists, as the paper's had); specialists train for
    ``specialist_epochs`` at ``specialist_lr``; ``top_n`` generalist classes activate them."""

    name: str
    hidden: int = 256
    generalist_epochs: int = 6
    generalist_dropout: float = 0.2
    specialist_epochs: int = 6
    lr: float = 0.1
    specialist_lr: float = 0.02
    batch_size: int = 128
    clusterings: tuple[int, ...] = (3, 4)
    top_n: int = 2
    combine_steps: int = 50
    keep_diagonal: bool = False


PRESETS = {
    "quick": SpecialistsPreset("quick"),
    "tiny": SpecialistsPreset("tiny", hidden=32, generalist_epochs=4, specialist_epochs=3, batch_size=64,
                              clusterings=(3,)),
}


@dataclass
class _Job:
    """One specialist's training, picklable for a worker process."""

    spec: dict
    state: dict
    classes: list[int]
    data: TensorDataset
    config: dict
    seed: int
    threads: int = 1


def _train_job(job: _Job) -> tuple[list[int], dict, float, float]:
    torch.set_num_threads(job.threads)
    generalist = build_model(job.spec)
    generalist.load_state_dict(job.state)
    began = time.perf_counter()
    s = train_specialist(generalist, job.classes, job.data, TrainConfig(**job.config), seed=job.seed)
    return s.classes, s.model.state_dict(), s.correction, time.perf_counter() - began


def train_specialists(generalist: torch.nn.Module, spec: dict, clusters: list[list[int]],
                      train: TensorDataset, config: TrainConfig, seed: int, workers: int
                      ) -> tuple[list[Specialist], list[float]]:
    """Trains every cluster's specialist, in ``workers`` processes (spawned, one thread each)
    when ``workers > 1``; returns them in cluster order with their training seconds."""
    jobs = [_Job(spec, generalist.state_dict(), cl, train, asdict(config), seed + i, 1 if workers > 1 else
                 torch.get_num_threads()) for i, cl in enumerate(clusters)]
    if workers > 1 and len(jobs) > 1:
        context = torch.multiprocessing.get_context("spawn")  # tensors go through shared memory
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            outputs = list(pool.map(_train_job, jobs))
    else:
        outputs = [_train_job(job) for job in jobs]
    specialists = []
    for classes, state, correction, _ in outputs:
        model = init_from_generalist(generalist, classes)
        model.load_state_dict(state)
        specialists.append(Specialist(classes, model, correction))
    return specialists, [o[3] for o in outputs]


@torch.no_grad()
def _log_probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([torch.log_softmax(model(b).double(), -1) for b in x.split(4096)])


def union_of_clusterings(probs: torch.Tensor, ks: tuple[int, ...], seed: int, keep_diagonal: bool = False
                         ) -> list[list[int]]:
    """The clusters of k-means with each k in ``ks`` (duplicates once): overlapping groups."""
    clusters: list[list[int]] = []
    for k in ks:
        for cl in confusable_clusters(probs, min(k, probs.shape[1]), seed=seed, keep_diagonal=keep_diagonal):
            if cl not in clusters and len(cl) < probs.shape[1]:
                clusters.append(cl)
    return clusters


def covering_table(y: torch.Tensor, generalist_pred: torch.Tensor, combined_pred: torch.Tensor,
                   active: torch.Tensor, clusters: list[list[int]]) -> list[dict]:
    """The paper's table 4: test examples grouped by the number of active specialists whose
    classes include the true class; per group the examples, correct before and after, the
    change and the relative accuracy change."""
    covers = torch.stack([torch.isin(y, torch.tensor(cl)) for cl in clusters], 1) if clusters else \
        torch.zeros(len(y), 0, dtype=torch.bool)
    count = (covers & active).sum(1)
    rows = []
    for k in range(int(count.max()) + 1 if len(count) else 0):
        group = count == k
        before = int((generalist_pred[group] == y[group]).sum())
        after = int((combined_pred[group] == y[group]).sum())
        rows.append({"covering": k, "examples": int(group.sum()), "correct_generalist": before,
                     "correct_combined": after, "delta_correct": after - before,
                     "relative_change": (after - before) / before if before else None})
    return rows


def _load(dataset: str, data_dir) -> tuple[TensorDataset, TensorDataset]:
    from kdfast.data import load_dataset

    return load_dataset(dataset, "train", data_dir), load_dataset(dataset, "test", data_dir)


def run_specialists(dataset: str = "fashion-mnist", preset: str | SpecialistsPreset = "quick",
                    out_dir: str | Path | None = None, data_dir: str | Path | None = None, seed: int = 0,
                    workers: int = 2, plot: bool = True, progress: bool = True, log=print) -> dict:
    """Runs the experiment; writes and returns ``out_dir/results.json`` (and ``table4.png``)."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"specialists-{dataset}-{preset.name}"
    began = time.perf_counter()
    stages: dict[str, float] = {}
    train, test = _load(dataset, data_dir)
    out.mkdir(parents=True, exist_ok=True)
    x, y = train.tensors[:2]
    classes = int(max(y.max(), test.tensors[1].max())) + 1

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    spec = mlp_spec((x.shape[1], preset.hidden, preset.hidden, classes), dropout=preset.generalist_dropout)
    generalist = build_model(spec)
    cfg = TrainConfig(epochs=preset.generalist_epochs, batch_size=preset.batch_size, lr=preset.lr, seed=seed,
                      warmup_epochs=min(1.0, preset.generalist_epochs))
    fit(generalist, train, config=cfg, eval_data=test, out_dir=out / "generalist", model_spec=spec,
        name="generalist", progress=progress)
    stages["generalist"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    clusters = union_of_clusterings(_log_probs(generalist, x).exp(), preset.clusterings, seed,
                                    preset.keep_diagonal)
    log(f"clusters of confusable classes: {clusters}")
    spec_cfg = TrainConfig(epochs=preset.specialist_epochs, batch_size=preset.batch_size,
                           lr=preset.specialist_lr, seed=seed)
    specialists, spec_seconds = train_specialists(generalist, spec, clusters, train, spec_cfg, seed, workers)
    stages["specialists"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    tx, ty = test.tensors[:2]
    log_g = _log_probs(generalist, tx)
    active = active_specialists(log_g.exp(), clusters, preset.top_n)
    log_s = [s.log_probs(tx) for s in specialists]
    log_q = combine(log_g, log_s, clusters, active, steps=preset.combine_steps)
    stages["combine"] = round(time.perf_counter() - t0, 2)
    g_pred, q_pred = log_g.argmax(1), log_q.argmax(1)
    results = {
        "dataset": dataset, "preset": asdict(preset), "seed": seed, "workers": workers,
        "clusters": clusters, "dustbin_corrections": [s.correction for s in specialists],
        "specialist_train_seconds": [round(t, 1) for t in spec_seconds],
        "test_errors": {"generalist": int((g_pred != ty).sum()), "combined": int((q_pred != ty).sum()),
                        "n": len(ty)},
        "generalist_errors_eval": evaluate(generalist, test)["errors"],
        "active_per_example": float(active.sum(1).double().mean()) if len(clusters) else 0.0,
        "table4": covering_table(ty, g_pred, q_pred, active, clusters),
        "paper_table3": PAPER_TABLE3, "paper_table4": PAPER_TABLE4,
        "stage_seconds": stages, "wall_seconds": round(time.perf_counter() - began, 1),
        "machine": {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "kdfast": kdfast.__version__, "python": platform.python_version(),
                    "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
    }
    atomic_write_json(out / "results.json", results)
    if plot:
        plot_table4(results, out / "table4.png")
    log(format_table(results))
    return results


def format_table(results: dict) -> str:
    """Test errors and the table 4 analogue, as markdown."""
    e = results["test_errors"]
    lines = [f"{results['dataset']}: test errors generalist {e['generalist']} / {e['n']}, generalist + "
             f"{len(results['clusters'])} specialists {e['combined']} (clusters {results['clusters']}); "
             f"wall {results['wall_seconds']:.0f} s", "",
             "| active specialists covering the true class | test examples | correct: generalist | "
             "combined | change | relative |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["table4"]:
        rel = "n/a" if r["relative_change"] is None else f"{100 * r['relative_change']:+.1f} %"
        lines.append(f"| {r['covering']} | {r['examples']} | {r['correct_generalist']} | "
                     f"{r['correct_combined']} | {r['delta_correct']:+d} | {rel} |")
    return "\n".join(lines)


def plot_table4(results: dict, path: Path) -> None:
    """Relative accuracy change by number of covering specialists, beside the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [(r["covering"], 100 * (r["relative_change"] or 0.0)) for r in results["table4"]]
    paper = [(i, 100 * r["relative_change"]) for i, r in enumerate(results["paper_table4"])]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.bar([k - 0.2 for k, _ in ours], [v for _, v in ours], 0.4, label=f"kdfast, {results['dataset']}")
    ax.bar([k + 0.2 for k, _ in paper], [v for _, v in paper], 0.4, label="paper, JFT (10 = 10 or more)")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("active specialists covering the true class")
    ax.set_ylabel("relative accuracy change (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
