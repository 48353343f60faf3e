"""kdfast.models: the MLP spec shared by the CLI, the MNIST experiment and checkpoints."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import kdfast.cli_distill
import kdfast.mnist_experiment
from kdfast.models import build_model, mlp, mlp_spec


def test_mlp_spec_is_json_and_builds_the_same_mlp():
    spec = mlp_spec((20, 16, 6), dropout=0.25, input_dropout=0.1)
    assert spec == {"arch": "mlp", "sizes": [20, 16, 6], "dropout": 0.25, "input_dropout": 0.1}
    assert json.loads(json.dumps(spec)) == spec
    torch.manual_seed(0)
    built = build_model(spec)
    torch.manual_seed(0)
    direct = mlp([20, 16, 6], dropout=0.25, input_dropout=0.1)
    assert repr(built) == repr(direct)
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), direct.state_dict().values(),
                                                  strict=True))


@pytest.mark.parametrize("kwargs,pattern", [
    ({"sizes": [20]}, r"sizes must be >= 2 positive widths .*got \[20\]"),
    ({"sizes": [20, 0, 6]}, r"sizes must be >= 2 positive widths .*got \[20, 0, 6\]"),
    ({"sizes": [20, 6], "dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ({"sizes": [20, 6], "input_dropout": -0.1}, r"input_dropout must be in \[0, 1\), got -0.1"),
])
def test_mlp_spec_refuses_what_mlp_refuses(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        mlp_spec(**kwargs)
    with pytest.raises(ValueError, match=pattern):
        mlp(**kwargs)


def test_cli_and_mnist_experiment_build_their_models_from_the_one_spec_helper():
    for module in (kdfast.cli_distill, kdfast.mnist_experiment):
        source = inspect.getsource(module)
        assert "mlp_spec(" in source and '"arch": "mlp"' not in source, module.__name__
