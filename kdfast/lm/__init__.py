"""Language-model distillation on the CPU: a GGUF teacher (SmolLM2-135M), Shakespeare as the
corpus, a small causal student, a token-level sparse cache (issue 15).

Needs the optional extra (``pip install -e .[lm]``: transformers, gguf, accelerate) only
where the teacher or its tokenizer is loaded; importing this package does not import them.
"""
