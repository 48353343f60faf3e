"""kdfast.lm.student: the small causal transformer."""

import pytest
import torch

from kdfast.lm.student import StudentConfig, TinyCausalLM


def _model(**kw):
    torch.manual_seed(0)
    return TinyCausalLM(StudentConfig(vocab_size=97, d_model=32, layers=2, heads=4, ffn=64, max_len=16, **kw))


def test_hidden_states_and_tied_output_layer():
    model = _model()
    ids = torch.randint(0, 97, (3, 11))
    hidden = model(ids)
    assert hidden.shape == (3, 11, 32)
    assert model.output_weight is model.embed.weight
    torch.testing.assert_close(model.logits(hidden), hidden @ model.embed.weight.T)
    counts = model.num_parameters()
    assert counts["embedding"] == 97 * 32
    assert counts["body"] + counts["embedding"] == sum(p.numel() for p in model.parameters())


def test_causal_a_later_token_does_not_change_earlier_states():
    model = _model().eval()
    ids = torch.randint(0, 97, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 97
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3


def test_bad_shapes_raise_naming_the_argument():
    with pytest.raises(ValueError, match="max_len=16"):
        _model()(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of heads"):
        TinyCausalLM(StudentConfig(vocab_size=10, d_model=30, heads=4))
