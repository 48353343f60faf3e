import pytest
import torch


@pytest.fixture
def loss_inputs(request):
    rows, cols, dtype = request.param
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(rows, cols, generator=gen).to(dtype)
    teacher = torch.randn(rows, cols, generator=gen).to(dtype)
    target = torch.randint(0, cols, (rows,), generator=gen)
    return student, teacher, target
