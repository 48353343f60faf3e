"""kdfast.data.fashion_mnist on synthetic IDX files and a fake apt-get: the real dataset is
never needed by the tests."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import subprocess

import pytest

from kdfast.data import fashion_mnist, load_dataset
from kdfast.data.fashion_mnist import FashionMnistError, fetch_fashion_mnist, load_fashion_mnist
from tests.test_mnist import synthetic_mnist


@pytest.fixture
def files(monkeypatch) -> dict[str, bytes]:
    """Synthetic IDX files whose MD5s are made the pinned ones."""
    data = synthetic_mnist(seed=3)
    monkeypatch.setattr(fashion_mnist, "MD5", {k: hashlib.md5(v).hexdigest() for k, v in data.items()})
    return data


@pytest.mark.parametrize("compress", [False, True])
def test_files_placed_by_hand_load(tmp_path, files, compress):
    for name, data in files.items():
        path = tmp_path / (name + (".gz" if compress else ""))
        path.write_bytes(gzip.compress(data) if compress else data)
    train = load_fashion_mnist("train", tmp_path)
    assert train.tensors[0].shape == (96, 784) and train.tensors[1].max() < 10
    assert train.kdfast_fingerprint.startswith("fashion-mnist-train:md5:")
    assert len(load_dataset("fashion-mnist", "test", tmp_path)) == 32


def test_pinned_md5s_are_checked(tmp_path, files):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    labels = bytearray(files["t10k-labels-idx1-ubyte"])
    labels[8] ^= 1  # one label changed
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes(labels))
    with pytest.raises(FashionMnistError, match=r"t10k-labels-idx1-ubyte has MD5 .*data fashion-mnist"):
        load_fashion_mnist("test", tmp_path)
    with pytest.raises(FashionMnistError, match="missing train-images"):
        load_fashion_mnist("train", tmp_path / "empty")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_fetch_from_a_fake_apt_get(tmp_path, files, monkeypatch):
    # A real .deb (built with dpkg-deb) holding the synthetic files where the package has them;
    # a fake apt-get on PATH "downloads" it into the current directory.
    root = tmp_path / "pkg"
    data_dir = root / fashion_mnist.DEB_DATA_DIR
    data_dir.mkdir(parents=True)
    for name, data in files.items():
        (data_dir / f"{name}.gz").write_bytes(gzip.compress(data))
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN" / "control").write_text("Package: dataset-fashion-mnist\nVersion: 1\nArchitecture: all\n"
                                             "Maintainer: t <t@t>\nDescription: test\n")
    deb = tmp_path / "dataset-fashion-mnist_1_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(root), str(deb)], check=True, capture_output=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text(f"#!/bin/sh\ncp {deb} .\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "data"
    assert fetch_fashion_mnist(out, log=lambda _: None) == out
    assert len(load_fashion_mnist("train", out)) == 96
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.gz" for n in files)  # no temp left
    fake.write_text("#!/bin/sh\nexit 3\n")
    fetch_fashion_mnist(out, log=lambda _: None)  # already there: apt-get is not run


def test_fetch_failure_names_the_command(tmp_path, files, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package' >&2\nexit 100\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(FashionMnistError, match="apt-get download dataset-fashion-mnist.*Unable to locate"):
        fetch_fashion_mnist(tmp_path / "d", log=lambda _: None)
