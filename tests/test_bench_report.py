"""`kdfast bench` end to end on a tiny grid: every provider timed, metrics consistent with
the timings, CSV + Markdown written. (Speed targets live in the benchmark results, never in
tests.)"""

from __future__ import annotations

import csv

import pytest

import kdfast
from kdfast.bench.providers import PROVIDERS

pytestmark = pytest.mark.skipif(not kdfast.HAS_EXTENSION, reason="needs the compiled kernels")


@pytest.mark.slow  # torch.compile of the baseline; the fast subset runs the providers in test_reference
def test_report_on_a_tiny_grid(tmp_path):
    from kdfast.bench.report import run_report

    run_report(tmp_path, repeats=2, kinds=("kl",), dtypes=("fp32",), threads=(1,),
               shapes=((64, 100),), plot=False)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    value = {(r["provider"], r["metric"]): float(r["value"]) for r in rows}
    for p in PROVIDERS:
        assert value[(p, "median_ms")] > 0
        assert value[(p, "q20_ms")] <= value[(p, "median_ms")] <= value[(p, "q80_ms")]
        assert value[(p, "roofline_fraction")] == pytest.approx(
            value[(p, "roofline_ms")] / value[(p, "median_ms")])
    assert value[("kdfast", "speedup_vs_eager")] == pytest.approx(
        value[("eager", "median_ms")] / value[("kdfast", "median_ms")])
    assert {r["threads"] for r in rows} == {"1"} and float(rows[0]["exp_rate_g"]) > 0
    table = (tmp_path / "results.md").read_text()
    assert "| kl | fp32 | 64 | 100 | 1 |" in table
    assert "exp rate" in table


@pytest.mark.slow  # torch.compile of the baseline
def test_linear_suite_on_a_tiny_grid(tmp_path, monkeypatch):
    from kdfast.bench import linear

    monkeypatch.setattr(linear, "SHAPES", ((48, 16, 300),))
    linear.run_linear_report(tmp_path, quick=True, repeats=2, dtypes=("fp32",), threads=1,
                             plot=False)
    table = (tmp_path / "linear.md").read_text().splitlines()
    assert table[-1].startswith("| fp32 | 48 | 16 | 300 |")
    case = linear.LinearCase("fp32", 48, 16, 300)
    linear.run_linear_case(case, repeats=2)
    metrics = linear.linear_metrics(case)
    for p in linear.PROVIDERS:
        assert len(case.times[p]) == 2 and metrics[p]["median_ms"] > 0
    assert metrics["fused"]["outside_matmuls_ms"] == pytest.approx(
        metrics["fused"]["median_ms"] - metrics["matmuls"]["median_ms"])


def test_linear_steps_compute_the_same_loss_gradient():
    """The providers of the linear suite differentiate the same loss."""
    import torch

    from kdfast.bench.linear import make_linear_step

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(20, 8, generator=g), torch.randn(50, 8, generator=g)
    b, t = torch.randn(50, generator=g), torch.randn(20, 50, generator=g)
    y = torch.randint(0, 50, (20,), generator=g)
    grads = [[leaf.grad for leaf in make_linear_step(p)(h, w, b, t, y)]
             for p in ("fused", "kdfast", "eager")]
    for other in grads[1:]:
        for a, b_ in zip(grads[0], other, strict=True):
            torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5)
