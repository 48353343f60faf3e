"""`kdfast demo`: correctness spot-check, a timing, and a small distillation run."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import kdfast
from kdfast import reference


def _time_fwd_bwd(fn, student: torch.Tensor, teacher: torch.Tensor, target, repeats: int):
    times = []
    for i in range(repeats + 1):
        s = student.detach().requires_grad_()
        start = time.perf_counter()
        fn(s, teacher, target).backward()
        if i:  # the first call is warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _check_against_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(64, 257, generator=gen, dtype=torch.float64) * 3
    t = torch.randn(64, 257, generator=gen, dtype=torch.float64) * 3
    y = torch.randint(0, 257, (64,), generator=gen)
    for kind in ("kl", "reverse_kl", "jsd"):
        kw = dict(temperature=4.0, alpha=0.7, kind=kind, label_smoothing=0.1)
        a = s.clone().requires_grad_()
        b = s.clone().requires_grad_()
        la = kdfast.distillation_loss(a, t, y, **kw)
        lb = reference.distillation_loss(b, t, y, **kw)
        la.backward()
        lb.backward()
        err = (a.grad - b.grad).abs().max().item()
        print(f"  {kind:<10} loss {la.item():.6f} (reference {lb.item():.6f}), max |dgrad| {err:.1e}")


def _distill_toy() -> None:
    """A teacher learns 16 Gaussian clusters; a smaller student learns from its soft targets."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(16, 32, generator=gen) * 2.0

    def sample(n):
        y = torch.randint(0, 16, (n,), generator=gen)
        return centers[y] + torch.randn(n, 32, generator=gen) * 1.5, y

    x_train, y_train = sample(512)
    x_test, y_test = sample(4000)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 16))
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        soft = teacher(x_train)

    def train_student(loss_fn):
        torch.manual_seed(1)
        student = nn.Sequential(nn.Linear(32, 16))
        opt = torch.optim.Adam(student.parameters(), lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            loss_fn(student(x_train)).backward()
            opt.step()
        with torch.no_grad():
            return (student(x_test).argmax(-1) != y_test).float().mean().item() * 100

    kd = kdfast.KDLoss(temperature=4.0, alpha=0.9)
    err_hard = train_student(lambda out: nn.functional.cross_entropy(out, y_train))
    err_kd = train_student(lambda out: kd(out, soft, y_train))
    with torch.no_grad():
        err_teacher = (teacher(x_test).argmax(-1) != y_test).float().mean().item() * 100
    print(f"  test error: teacher {err_teacher:.1f}%, student on labels {err_hard:.1f}%, "
          f"student distilled (T=4, alpha=0.9) {err_kd:.1f}%")


def run_demo(rows: int = 1024, classes: int = 32000, repeats: int = 5) -> None:
    info = kdfast.build_info()
    print(f"kdfast {kdfast.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, build {info}")
    print("fused vs float64 reference (N=64, C=257, T=4, alpha=0.7, smoothing 0.1):")
    _check_against_reference()

    gen = torch.Generator().manual_seed(0)
    s = torch.randn(rows, classes, generator=gen)
    t = torch.randn(rows, classes, generator=gen)
    y = torch.randint(0, classes, (rows,), generator=gen)
    fused = _time_fwd_bwd(
        lambda a, b, c: kdfast.distillation_loss(a, b, c, temperature=2.0), s, t, y, repeats
    )
    ref = _time_fwd_bwd(
        lambda a, b, c: reference.eager_baseline(a, b, c, temperature=2.0), s, t, y, repeats
    )
    print(f"forward+backward at (N, C) = ({rows}, {classes}) float32, median of {repeats}: "
          f"kdfast {fused:.1f} ms, eager F.kl_div + F.cross_entropy {ref:.1f} ms "
          f"({ref / fused:.1f}x)")
    print("distillation on a toy problem:")
    _distill_toy()
