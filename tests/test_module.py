"""kdfast.KDLoss: argument validation, repr, and the config() protocol."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import kdfast

DEFAULTS = {"temperature": 1.0, "alpha": 0.5, "kind": "kl", "beta": 0.5, "ignore_index": -100,
            "label_smoothing": 0.0, "reduction": "mean", "scale_by_t2": True, "inplace": False}
CUSTOM = {"temperature": 3.0, "alpha": 0.7, "kind": "jsd", "beta": 0.3, "ignore_index": -1,
          "label_smoothing": 0.1, "reduction": "sum", "scale_by_t2": False, "inplace": True}


def test_config_holds_every_constructor_argument():
    params = [p for p in inspect.signature(kdfast.KDLoss).parameters]
    assert list(kdfast.KDLoss().config()) == params
    assert kdfast.KDLoss().config() == DEFAULTS
    assert kdfast.KDLoss(**CUSTOM).config() == CUSTOM


def test_config_round_trips_through_json_and_the_constructor():
    loss = kdfast.KDLoss(**CUSTOM)
    config = json.loads(json.dumps(loss.config()))
    assert config == CUSTOM
    assert kdfast.KDLoss(**config).config() == loss.config()


def test_config_numbers_do_not_depend_on_int_or_float():
    loss = kdfast.KDLoss(temperature=2, alpha=1, beta=0.5, label_smoothing=0)
    assert loss.config() == kdfast.KDLoss(temperature=2.0, alpha=1.0, label_smoothing=0.0).config()
    assert all(type(loss.config()[k]) is float for k in ("temperature", "alpha", "beta", "label_smoothing"))


def test_repr_shows_every_argument():
    text = repr(kdfast.KDLoss(**CUSTOM))
    assert text == ("KDLoss(temperature=3.0, alpha=0.7, kind='jsd', beta=0.3, ignore_index=-1, "
                    "label_smoothing=0.1, reduction='sum', scale_by_t2=False, inplace=True)")


def test_forward_uses_the_configuration():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 1, -1, 3, 4, -1])
    kw = dict(CUSTOM, inplace=False)
    expected = kdfast.reference.distillation_loss(s.double(), t.double(), y, **{
        k: v for k, v in kw.items() if k != "inplace"})
    torch.testing.assert_close(kdfast.KDLoss(**kw)(s, t, y).double(), expected, rtol=1e-5, atol=1e-6)


BAD_TYPES = [
    ("ignore_index", -100.0, r"ignore_index must be an int .*got float -100\.0"),
    ("ignore_index", True, r"ignore_index must be an int .*got bool True"),
    ("ignore_index", "-100", r"ignore_index must be an int .*got str '-100'"),
    ("scale_by_t2", 1, r"scale_by_t2 must be a bool \(True or False\), got int 1"),
    ("scale_by_t2", "False", r"scale_by_t2 must be a bool \(True or False\), got str 'False'"),
    ("inplace", None, r"inplace must be a bool \(True or False\), got NoneType None"),
    ("inplace", 0, r"inplace must be a bool \(True or False\), got int 0"),
    ("kind", None, r"kind must be a str, one of \('kl', 'reverse_kl', 'jsd', 'logit_mse'\), got NoneType"),
    ("reduction", 1, r"reduction must be a str, one of \('mean', 'batchmean', 'sum', 'none'\), got int"),
    ("temperature", "2", r"temperature must be a real number, got str"),
    ("alpha", None, r"alpha must be a real number, got NoneType"),
    ("beta", True, r"beta must be a real number, got bool"),
    ("label_smoothing", [0.1], r"label_smoothing must be a real number, got list"),
]


@pytest.mark.parametrize("name,value,pattern", BAD_TYPES, ids=[f"{n}={v!r}" for n, v, _ in BAD_TYPES])
def test_wrong_types_raise_type_error_naming_the_argument(name, value, pattern):
    with pytest.raises(TypeError, match=pattern):
        kdfast.KDLoss(**{name: value})


BAD_VALUES = [
    ("temperature", 0.0, r"temperature must be finite and > 0, got 0\.0"),
    ("temperature", float("inf"), r"temperature must be finite and > 0, got inf"),
    ("temperature", float("nan"), r"temperature must be finite and > 0, got nan"),
    ("alpha", -0.1, r"alpha must be in \[0, 1\], got -0\.1"),
    ("alpha", 1.5, r"alpha must be in \[0, 1\], got 1\.5"),
    ("beta", 0.0, r"beta must be in \(0, 1\), got 0\.0"),
    ("label_smoothing", 1.1, r"label_smoothing must be in \[0, 1\], got 1\.1"),
    ("kind", "kld", r"kind must be one of \('kl', 'reverse_kl', 'jsd', 'logit_mse'\), got 'kld'"),
    ("reduction", "max", r"reduction must be one of \('mean', 'batchmean', 'sum', 'none'\), got 'max'"),
    ("ignore_index", 2**63, r"ignore_index must fit in int64 .*got 9223372036854775808"),
    ("ignore_index", -(2**63) - 1, r"ignore_index must fit in int64"),
]


@pytest.mark.parametrize("name,value,pattern", BAD_VALUES, ids=[f"{n}={v!r}" for n, v, _ in BAD_VALUES])
def test_out_of_range_values_raise_value_error_naming_the_argument(name, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        kdfast.KDLoss(**{name: value})


def test_edge_values_are_accepted():
    for kw in ({"ignore_index": 0}, {"ignore_index": 2**63 - 1}, {"ignore_index": -(2**63)},
               {"alpha": 0}, {"alpha": 1}, {"label_smoothing": 1.0}, {"reduction": "none"},
               {"temperature": 1e-3}, {"kind": "reverse_kl", "scale_by_t2": False}):
        assert kdfast.KDLoss(**kw).config() == {**DEFAULTS, **{k: (float(v) if k in (
            "alpha", "temperature", "label_smoothing") else v) for k, v in kw.items()}}
