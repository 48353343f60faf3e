"""A fake LM data directory for the LM tests: a tiny random transformers Llama saved as the
teacher (no download) and random token splits with their manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def make_lm_data_dir(root: Path, vocab: int, seq_len: int, sequences: dict[str, int]) -> Path:
    """Writes ``root/teacher`` and the ``sequences`` (split -> count) of ``seq_len`` tokens."""
    import transformers

    from kdfast.lm import data

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=32, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "teacher")
    rng = np.random.default_rng(0)
    arrays = {s: rng.integers(0, vocab, size=(n, seq_len)).astype(np.uint16) for s, n in sequences.items()}
    data.write_corpus(root, arrays, {"seq_len": seq_len, "vocab_size": vocab})
    return root
