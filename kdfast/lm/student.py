"""The student: a small pre-norm causal transformer written with torch.nn.

It returns hidden states, not logits: the output layer (tied to the input embedding, the
teacher's 49,152-way vocabulary) is applied by the loss, so a fused loss never materializes
the ``(B, L, V)`` logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class StudentConfig:
    """Shape of :class:`TinyCausalLM` (stored in checkpoints to rebuild the model)."""

    vocab_size: int
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    ffn: int = 512
    max_len: int = 256
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class TinyCausalLM(nn.Module):
    """Token + learned position embeddings, ``layers`` pre-norm transformer blocks with a
    causal mask, a final LayerNorm. ``forward(ids)`` gives ``(B, L, d_model)`` hidden states;
    :attr:`output_weight` (the tied embedding) maps them to logits."""

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        if config.d_model % config.heads:
            raise ValueError(f"d_model ({config.d_model}) must be a multiple of heads ({config.heads})")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.position = nn.Embedding(config.max_len, config.d_model)
        block = nn.TransformerEncoderLayer(config.d_model, config.heads, config.ffn, config.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # GPT-2's scale: with a tied output layer, unit-variance embeddings would start the
        # logits at a standard deviation of sqrt(d_model).
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position.weight, std=0.02)

    @property
    def output_weight(self) -> torch.Tensor:
        """``(vocab_size, d_model)``: the output layer, tied to the input embedding."""
        return self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[-1]
        if length > self.config.max_len:
            raise ValueError(f"ids: sequences of at most max_len={self.config.max_len} tokens, got {length}")
        x = self.embed(ids) + self.position(torch.arange(length, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device, dtype=x.dtype)
        return self.norm(self.blocks(x, mask=mask, is_causal=True))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The full ``(..., vocab_size)`` logits of ``hidden`` (evaluation; training keeps
        them out of memory through the loss)."""
        return F.linear(hidden, self.output_weight)

    def num_parameters(self) -> dict:
        """Parameters in the body and in the (tied) embedding / output layer."""
        total = sum(p.numel() for p in self.parameters())
        return {"body": total - self.embed.weight.numel(), "embedding": self.embed.weight.numel()}
