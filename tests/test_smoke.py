import torch

import kdfast


def test_fused_matches_reference_small():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(8, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(8, 11, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 11, (8,), generator=gen)
    for kind in ("kl", "reverse_kl", "jsd"):
        a = kdfast.distillation_loss(s, t, y, temperature=2.0, kind=kind)
        b = kdfast.reference.distillation_loss(s, t, y, temperature=2.0, kind=kind)
        torch.testing.assert_close(a, b)
        ga, = torch.autograd.grad(a, s)
        gb, = torch.autograd.grad(b, s)
        torch.testing.assert_close(ga, gb)
