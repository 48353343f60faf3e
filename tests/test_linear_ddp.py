"""kdfast.linear_distillation_loss under DistributedDataParallel (torchrun, 2 CPU processes,
gloo) with an output layer tied to the input embedding: the averaged gradient equals the
single-process gradient of the whole batch."""

from __future__ import annotations

import subprocess
import textwrap

import pytest
import torch

import kdfast
from tests.test_distributed import TIMEOUT, _torchrun

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not kdfast.HAS_EXTENSION, reason="needs the compiled kernels")]

_SCRIPT = textwrap.dedent("""
    import sys, torch
    import torch.nn.functional as F
    from torch import nn
    import kdfast
    from kdfast import distributed

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(97, 16)
            self.mix = nn.Linear(16, 16)

        def forward(self, tokens):  # hidden states; the output layer is embed.weight (tied)
            return torch.tanh(self.mix(self.embed(tokens)))

    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    rank, world = distributed.rank(), distributed.world_size()
    torch.manual_seed(0)
    model = TinyLM().double()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 97, (4, 10), generator=g)
    teacher = torch.randn(4, 10, 97, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 97, (4, 10), generator=g)
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    hidden = net(tokens[rows])
    loss = kdfast.linear_distillation_loss(hidden, model.embed.weight, labels[rows],
                                           teacher_logits=teacher[rows], temperature=2.0,
                                           chunk_rows=7)
    loss.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters()}, sys.argv[1])
    distributed.shutdown()
""")


def test_ddp_with_tied_weights_matches_one_process(tmp_path):
    script = tmp_path / "ddp_linear.py"
    script.write_text(_SCRIPT)
    grads = {}
    for nproc in (1, 2):
        out = tmp_path / f"grads-{nproc}.pt"
        cmd = _torchrun(nproc, str(script), str(out))
        subprocess.run(cmd, check=True, timeout=TIMEOUT, capture_output=True, cwd=tmp_path)
        grads[nproc] = torch.load(out)
    assert grads[1].keys() == grads[2].keys()
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[2][name], g, rtol=1e-10, atol=1e-12, msg=name)
