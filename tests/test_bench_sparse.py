"""kdfast bench --sparse: its inputs, its providers, and one tiny report."""

from __future__ import annotations

import pytest
import torch

from kdfast.bench.providers import TEMPERATURE
from kdfast.bench.sparse import SPARSE_PROVIDERS, make_sparse_step, run_sparse_report, sparse_inputs


def test_sparse_inputs_hold_the_top_k_and_the_rest_of_the_teacher():
    student, dense, teacher, target = sparse_inputs(5, 40, 6, seed=1)
    assert student.shape == dense.shape == (5, 40) and target.shape == (5,)
    torch.testing.assert_close(teacher.logits, dense.gather(-1, teacher.indices))
    assert torch.all(teacher.logits.min(-1).values >= dense.topk(6).values.min(-1).values)
    rest = torch.ones(5, 40, dtype=torch.bool).scatter(-1, teacher.indices, False)
    expected = torch.stack([(dense[i][rest[i]] / TEMPERATURE).logsumexp(0) for i in range(5)])
    torch.testing.assert_close(teacher.tail_logsumexp, expected)


def test_every_provider_steps_and_an_unknown_one_raises():
    inputs = sparse_inputs(4, 30, 3)
    for provider in SPARSE_PROVIDERS:
        if provider != "sparse_compiled":
            make_sparse_step(provider)(*inputs)
    with pytest.raises(ValueError, match="provider must be one of"):
        make_sparse_step("nope")


@pytest.mark.slow
def test_tiny_report(tmp_path):
    out = run_sparse_report(tmp_path, repeats=2, threads=1, shapes=((8, 50, 4),))
    table = (out / "sparse_results.md").read_text()
    assert "| 8 | 50 | 4 |" in table
    assert len((out / "sparse_results.csv").read_text().splitlines()) == 1 + len(SPARSE_PROVIDERS)
