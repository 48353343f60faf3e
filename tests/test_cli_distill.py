"""The distillation subcommands: cache build|info|verify, train, data mnist, mnist (exit codes,
one-line errors, --help), run in-process on sklearn digits."""

from __future__ import annotations

import json

import pytest
import torch

from kdfast.cli import main


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv",
    [["cache", "--help"], ["cache", "build", "--help"], ["cache", "info", "--help"],
     ["cache", "verify", "--help"], ["train", "--help"], ["mnist", "--help"], ["data", "--help"],
     ["data", "mnist", "--help"]],
)
def test_help(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "usage: kdfast" in capsys.readouterr().out


def test_train_cache_verify_and_distill_on_digits(tmp_path, capsys):
    pytest.importorskip("sklearn")
    teacher_dir, cache_dir, student_dir = tmp_path / "teacher", tmp_path / "cache", tmp_path / "kd"
    code, out, _ = run(capsys, "train", "--data", "digits", "--student", "64-128-10", "--epochs", 3,
                       "--batch-size", 64, "--lr", 0.05, "--max-norm", 2.0, "--out", teacher_dir, "--quiet")
    assert code == 0 and "test errors" in out and (teacher_dir / "checkpoint.pt").exists()
    assert json.loads((teacher_dir / "metrics.json").read_text())["config"]["train"]["max_norm"] == 2.0

    code, out, _ = run(capsys, "cache", "build", "--teacher", teacher_dir, "--data", "digits", "--out",
                       cache_dir, "--batch-size", 256, "--quiet")
    assert code == 0 and "rows/s" in out
    code, out, _ = run(capsys, "cache", "build", "--teacher", teacher_dir, "--data", "digits", "--out",
                       cache_dir, "--batch-size", 256, "--quiet")
    assert code == 0 and "nothing to do" in out

    code, out, _ = run(capsys, "cache", "info", cache_dir)
    info = json.loads(out)
    assert code == 0 and info["classes"] == 10 and info["dtype"] == "float16" and info["rows"] == 1204
    code, out, _ = run(capsys, "cache", "verify", cache_dir)
    assert code == 0 and out.startswith("ok:")

    code, out, _ = run(capsys, "train", "--data", "digits", "--student", "64-16-10", "--cache", cache_dir,
                       "--temperature", 4, "--epochs", 2, "--out", student_dir, "--quiet")
    assert code == 0
    log = json.loads((student_dir / "metrics.json").read_text())
    assert log["config"]["loss"] == {"type": "KDLoss", "temperature": 4.0, "alpha": 0.9, "kind": "kl",
                                     "beta": 0.5, "ignore_index": -100, "label_smoothing": 0.0,
                                     "reduction": "mean", "scale_by_t2": True, "inplace": False}
    assert log["config"]["teacher"].startswith("cache ")

    # A flipped byte: verify exits 1 with a one-line reason naming the shard.
    shard = next(cache_dir.glob("logits-*.npy"))
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    code, out, err = run(capsys, "cache", "verify", cache_dir)
    assert code == 1 and shard.name in err and err.count("\n") == 1 and err.startswith("kdfast: error:")

    # Another teacher over the same directory needs --overwrite.
    code, _, _ = run(capsys, "train", "--data", "digits", "--student", "64-32-10", "--epochs", 1,
                     "--out", tmp_path / "t2", "--quiet")
    code, _, err = run(capsys, "cache", "build", "--teacher", tmp_path / "t2", "--data", "digits", "--out",
                       cache_dir, "--quiet")
    assert code == 1 and "--overwrite" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["cache", "info", "/nonexistent/cache"], "cache directory not found"),
        (["cache", "verify", "/nonexistent/cache"], "cache directory not found"),
        (["cache", "build", "--teacher", "/nonexistent/ckpt", "--data", "digits", "--out", "/tmp/x"],
         "checkpoint not found"),
        (["train", "--data", "digits", "--student", "64-x-10", "--out", "/tmp/x"], "784-800-800-10"),
        (["train", "--data", "digits", "--student", "784-10", "--out", "/tmp/x"], "input width 784"),
        (["train", "--data", "mnist", "--data-dir", "/nonexistent/mnist", "--student", "784-10", "--out",
          "/tmp/x"], "kdfast data mnist --dir"),
        (["mnist", "--data-dir", "/nonexistent/mnist", "--out", "/tmp/x"],
         "kdfast data mnist --dir"),
        (["mnist", "--threads", "0"], "--threads must be >= 1"),
        (["train", "--data", "digits", "--student", "64-10", "--max-norm", "0", "--out", "/tmp/x"],
         "max_norm must be None or > 0, got 0.0"),
    ],
)
def test_errors_exit_1_with_one_line(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)  # relative outputs, if any, land in tmp_path
    code, _, err = run(capsys, *[a.replace("/tmp/x", "out") for a in argv])
    assert code == 1 and match in err and err.count("\n") == 1


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["cache", "build", "--data", "digits"])  # --teacher and --out missing
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", "digits", "--student", "64-10", "--out", "x", "--cache", "c",
              "--teacher", "t"])
    assert exc.value.code == 2


def test_sparse_cache_build_and_info(tmp_path, capsys):
    pytest.importorskip("sklearn")
    teacher_dir, cache_dir = tmp_path / "teacher", tmp_path / "topk"
    code, _, _ = run(capsys, "train", "--data", "digits", "--student", "64-32-10", "--epochs", 1,
                     "--out", teacher_dir, "--quiet")
    assert code == 0
    code, out, _ = run(capsys, "cache", "build", "--teacher", teacher_dir, "--data", "digits", "--out",
                       cache_dir, "--targets", "topk", "--k", 3, "--temperature", 1, "--temperature", 4,
                       "--batch-size", 256, "--quiet")
    assert code == 0 and "(topk, float16)" in out
    code, out, _ = run(capsys, "cache", "info", cache_dir)
    info = json.loads(out)
    assert info["targets"] == "topk" and info["k"] == 3 and info["temperatures"] == [1.0, 4.0]
    assert info["bytes_per_row"] == 4 * 3 + 4 * 2 and info["row_level"] == "items"
    code, out, _ = run(capsys, "cache", "verify", cache_dir)
    assert code == 0 and out.startswith("ok:")
    code, out, _ = run(capsys, "train", "--data", "digits", "--student", "64-16-10", "--cache", cache_dir,
                       "--tail", "bucket", "--temperature", 4, "--epochs", 1, "--out", tmp_path / "kd",
                       "--quiet")
    assert code == 0 and "test errors" in out
    log = json.loads((tmp_path / "kd" / "metrics.json").read_text())
    assert log["config"]["loss"]["type"] == "SparseKDLoss" and log["config"]["loss"]["tail"] == "bucket"
    code, _, err = run(capsys, "train", "--data", "digits", "--student", "64-16-10", "--cache", cache_dir,
                       "--tail", "bucket", "--temperature", 2, "--epochs", 1, "--out", tmp_path / "kd2",
                       "--quiet")
    assert code == 1 and "declared temperatures [1.0, 4.0]" in err
    code, _, err = run(capsys, "cache", "build", "--teacher", teacher_dir, "--data", "digits", "--out",
                       tmp_path / "bad", "--k", 3, "--quiet")
    assert code == 1 and "--k and --samples need --targets" in err
    code, _, err = run(capsys, "cache", "build", "--teacher", teacher_dir, "--data", "digits", "--out",
                       tmp_path / "bad", "--targets", "sampled", "--samples", 5, "--temperature", 1,
                       "--temperature", 2, "--quiet")
    assert code == 1 and "one temperature T_s" in err
