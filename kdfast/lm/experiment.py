"""`kdfast lm --preset quick|full`: the whole LM distillation path as one resumable command.

data -> the teacher's held-out perplexity -> one token-level sparse cache per target kind ->
per seed, a hard-label student and one distilled student per (cache, tail) with the same
budget, data order and seed -> each student's held-out (test split) perplexity and accuracy
-> ``results.json``, ``results.md`` and ``valid_perplexity.png`` in the output directory.
Every step keeps what an earlier run finished (caches and students resume; evaluations are
stored), so a killed run continues where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from kdfast._io import atomic_write_json
from kdfast.lm.student import StudentConfig, TinyCausalLM
from kdfast.lm.train import CHECKPOINT, LMTrainConfig, evaluate_lm, train_lm


@dataclass(frozen=True)
class CacheSpec:
    """One sparse cache of the experiment: ``targets`` with its ``build_cache`` arguments,
    and the tails the students read it with."""

    targets: str
    k: int | None = None
    samples: int | None = None
    temperature: float | None = None
    tails: tuple[str, ...] = ("renormalize",)

    @property
    def name(self) -> str:
        parts = [self.targets.replace("+", "-")]
        if self.k:
            parts.append(f"k{self.k}")
        if self.samples:
            parts.append(f"n{self.samples}")
        return "-".join(parts)


@dataclass(frozen=True)
class LMPreset:
    """A token budget and the students trained on it (see :data:`PRESETS`)."""

    name: str
    sequences: int                 # training sequences cached and trained on (x seq_len tokens)
    caches: tuple[CacheSpec, ...]
    seeds: tuple[int, ...]
    train: LMTrainConfig           # mode is set per student
    student: dict = field(default_factory=dict)   # StudentConfig fields other than vocab/max_len
    eval_sequences: int = 16       # first N test sequences of the final evaluation (and the teacher's)
    teacher_batch_size: int = 8


_QUICK_TRAIN = LMTrainConfig(steps=48, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=12, eval_sequences=8)
_FULL_TRAIN = LMTrainConfig(steps=96, batch_size=16, lr=3e-3, warmup_steps=8, eval_every=24,
                            eval_sequences=32)
PRESETS = {
    # ~150 k cached tokens; two seeds of the hard-label and the top-k bucket students (the
    # 10-minute budget holds four students; the full preset compares the tails and kinds).
    "quick": LMPreset("quick", sequences=586, seeds=(0, 1), train=_QUICK_TRAIN,
                      caches=(CacheSpec("topk", k=32, tails=("bucket",)),)),
    # ~1 M cached tokens, the three caches from one teacher pass at the same 132 bytes per token
    # (4 bytes an entry + 4 for the top-k tail); one seed of 5 students (60-minute budget).
    "full": LMPreset("full", sequences=4096, seeds=(0,), train=_FULL_TRAIN, eval_sequences=64,
                     caches=(CacheSpec("topk", k=32, tails=("renormalize", "bucket")),
                             CacheSpec("sampled", samples=33, temperature=1.0),
                             CacheSpec("topk+sampled", k=16, samples=16, temperature=1.0))),
}


def _stored(path: Path, compute):
    """``compute()``'s JSON result, stored at ``path`` so that a rerun skips it."""
    if path.exists():
        return json.loads(path.read_text())
    value = compute()
    atomic_write_json(path, value)
    return value


def _evaluate_student(run_dir: Path, student_cfg: StudentConfig, tokens: np.ndarray) -> dict:
    payload = torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True)
    model = TinyCausalLM(student_cfg)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return evaluate_lm(lambda x: model.logits(model(x)), tokens)


def _students(preset: LMPreset) -> list[tuple[str, str, CacheSpec | None, int]]:
    """(run name, tail, cache, seed) of every student, hard-label first within a seed."""
    runs = []
    for seed in preset.seeds:
        runs.append((f"hard-s{seed}", "renormalize", None, seed))
        runs += [(f"{c.name}-{tail}-s{seed}", tail, c, seed) for c in preset.caches for tail in c.tails]
    return runs


def _build_caches(preset: LMPreset, teacher, fingerprint: str, tokens: np.ndarray, out: Path,
                  data_sha: str, progress: bool) -> dict:
    """Every cache of the preset from one teacher pass; their statistics by cache name."""
    from kdfast.lm.teacher import build_lm_caches

    if not preset.caches:
        return {}

    def build():
        outputs = {out / f"cache-{spec.name}": {"targets": spec.targets, "k": spec.k, "samples": spec.samples,
                                               "temperature": spec.temperature}
                   for spec in preset.caches}
        stats = build_lm_caches(teacher, tokens, outputs, fingerprint=fingerprint,
                                dataset_fingerprint=f"{data_sha}:{len(tokens)}",
                                batch_size=preset.teacher_batch_size, progress=progress)
        return {spec.name: stats[out / f"cache-{spec.name}"] for spec in preset.caches}

    return _stored(out / "caches.json", build)


def _bare_forward(preset: LMPreset, teacher, probe: np.ndarray, out: Path) -> float:
    """The teacher forward alone over ``probe``: the cache build's baseline."""
    from kdfast.lm.teacher import bare_forward_tokens_per_s

    return _stored(out / "bare-forward.json",
                   lambda: bare_forward_tokens_per_s(teacher, probe, preset.teacher_batch_size))


def _teacher_stage(preset: LMPreset, root: Path, out: Path, tokens: np.ndarray, test: np.ndarray,
                   train_sha: str, progress: bool) -> dict:
    """The teacher's test perplexity, the caches and the bare forward's rate (the teacher is
    loaded only here, and freed before the students train)."""
    from kdfast.lm.data import load_teacher
    from kdfast.lm.teacher import TeacherLogits, teacher_fingerprint

    teacher = TeacherLogits(load_teacher(root / "teacher"), torch.bfloat16)
    with torch.inference_mode():
        teacher_eval = _stored(out / "teacher-test.json", lambda: evaluate_lm(teacher, test))
    fingerprint = teacher_fingerprint(root / "teacher", torch.bfloat16)
    caches = _build_caches(preset, teacher, fingerprint, tokens, out, train_sha, progress)
    probe = tokens[: 2 * preset.teacher_batch_size]  # two batches
    return {"teacher_test": teacher_eval, "caches": caches,
            "teacher_forward_tokens_per_s": _bare_forward(preset, teacher, probe, out),
            "bare_forward_tokens": int(probe.size)}


def _student_stage(preset: LMPreset, student_cfg: StudentConfig, tokens: np.ndarray, valid: np.ndarray,
                   test: np.ndarray, out: Path, progress: bool) -> dict:
    """Every student of the preset, trained (or resumed) and evaluated on ``test``."""
    from kdfast.cache import open_cache

    students = {}
    for name, tail, spec, seed in _students(preset):
        cfg = replace(preset.train, mode="hard" if spec is None else "distill", tail=tail, seed=seed)
        cache = None if spec is None else open_cache(out / f"cache-{spec.name}")
        metrics = train_lm(student_cfg, tokens, valid, out / name, cfg, cache=cache, progress=progress)
        final = _stored(out / name / "test.json",
                        lambda n=name: _evaluate_student(out / n, student_cfg, test))
        students[name] = {"cache": None if spec is None else spec.name, "tail": tail, "seed": seed,
                          "test": final, "history": metrics["history"]}
    return students


def run_lm_experiment(preset: LMPreset, out_dir: str | Path, data_dir: str | Path | None = None, *,
                      progress: bool = True, plot: bool = True) -> dict:
    """Runs ``preset`` into ``out_dir`` (resumable) and returns the results it writes there:
    ``results.json``, ``results.md`` (:func:`results_table`) and ``valid_perplexity.png``."""
    from kdfast.lm.data import default_lm_dir, load_split, prepare_lm_data, read_manifest

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_preset_of(out, preset)
    started = time.perf_counter()
    root = Path(data_dir) if data_dir is not None else default_lm_dir()
    # Data prepared earlier (`kdfast data lm`, or placed by hand) is used as it is.
    manifest = read_manifest(root) or prepare_lm_data(root, progress=progress)
    tokens = load_split(root, "train")[: preset.sequences]
    test = load_split(root, "test")[: preset.eval_sequences]
    train_sha = manifest["splits"]["train"]["sha256"]
    results = {"preset": _preset_dict(preset),
               **_teacher_stage(preset, root, out, tokens, test, train_sha, progress)}
    student_cfg = StudentConfig(vocab_size=manifest["vocab_size"], max_len=manifest["seq_len"],
                                **preset.student)
    results["students"] = _student_stage(preset, student_cfg, tokens, load_split(root, "valid"), test, out,
                                         progress)
    results.update(wall_s_this_run=time.perf_counter() - started, torch_threads=torch.get_num_threads())
    atomic_write_json(out / "results.json", results)
    (out / "results.md").write_text(results_table(results))
    if plot:
        plot_validation(results, out / "valid_perplexity.png")
    return results


def _preset_dict(preset: LMPreset) -> dict:
    return json.loads(json.dumps(asdict(preset)))


def _check_preset_of(out: Path, preset: LMPreset) -> None:
    """Refuses an output directory that holds another preset's runs (they would be mixed)."""
    path = out / "preset.json"
    mine = _preset_dict(preset)
    if path.exists() and json.loads(path.read_text()) != mine:
        raise ValueError(f"out_dir: {out} holds the runs of another preset configuration; use another --out")
    atomic_write_json(path, mine)


def summarize(results: dict) -> list[dict]:
    """One row per student kind (seeds pooled): mean and spread of test perplexity and accuracy."""
    groups: dict[tuple, list] = {}
    for run in results["students"].values():
        groups.setdefault((run["cache"], run["tail"] if run["cache"] else None), []).append(run)
    rows = []
    for (cache, tail), runs in groups.items():
        ppl = np.array([r["test"]["perplexity"] for r in runs])
        acc = np.array([r["test"]["accuracy"] for r in runs])
        bytes_per_token = results["caches"][cache]["bytes_per_token"] if cache else None
        # Training rate: the median over the runs' evaluation intervals (wall clock).
        rates = [h["train_tokens_per_s"] for r in runs for h in r["history"] if "train_tokens_per_s" in h]
        rows.append({"student": "hard labels" if cache is None else f"{cache}, {tail}", "seeds": len(runs),
                     "perplexity": float(ppl.mean()), "perplexity_spread": float(ppl.max() - ppl.min()),
                     "accuracy": float(acc.mean()), "bytes_per_token": bytes_per_token,
                     "train_tokens_per_s": float(np.median(rates)) if rates else None})
    return rows


def results_table(results: dict) -> str:
    """Markdown: the teacher and every student kind (test split), with the caches' sizes and rates."""
    t = results["teacher_test"]
    lines = ["| model | seeds | test perplexity (spread) | test accuracy | cache bytes/token "
             "| train tokens/s |", "| --- | --- | --- | --- | --- | --- |",
             f"| teacher (SmolLM2-135M, bf16 body) | - | {t['perplexity']:.1f} | {t['accuracy']:.3f} "
             "| - | - |"]
    for row in summarize(results):
        size = "-" if row["bytes_per_token"] is None else f"{row['bytes_per_token']:.1f}"
        rate = "-" if row["train_tokens_per_s"] is None else f"{row['train_tokens_per_s']:.0f}"
        lines.append(f"| {row['student']} | {row['seeds']} | {row['perplexity']:.1f} "
                     f"({row['perplexity_spread']:.1f}) | {row['accuracy']:.3f} | {size} | {rate} |")
    lines += ["", *_cache_lines(results)]
    return "\n".join(lines) + "\n"


def _cache_lines(results: dict) -> list[str]:
    """The one teacher pass that wrote every cache (rate, overhead) and each cache's size."""
    caches = results["caches"]
    if not caches:
        return []
    stats = next(iter(caches.values()))  # one pass: the rates are the same for every cache
    bare = results["teacher_forward_tokens_per_s"]
    lines = [f"Bare teacher forward (separate run over {results.get('bare_forward_tokens', '?')} tokens): "
             f"{bare:.0f} tokens/s."]
    if stats.get("tokens_per_s"):
        overhead = stats.get("overhead")
        inside = "" if overhead is None else f"; target extraction + hashing + writing: {overhead:+.1%} " \
            "over its own teacher forwards"
        lines.append(f"One teacher pass wrote {len(caches)} cache(s): {stats['tokens_computed']} tokens at "
                     f"{stats['tokens_per_s']:.0f} tokens/s{inside}.")
    lines += ["", "| cache | bytes/token | dense float16 bytes/token | dense / sparse |",
              "| --- | --- | --- | --- |"]
    for name, stats in caches.items():
        ratio = stats["dense_fp16_bytes_per_token"] / stats["bytes_per_token"]
        lines.append(f"| {name} | {stats['bytes_per_token']:.1f} | {stats['dense_fp16_bytes_per_token']} "
                     f"| {ratio:.0f}x |")
    return lines


def plot_validation(results: dict, path: str | Path) -> None:
    """Validation perplexity per step of every student (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in results["students"].items():
        steps = [h["step"] for h in run["history"]]
        ax.plot(steps, [h["valid"]["perplexity"] for h in run["history"]], marker="o", ms=3, label=name,
                linestyle="-" if run["cache"] else "--")
    ax.axhline(results["teacher_test"]["perplexity"], color="black", lw=0.8, label="teacher (test)")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation perplexity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
