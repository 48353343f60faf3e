"""scikit-learn's 8x8 digits (1,797 images shipped inside the package): a small, offline
stand-in for MNIST in tests and examples."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset


def load_digits_split(test_fraction: float = 0.33, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)``: inputs ``(N, 64)`` float32 in [0, 1], labels int64, split by a
    seeded permutation (the same for the same seed). Needs scikit-learn."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise RuntimeError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])
