"""kdfast: fused knowledge-distillation losses for PyTorch.

Three levels, as in torch: :func:`distillation_loss` (functional), :class:`KDLoss`
(nn.Module) and :class:`DistillationLossFunction` (the autograd Function of the in-place
path); :mod:`kdfast.reference` is the pure-PyTorch oracle and baseline. Sparse teachers (logits
at k classes per row): :class:`SparseTargets`, :func:`sparse_distillation_loss`,
:class:`SparseKDLoss`.
"""

from kdfast import (
    ops,  # noqa: F401  (registers fake kernels and autograd)
    reference,
)
from kdfast._ext import HAS_EXTENSION, buffer_pool_stats, build_info, release_buffers
from kdfast.functional import DistillationLossFunction, distillation_loss
from kdfast.linear import LinearKDLoss, linear_distillation_loss
from kdfast.module import KDLoss
from kdfast.sparse import SparseKDLoss, SparseTargets, sparse_distillation_loss
from kdfast.topk import TopKTargets, topk_targets

__version__ = "0.1.0"

__all__ = [
    "HAS_EXTENSION",
    "DistillationLossFunction",
    "KDLoss",
    "LinearKDLoss",
    "SparseKDLoss",
    "SparseTargets",
    "TopKTargets",
    "buffer_pool_stats",
    "build_info",
    "distillation_loss",
    "linear_distillation_loss",
    "reference",
    "release_buffers",
    "sparse_distillation_loss",
    "topk_targets",
]
