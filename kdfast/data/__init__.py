"""Datasets for the examples and the CLI: MNIST (IDX files, MD5-checked) and sklearn digits."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import TensorDataset

from kdfast.data.digits import load_digits_split
from kdfast.data.fashion_mnist import fetch_fashion_mnist, load_fashion_mnist
from kdfast.data.mnist import MnistError, default_data_dir, fetch_mnist, load_mnist, read_idx

DATASETS = ("mnist", "digits", "fashion-mnist")


def load_dataset(name: str, split: str, data_dir: str | Path | None = None) -> TensorDataset:
    """``load_dataset("mnist" | "digits" | "fashion-mnist", "train" | "test")``: the CLI's named datasets."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "mnist":
        return load_mnist(split, data_dir)
    if name == "fashion-mnist":
        return load_fashion_mnist(split, data_dir)
    train, test = load_digits_split()
    return train if split == "train" else test


__all__ = ["DATASETS", "MnistError", "default_data_dir", "fetch_fashion_mnist", "fetch_mnist", "load_dataset",
           "load_digits_split", "load_fashion_mnist", "load_mnist", "read_idx"]
