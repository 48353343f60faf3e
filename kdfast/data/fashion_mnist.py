"""Fashion-MNIST (Xiao et al. 2017): the same four IDX files as MNIST, 10 clothing classes.

Fetched from the Debian package ``dataset-fashion-mnist`` (``apt-get download`` + ``dpkg-deb
-x``: no install, no root), which ships the original IDX files gzip-compressed; or placed by
hand (raw or ``.gz``) in the data directory. The files' identity is the MD5 of the
*decompressed* IDX bytes (Debian recompressed the ``.gz`` files, so their own MD5s differ
from upstream's). Parsing and loading reuse :mod:`kdfast.data.mnist`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from kdfast.data.mnist import FILES, MnistError, MnistSplit, _install, _read_bytes, find_file, parse_idx

# MD5 of the decompressed IDX files, from dataset-fashion-mnist 0.0~git20200523.55506a9-1.
MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
DEB_PACKAGE = "dataset-fashion-mnist"
DEB_DATA_DIR = Path("usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")


class FashionMnistError(MnistError):
    """Fashion-MNIST files are missing, damaged or could not be fetched."""


def default_data_dir() -> Path:
    """``$KDFAST_DATA/fashion-mnist``, else ``~/.cache/kdfast/fashion-mnist``."""
    root = os.environ.get("KDFAST_DATA")
    return (Path(root) if root else Path.home() / ".cache" / "kdfast") / "fashion-mnist"


def _fix(data_dir: Path) -> str:
    return f"run `kdfast data fashion-mnist --dir {data_dir}` (or copy the four IDX files there)"


def _load_checked(data_dir: Path, name: str) -> tuple[np.ndarray, str]:
    path = find_file(data_dir, name)
    if path is None:
        raise FashionMnistError(f"Fashion-MNIST not found in {data_dir} (missing {name}, raw or .gz): "
                                f"{_fix(data_dir)}")
    data = _read_bytes(path)
    digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if digest != MD5[name]:
        raise FashionMnistError(f"{path} has MD5 {digest} (of its IDX bytes), expected {MD5[name]} for the "
                                f"original Fashion-MNIST file: delete it and {_fix(data_dir)}")
    return parse_idx(data, str(path)), digest


def load_fashion_mnist(split: str = "train", data_dir: str | Path | None = None) -> MnistSplit:
    """Loads the ``"train"`` (60,000) or ``"test"`` (10,000) split, MD5-checked: inputs
    ``(N, 784)`` float32 in [0, 1], labels int64 (names in :data:`CLASS_NAMES`)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    images, images_md5 = _load_checked(data_dir, FILES[f"{split}_images"])
    labels, _ = _load_checked(data_dir, FILES[f"{split}_labels"])
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return MnistSplit(x, y, f"fashion-mnist-{split}:md5:{images_md5}")


def _complete(data_dir: Path) -> bool:
    try:
        for name in MD5:
            _load_checked(data_dir, name)
    except (MnistError, ValueError):
        return False
    return True


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        raise FashionMnistError(f"{cmd[0]} timed out after 600 s") from None
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FashionMnistError(f"`{' '.join(cmd)}` failed ({last[0]})")


def fetch_fashion_mnist(data_dir: str | Path | None = None, log=print) -> Path:
    """Puts the four MD5-checked Fashion-MNIST files into ``data_dir`` (default
    :func:`default_data_dir`) and returns it; does nothing if they are already there.

    Downloads the Debian package with ``apt-get download dataset-fashion-mnist`` (needs apt and
    its package lists, not root) and unpacks it with ``dpkg-deb -x`` into a temporary directory;
    nothing is installed.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    if _complete(data_dir):
        log(f"Fashion-MNIST already in {data_dir} (MD5s checked)")
        return data_dir
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise FashionMnistError(f"{tool} is not installed: copy the four Fashion-MNIST IDX files "
                                    f"(raw or .gz) into {data_dir} yourself")
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".deb-") as tmp:
        tmp = Path(tmp)
        log(f"apt-get download {DEB_PACKAGE} ...")
        _run(["apt-get", "download", DEB_PACKAGE], tmp)
        debs = sorted(tmp.glob(f"{DEB_PACKAGE}_*.deb"))
        if not debs:
            raise FashionMnistError(f"apt-get download left no {DEB_PACKAGE}_*.deb")
        _run(["dpkg-deb", "-x", str(debs[0]), str(tmp / "root")], tmp)
        src_dir = tmp / "root" / DEB_DATA_DIR
        for name in MD5:
            src = find_file(src_dir, name)
            if src is None:
                raise FashionMnistError(f"{debs[0].name} has no {name} in {DEB_DATA_DIR}")
            digest = hashlib.md5(_read_bytes(src), usedforsecurity=False).hexdigest()
            if digest != MD5[name]:
                raise FashionMnistError(f"{debs[0].name}'s {name} has MD5 {digest}, expected {MD5[name]}")
            _install(src, data_dir / (name + (".gz" if src.suffix == ".gz" else "")))
    log(f"Fashion-MNIST ready in {data_dir} (MD5s checked)")
    return data_dir
