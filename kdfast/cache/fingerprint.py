"""Fingerprints that tie a cache to the teacher and the dataset it was built from."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

# Datasets that know a cheap, exact identity (e.g. the MD5s of their source files) expose it
# under this attribute instead of being hashed.
FINGERPRINT_ATTR = "kdfast_fingerprint"
# A generic map-style dataset is fingerprinted from this many evenly spaced items.
SAMPLED_ITEMS = 256


def _update_tensor(digest, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    # Hash the raw bytes through a uint8 view: works for bfloat16, which numpy lacks.
    digest.update(memoryview(tensor.view(-1).view(torch.uint8).numpy()))


def fingerprint_module(module: nn.Module) -> str:
    """``sha256:<hex>`` of a module's state_dict (names, dtypes, shapes, bytes, in key order).

    Parameters and buffers only: the class and code are not hashed, so the same weights in a
    renamed class match, and the same architecture with other weights does not.
    """
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            _update_tensor(digest, value)
        else:  # extra state
            digest.update(repr(value).encode())
    return "sha256:" + digest.hexdigest()


def fingerprint_teachers(teachers: nn.Module | Sequence[nn.Module]) -> str:
    """Fingerprint of one teacher, or of an ordered ensemble (member order matters)."""
    if isinstance(teachers, nn.Module):
        return fingerprint_module(teachers)
    members = [fingerprint_module(m) for m in teachers]
    if len(members) == 1:
        return members[0]
    return "sha256:" + hashlib.sha256(b"ensemble:" + ",".join(members).encode()).hexdigest()


def _update_item(digest, item) -> None:
    if isinstance(item, torch.Tensor):
        _update_tensor(digest, item)
    elif isinstance(item, (tuple, list)):
        for part in item:
            _update_item(digest, part)
    else:
        digest.update(repr(item).encode())


def fingerprint_dataset(dataset: Dataset | torch.Tensor) -> str:
    """Identity of a dataset's inputs and their order (labels are not part of it: the teacher
    sees only inputs, so a labelled set and its unlabelled transfer copy share one cache).

    - ``dataset.kdfast_fingerprint`` when the dataset defines it (exact and free);
    - a tensor, or a ``TensorDataset`` (its first tensor): SHA-256 of the bytes (exact; ~1 s
      per GB);
    - any other map-style dataset: SHA-256 of its length and of 256 evenly spaced items
      (their first element; catches another dataset, split or order, not a change confined
      to unsampled rows: give such datasets a ``kdfast_fingerprint``).
    """
    explicit = getattr(dataset, FINGERPRINT_ATTR, None)
    if explicit is not None:
        return str(explicit)
    digest = hashlib.sha256()
    if isinstance(dataset, torch.Tensor):
        _update_tensor(digest, dataset)
        return "sha256:" + digest.hexdigest()
    if isinstance(dataset, TensorDataset):
        _update_tensor(digest, dataset.tensors[0])
        return "sha256:" + digest.hexdigest()
    n = len(dataset)
    digest.update(f"len={n}".encode())
    step = max(1, n // SAMPLED_ITEMS)
    for i in range(0, n, step):
        item = dataset[i]
        _update_item(digest, item[0] if isinstance(item, (tuple, list)) else item)
    return "sampled-sha256:" + digest.hexdigest()
