"""The teacher side: logits with a float32 output layer, the token-level sparse cache, and
the teacher's held-out perplexity."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kdfast.cache import build_caches
from kdfast.lm.train import TokenSequences


class TeacherLogits(nn.Module):
    """A transformers causal LM whose body runs in ``body_dtype`` (bfloat16 is ~2.5x faster
    than float32 on the CPU) and whose output layer runs in float32: bf16 logits near 20
    are quantized in steps of 0.125, too coarse for stored targets. ``forward(ids)`` gives
    ``(B, L, V)`` float32 logits."""

    def __init__(self, lm: nn.Module, body_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        head = lm.get_output_embeddings().weight
        # A float32 copy taken before the cast (the head may be tied to the input embedding).
        self.register_buffer("head", head.detach().float().clone(), persistent=False)
        self.body = lm.get_decoder().to(body_dtype)
        self.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=ids).last_hidden_state
        return F.linear(hidden.float(), self.head)


def teacher_fingerprint(teacher_dir: str | Path, body_dtype: torch.dtype) -> str:
    """The converted model's SHA-256 (recorded by :func:`kdfast.lm.data.convert_teacher`, else
    hashed here) and the body dtype: what the cached targets depend on."""
    teacher_dir = Path(teacher_dir)
    marker = teacher_dir / "converted.json"
    if marker.exists():
        model_sha = json.loads(marker.read_text())["model_sha256"]
    else:
        model_sha = hashlib.sha256((teacher_dir / "model.safetensors").read_bytes()).hexdigest()
    return f"{model_sha}:{str(body_dtype).removeprefix('torch.')}:f32-head"


def build_lm_cache(teacher: TeacherLogits, tokens: np.ndarray, out_dir: str | Path, *, fingerprint: str,
                   dataset_fingerprint: str, targets: str = "topk", k: int | None = 32,
                   samples: int | None = None, temperature: float | None = None, batch_size: int = 8,
                   dtype: str = "float16", seed: int = 0, progress: bool = True,
                   overwrite: bool = False) -> dict:
    """The token-level sparse cache of ``teacher`` over the sequences ``tokens`` (rows of
    ``(n, L)``): :func:`build_lm_caches` with one output."""
    target_args = lm_target_args(targets, k, samples, temperature, seed)
    stats = build_lm_caches(teacher, tokens, {out_dir: target_args}, fingerprint=fingerprint,
                            dataset_fingerprint=dataset_fingerprint, batch_size=batch_size, dtype=dtype,
                            progress=progress, overwrite=overwrite)
    return next(iter(stats.values()))


def lm_target_args(targets: str, k: int | None, samples: int | None, temperature: float | None,
                   seed: int) -> dict:
    """One cache's target arguments for :func:`build_lm_caches` from the single-cache options
    (``kdfast lm cache --targets``): a "sampled" cache takes no k, a "topk" one no sampling
    arguments, so each kind ignores the options of the others."""
    args = {"targets": targets, "seed": seed, "k": None if targets == "sampled" else k}
    if targets != "topk":
        args.update(samples=samples, temperature=temperature)
    return args


def build_lm_caches(teacher: TeacherLogits, tokens: np.ndarray, outputs: dict, *, fingerprint: str,
                    dataset_fingerprint: str, batch_size: int = 8, dtype: str = "float16",
                    progress: bool = True, overwrite: bool = False) -> dict[Path, dict]:
    """Token-level sparse caches of ``teacher`` over the sequences ``tokens`` (rows of ``(n, L)``)
    from one teacher pass (:func:`kdfast.cache.build_caches`; ``outputs`` maps each directory to
    its target arguments, e.g. ``{"topk": {"targets": "topk", "k": 32}}``). Returns each
    directory's statistics: tokens/s of the pass (all outputs together), the pass's time over
    its teacher forwards alone (``overhead``: target extraction, hashing and writing, measured
    in the same run), bytes per token, and the dense float16 cache's bytes per token."""
    # About 16 shards (the unit of a torchrun build), on batch boundaries.
    rows_per_shard = max(1, len(tokens) // (16 * batch_size)) * batch_size
    results = build_caches(teacher, TokenSequences(tokens), outputs, batch_size=batch_size,
                           rows_per_shard=rows_per_shard, dtype=dtype, teacher_fingerprint=fingerprint,
                           dataset_fingerprint=dataset_fingerprint, progress=progress, overwrite=overwrite)
    num_tokens = int(tokens.size)
    stats = {}
    for out, result in results.items():
        shard_bytes = sum((out / s["file"]).stat().st_size for s in result.manifest["shards"])
        computed = result.rows_computed * tokens.shape[1]
        stats[out] = {"tokens": num_tokens, "tokens_computed": computed, "seconds": result.seconds,
                      "tokens_per_s": computed / result.seconds if result.seconds else None,
                      "teacher_seconds": result.teacher_seconds,
                      "overhead": (result.seconds / result.teacher_seconds - 1
                                   if result.teacher_seconds else None),
                      "bytes_per_token": shard_bytes / num_tokens,
                      "dense_fp16_bytes_per_token": 2 * result.manifest["num_classes"]}
    return stats


@torch.inference_mode()
def bare_forward_tokens_per_s(teacher: TeacherLogits, tokens: np.ndarray, batch_size: int) -> float:
    """Tokens/s of the teacher's forward alone over ``tokens`` (the cache build's baseline)."""
    started = time.perf_counter()
    for start in range(0, len(tokens), batch_size):
        teacher(torch.from_numpy(tokens[start:start + batch_size].astype(np.int64)))
    return tokens.size / (time.perf_counter() - started)
