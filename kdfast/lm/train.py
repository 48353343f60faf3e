"""`kdfast lm cache` / `kdfast lm train`: the teacher's sparse cache and the student's training.

The student trains on next tokens: position t of a sequence predicts token t + 1, so the
hidden states of positions 0..L-2 meet the targets ``ids[:, 1:]`` and row t of the
token-level cache (the teacher's distribution after position t, :func:`kdfast.cache.build_cache`).
Two modes with the same budget, data order and seed: ``"hard"`` (cross-entropy on the true
next tokens) and ``"distill"`` (:func:`kdfast.sparse_distillation_loss` against the cached
sparse targets, mixed with the hard term by ``alpha``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

import kdfast
from kdfast._io import atomic_write_json
from kdfast._sparse_checks import SparseTargets
from kdfast.lm.student import StudentConfig, TinyCausalLM
from kdfast.train import save_checkpoint

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CHECKPOINT_FORMAT = "kdfast-lm-checkpoint"
MODES = ("hard", "distill")


# ----------------------------------------------------------------------------- the loss
def output_layer_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                      sparse: SparseTargets | None = None, *, temperature: float = 1.0,
                      teacher_temperature: float | None = None, alpha: float = 0.5,
                      tail: str = "renormalize") -> torch.Tensor:
    """Mean loss of the student's output layer ``weight`` applied to ``hidden`` ``(B, L, H)``
    against next-token ``target`` ``(B, L)`` (-100 = padding), plus the teacher's ``sparse``
    targets ``(B, L, k)`` when given (``alpha`` weighs the soft term).

    With the teacher's targets this is :func:`kdfast.linear_distillation_loss`: the output layer
    fused with the loss, so the ``(B, L, C)`` student logits never exist in full. The hard-label
    baseline forms the logits (as a plain training script does).
    """
    if sparse is None:
        logits = F.linear(hidden, weight)
        return F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=-100)
    return kdfast.linear_distillation_loss(hidden, weight, target, teacher_sparse=sparse, tail=tail,
                                           temperature=temperature,
                                           teacher_temperature=teacher_temperature, alpha=alpha)


def shift_sparse(sparse: SparseTargets) -> SparseTargets:
    """The cache's rows for positions 0..L-2 (the last position's next token is not in the
    sequence)."""
    return SparseTargets(*(None if t is None else t[:, :-1].contiguous() for t in sparse))


# ----------------------------------------------------------------------------- data
class TokenSequences(Dataset):
    """Rows of a ``(n, L)`` token array as 1-D int64 tensors (a token-level cache's items)."""

    def __init__(self, tokens: np.ndarray) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.tokens[i].astype(np.int64))


def batch_indices(step: int, batch_size: int, num_rows: int, seed: int) -> torch.Tensor:
    """Row ids of ``step``'s batch: consecutive slices of a seeded permutation per epoch, a
    pure function of the step (a resumed run sees the same batches)."""
    positions = step * batch_size + torch.arange(batch_size)
    epochs, offsets = positions // num_rows, positions % num_rows
    out = torch.empty(batch_size, dtype=torch.int64)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        mask = epochs == epoch
        out[mask] = perm[offsets[mask]]
    return out


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_lm(logits_of, tokens: np.ndarray, batch_size: int = 8) -> dict:
    """Next-token perplexity and accuracy of ``logits_of(ids) -> (B, L, V)`` over every
    position but the last of every sequence of ``tokens``."""
    nll, correct, count = 0.0, 0, 0
    for start in range(0, len(tokens), batch_size):
        ids = torch.from_numpy(tokens[start:start + batch_size].astype(np.int64))
        logits = logits_of(ids)[:, :-1].float()
        target = ids[:, 1:]
        nll += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    mean = nll / max(count, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "accuracy": correct / max(count, 1), "tokens": count}


# ----------------------------------------------------------------------------- training
@dataclass(frozen=True)
class LMTrainConfig:
    """One student run (stored in its checkpoint; a resume with other values is refused)."""

    mode: str = "hard"
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    clip_grad_norm: float = 1.0
    eval_every: int = 50
    eval_sequences: int = 32
    seed: int = 0
    temperature: float = 1.0
    alpha: float = 0.5
    tail: str = "renormalize"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10 % of ``lr``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        done = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))


def _optimizer(model: nn.Module, cfg: LMTrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "position" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "position" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def _run_identity(cfg: LMTrainConfig, student_cfg: StudentConfig, cache) -> dict:
    return {"train": asdict(cfg), "student": student_cfg.to_dict(),
            "cache": None if cache is None else cache.manifest.get("teacher")}


def _resume(out: Path, identity: dict, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list]:
    path = out / CHECKPOINT
    if not path.exists():
        return 0, []
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a kdfast LM checkpoint")
    if payload["identity"] != identity:
        raise ValueError(f"{path} was written by another run configuration; use another --out or delete it "
                         f"(saved {payload['identity']}, now {identity})")
    model.load_state_dict(payload["state_dict"])
    opt.load_state_dict(payload["optimizer"])
    return payload["step"], payload["history"]


def _save(out: Path, identity: dict, model, opt, step: int, history: list) -> None:
    save_checkpoint(out / CHECKPOINT, {"format": CHECKPOINT_FORMAT, "identity": identity, "step": step,
                                       "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                                       "history": history})
    atomic_write_json(out / METRICS, {"identity": identity, "history": history})


def _batch_loss(model: TinyCausalLM, ids: torch.Tensor, rows: torch.Tensor, cache, cfg: LMTrainConfig):
    hidden = model(ids)[:, :-1]
    target = ids[:, 1:]
    if cache is None:
        return output_layer_loss(hidden, model.output_weight, target)
    sparse = shift_sparse(cache.sparse_targets(rows, temperature=cfg.temperature, tail=cfg.tail))
    return output_layer_loss(hidden, model.output_weight, target, sparse, temperature=cfg.temperature,
                             teacher_temperature=cache.teacher_temperature, alpha=cfg.alpha, tail=cfg.tail)


def train_lm(student_cfg: StudentConfig, train_tokens: np.ndarray, valid_tokens: np.ndarray,
             out_dir: str | Path, cfg: LMTrainConfig, cache=None, progress: bool = True) -> dict:
    """Trains a :class:`TinyCausalLM` for ``cfg.steps`` steps on rows of ``train_tokens``
    (``"distill"``: with the token-level sparse ``cache`` built over the same rows),
    evaluating on ``valid_tokens[:cfg.eval_sequences]`` every ``cfg.eval_every`` steps.

    Writes ``checkpoint.pt`` and ``metrics.json`` at every evaluation; rerunning resumes from
    the checkpoint (same batches, so the result equals an uninterrupted run). Returns the
    metrics (``history``: step, train loss, validation perplexity / accuracy, tokens/s).
    """
    if (cfg.mode == "distill") != (cache is not None):
        need = "needs a cache" if cache is None else "takes no cache"
        raise ValueError(f"cache: mode={cfg.mode!r} {need}")
    if cache is not None and len(cache) != len(train_tokens):
        raise ValueError(f"cache: holds {len(cache)} sequences, train_tokens has {len(train_tokens)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = TinyCausalLM(student_cfg)
    opt = _optimizer(model, cfg)
    identity = _run_identity(cfg, student_cfg, cache)
    step, history = _resume(out, identity, model, opt)
    valid = valid_tokens[:cfg.eval_sequences]
    bar = tqdm(total=cfg.steps, initial=step, desc=f"student ({cfg.mode})", unit="step", disable=not progress)
    losses, tokens, started, cpu = [], 0, time.perf_counter(), time.process_time()
    while step < cfg.steps:
        model.train()
        rows = batch_indices(step, cfg.batch_size, len(train_tokens), cfg.seed)
        ids = torch.from_numpy(train_tokens[rows.numpy()].astype(np.int64))
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        loss = _batch_loss(model, ids, rows, cache, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
        opt.step()
        losses.append(loss.item())
        tokens += ids[:, 1:].numel()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
            model.eval()
            metrics = evaluate_lm(lambda x: model.logits(model(x)), valid)
            history.append({"step": step, "train_loss": float(np.mean(losses)), "valid": metrics,
                            "train_tokens_per_s": tokens / seconds,
                            # CPU time of this process: on a shared machine wall time mostly
                            # measures the other tenants.
                            "train_tokens_per_cpu_s": tokens / max(cpu_seconds, 1e-9)})
            if progress:
                bar.write(f"step {step}: train loss {history[-1]['train_loss']:.3f}, valid ppl "
                          f"{metrics['perplexity']:.2f}, acc {metrics['accuracy']:.3f}, "
                          f"{tokens / seconds:.0f} tok/s", file=sys.stderr)
            _save(out, identity, model, opt, step, history)
            losses, tokens, started, cpu = [], 0, time.perf_counter(), time.process_time()
    bar.close()
    return json.loads((out / METRICS).read_text())
