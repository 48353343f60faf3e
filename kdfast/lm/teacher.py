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

from kdfast.cache import build_cache
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
    ``(n, L)``), via :func:`kdfast.cache.build_cache`; returns the build's statistics
    (tokens/s, bytes per token, and the dense float16 cache's bytes per token)."""
    sparse_args = {"k": k} if targets == "topk" else {"samples": samples, "temperature": temperature}
    if targets == "topk+sampled":
        sparse_args["k"] = k
    # About 16 shards (the unit of a torchrun build), on batch boundaries.
    rows_per_shard = max(1, len(tokens) // (16 * batch_size)) * batch_size
    result = build_cache(teacher, TokenSequences(tokens), out_dir, targets=targets, batch_size=batch_size,
                         rows_per_shard=rows_per_shard, dtype=dtype, seed=seed,
                         teacher_fingerprint=fingerprint, dataset_fingerprint=dataset_fingerprint,
                         progress=progress, overwrite=overwrite, **sparse_args)
    num_tokens = int(tokens.size)
    shard_bytes = sum((Path(out_dir) / s["file"]).stat().st_size for s in result.manifest["shards"])
    computed = result.rows_computed * tokens.shape[1]
    return {"tokens": num_tokens, "tokens_computed": computed, "seconds": result.seconds,
            "tokens_per_s": computed / result.seconds if result.seconds else None,
            "bytes_per_token": shard_bytes / num_tokens,
            "dense_fp16_bytes_per_token": 2 * result.manifest["num_classes"]}


@torch.inference_mode()
def bare_forward_tokens_per_s(teacher: TeacherLogits, tokens: np.ndarray, batch_size: int) -> float:
    """Tokens/s of the teacher's forward alone over ``tokens`` (the cache build's baseline)."""
    started = time.perf_counter()
    for start in range(0, len(tokens), batch_size):
        teacher(torch.from_numpy(tokens[start:start + batch_size].astype(np.int64)))
    return tokens.size / (time.perf_counter() - started)
