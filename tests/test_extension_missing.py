"""`import kdfast` without the compiled module: warns, falls back to kdfast.reference."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    sys.modules["kdfast._C"] = None  # makes `from kdfast import _C` raise ImportError
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import kdfast
    import torch
    from kdfast import reference

    out = {"warnings": [[w.category.__name__, str(w.message)] for w in caught]}
    out["has_extension"] = kdfast.HAS_EXTENSION
    out["build_info"] = kdfast.build_info()
    out["ops_registered"] = hasattr(torch.ops.kdfast, "distill_fwd")

    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)
    y = torch.randint(0, 9, (3, 4), generator=g)
    y[0, 0] = -100
    results = {}
    for kind in ("kl", "reverse_kl", "jsd"):
        kw = dict(temperature=2.0, alpha=0.3, kind=kind, label_smoothing=0.1)
        loss = kdfast.distillation_loss(s, t, y, **kw)
        (grad,) = torch.autograd.grad(loss * 3.7, s)
        s2 = s.detach().clone().requires_grad_()
        ref = reference.distillation_loss(s2, t, y, **kw)
        (ref_grad,) = torch.autograd.grad(ref * 3.7, s2)
        mod = kdfast.KDLoss(**kw)(s, t, y)
        results[kind] = [float((loss - ref).abs()), float((grad - ref_grad).abs().max()),
                         float((mod - ref).abs()), float(loss)]
    out["results"] = results
    w = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    fused = kdfast.linear_distillation_loss(h, w, y, teacher_logits=t, temperature=2.0)
    (fused_grad,) = torch.autograd.grad(fused, w)
    w2 = w.detach().clone().requires_grad_()
    ref = reference.distillation_loss(h @ w2.T, t, y, temperature=2.0)
    (ref_grad,) = torch.autograd.grad(ref, w2)
    out["linear"] = [float((fused - ref).abs()), float((fused_grad - ref_grad).abs().max())]
    try:
        kdfast.distillation_loss(s.detach().clone(), t, y, inplace=True)
        out["inplace_error"] = None
    except RuntimeError as exc:
        out["inplace_error"] = str(exc)
    print("RESULT=" + json.dumps(out))
    """
)


def _run():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT=")][-1]
    return json.loads(line[len("RESULT="):])


@pytest.mark.slow
def test_import_without_compiled_module_falls_back_to_reference():
    out = _run()
    runtime = [msg for cat, msg in out["warnings"] if cat == "RuntimeWarning"]
    assert len(runtime) == 1, out["warnings"]
    assert "kdfast._C" in runtime[0] and "reference" in runtime[0]
    assert out["has_extension"] is False
    assert out["build_info"]["extension"] is False
    assert out["build_info"]["backends"] == []
    assert out["ops_registered"] is False  # so the losses below really came from the fallback
    for kind, (d_loss, d_grad, d_mod, loss) in out["results"].items():
        assert d_loss == 0.0 and d_grad == 0.0 and d_mod == 0.0, kind
        assert loss > 0
    assert out["linear"] == [0.0, 0.0]
    assert out["inplace_error"] is not None and "kdfast._C" in out["inplace_error"]
