"""kdfast: fused knowledge-distillation losses for PyTorch.

Three levels, as in torch: :func:`distillation_loss` (functional), :class:`KDLoss`
(nn.Module) and :class:`DistillationLossFunction` (the autograd Function of the in-place
path); :mod:`kdfast.reference` is the pure-PyTorch oracle and baseline.
"""

from kdfast import (
    ops,  # noqa: F401  (registers fake kernels and autograd)
    reference,
)
from kdfast._ext import HAS_EXTENSION, buffer_pool_stats, build_info, release_buffers
from kdfast.functional import DistillationLossFunction, distillation_loss
from kdfast.module import KDLoss

__version__ = "0.1.0"

__all__ = [
    "HAS_EXTENSION",
    "DistillationLossFunction",
    "KDLoss",
    "buffer_pool_stats",
    "build_info",
    "distillation_loss",
    "reference",
    "release_buffers",
]
