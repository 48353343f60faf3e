"""pytest-benchmark timings of forward+backward: `pytest benchmarks/ --benchmark-only`.

The same providers as `kdfast bench` (kdfast.bench.providers): the fused op, the eager
torch.nn.functional loss from kdfast.reference and that loss under torch.compile. Targets
are judged from `kdfast bench`'s report (one run, interleaved), not here.
"""

import pytest
import torch

from kdfast.bench.providers import PROVIDERS, make_step

CASES = [
    (8192, 10, torch.float32),
    (4096, 1000, torch.float32),
    (1024, 32000, torch.float32),
    (1024, 32000, torch.bfloat16),
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kind", ["kl", "jsd"])
@pytest.mark.parametrize(
    "loss_inputs", CASES, indirect=True, ids=[f"{n}x{c}-{str(d)[6:]}" for n, c, d in CASES]
)
def test_forward_backward(benchmark, provider, kind, loss_inputs):
    step = make_step(provider, kind)
    step(*loss_inputs)  # warm-up (and compilation for "compiled")
    benchmark.group = f"{kind}-{tuple(loss_inputs[0].shape)}-{loss_inputs[0].dtype}"
    benchmark.pedantic(step, args=loss_inputs, rounds=5, warmup_rounds=1)
