"""The LM pipeline on a tiny random transformers Llama (no download): teacher logits, the
token-level sparse cache, hard and distilled students, resume, evaluation."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdfast.cache import open_cache  # noqa: E402
from kdfast.lm import train as lm_train  # noqa: E402
from kdfast.lm.student import StudentConfig  # noqa: E402
from kdfast.lm.teacher import TeacherLogits, build_lm_cache  # noqa: E402

VOCAB, SEQ = 300, 16


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, VOCAB, size=(24, SEQ)).astype(np.uint16)


def _cache(teacher, tokens, path, **kw):
    return build_lm_cache(TeacherLogits(teacher, torch.float32), tokens, path, fingerprint="tiny",
                          dataset_fingerprint="tiny-tokens", batch_size=4, progress=False, **kw)


def test_teacher_logits_match_the_model_with_a_float32_head(teacher, tokens):
    ids = torch.from_numpy(tokens[:3].astype(np.int64))
    with torch.no_grad():
        want = teacher(ids).logits
        torch.testing.assert_close(TeacherLogits(teacher, torch.float32)(ids), want)
        bf16 = TeacherLogits(teacher, torch.bfloat16)(ids)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, want, atol=0.05, rtol=0.05)


def test_token_cache_holds_the_teachers_next_token_top_k(teacher, tokens, tmp_path):
    stats = _cache(teacher, tokens, tmp_path / "c", targets="topk", k=8)
    assert stats["tokens"] == tokens.size and stats["bytes_per_token"] > 0
    cache = open_cache(tmp_path / "c")
    rows = torch.tensor([5, 0])
    sparse = cache.sparse_targets(rows)
    with torch.no_grad():
        logits = teacher(torch.from_numpy(tokens[[5, 0]].astype(np.int64))).logits
    top = logits.topk(8, dim=-1)
    assert sparse.indices.shape == (2, SEQ, 8)
    torch.testing.assert_close(sparse.logits.float(), top.values, atol=0.02, rtol=0.01)  # float16 storage
    shifted = lm_train.shift_sparse(sparse)
    assert shifted.indices.shape == (2, SEQ - 1, 8)


def _config(mode, **kw):
    base = dict(mode=mode, steps=6, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=3, eval_sequences=4)
    return lm_train.LMTrainConfig(**{**base, **kw})


STUDENT = StudentConfig(vocab_size=VOCAB, d_model=16, layers=1, heads=2, ffn=32, max_len=SEQ)


@pytest.mark.parametrize("targets", ["topk", "sampled", "topk+sampled"])
def test_hard_and_distilled_students_train_and_evaluate(teacher, tokens, tmp_path, targets):
    kw = {"topk": {"k": 8}, "sampled": {"samples": 16, "temperature": 1.0},
          "topk+sampled": {"k": 4, "samples": 8, "temperature": 1.0}}[targets]
    _cache(teacher, tokens, tmp_path / "c", targets=targets, **kw)
    cache = open_cache(tmp_path / "c")
    hard = lm_train.train_lm(STUDENT, tokens, tokens[:4], tmp_path / "hard", _config("hard"), progress=False)
    soft = lm_train.train_lm(STUDENT, tokens, tokens[:4], tmp_path / "soft", _config("distill"), cache=cache,
                             progress=False)
    for run in (hard, soft):
        assert [h["step"] for h in run["history"]] == [3, 6]
        assert all(np.isfinite(h["train_loss"]) for h in run["history"])
        assert all(h["valid"]["tokens"] == 4 * (SEQ - 1) for h in run["history"])
    assert hard["history"][-1]["train_loss"] != soft["history"][-1]["train_loss"]


def test_a_stopped_run_resumes_to_the_same_weights(tokens, tmp_path, monkeypatch):
    straight = lm_train.train_lm(STUDENT, tokens, tokens[:4], tmp_path / "a", _config("hard"), progress=False)
    real_save = lm_train._save

    def save_then_stop(*args):
        real_save(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_train, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        lm_train.train_lm(STUDENT, tokens, tokens[:4], tmp_path / "b", _config("hard"), progress=False)
    monkeypatch.setattr(lm_train, "_save", real_save)
    resumed = lm_train.train_lm(STUDENT, tokens, tokens[:4], tmp_path / "b", _config("hard"), progress=False)
    timing = ("train_tokens_per_s", "train_tokens_per_cpu_s")
    assert resumed["history"] == [{**h, **{t: r[t] for t in timing}}
                                  for h, r in zip(straight["history"], resumed["history"], strict=True)]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["state_dict"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="another run configuration"):
        lm_train.train_lm(STUDENT, tokens, tokens[:4], tmp_path / "b", _config("hard", lr=1e-3),
                          progress=False)


def test_mode_and_cache_must_agree(tokens, tmp_path):
    with pytest.raises(ValueError, match="needs a cache"):
        lm_train.train_lm(STUDENT, tokens, tokens, tmp_path, _config("distill"), progress=False)
    with pytest.raises(ValueError, match="mode must be"):
        _config("soft")


def test_evaluate_lm_is_the_mean_next_token_cross_entropy(teacher, tokens):
    with torch.no_grad():
        logits = teacher(torch.from_numpy(tokens[:5].astype(np.int64))).logits
    target = torch.from_numpy(tokens[:5, 1:].astype(np.int64))
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].double().flatten(0, 1), target.flatten())
    out = lm_train.evaluate_lm(lambda ids: teacher(ids).logits, tokens[:5], batch_size=2)
    assert out["tokens"] == 5 * (SEQ - 1)
    assert out["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-5)
    acc = (logits[:, :-1].argmax(-1) == target).double().mean()
    assert out["accuracy"] == pytest.approx(float(acc))
