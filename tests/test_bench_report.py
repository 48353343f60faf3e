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
