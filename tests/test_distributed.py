"""The real thing on this machine: `torchrun --nproc_per_node=2` with gloo on the CPU.

A 2-process cache build equals a single-process one byte for byte (Python API and CLI),
survives a SIGKILLed rank (rerun the same command: it resumes), and refuses to share its
directory with another build; a full disk leaves it resumable. DDP training from a cache,
killed after a checkpoint and rerun, ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kdfast.cache.format import MANIFEST, CacheError
from tests.test_cache import dir_bytes

TIMEOUT = 120  # seconds per launched command: a hang fails the test instead of blocking CI

# One script for every launch: plain python = one process, under torchrun = one rank each.
# SLOW=1 sleeps after each teacher batch so a test can kill a rank mid-build.
_BUILD = textwrap.dedent("""
    import os, sys, time, torch
    from torch import nn
    from kdfast import distributed
    from kdfast.cache import build_cache
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    out = sys.argv[1]
    with open(os.path.join(os.path.dirname(out), f"pid.rank-{distributed.rank()}"), "w") as f:
        f.write(str(os.getpid()))
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 7))
    x = torch.randn(300, 12, generator=torch.Generator().manual_seed(1)) * 3
    if os.environ.get("SLOW") == "1":
        teacher.register_forward_hook(lambda *a: time.sleep(0.3))
    result = build_cache(teacher, x, out, batch_size=32, rows_per_shard=64, progress=False)
    print(f"rank {distributed.rank()}/{distributed.world_size()} computed {result.rows_computed}")
    distributed.shutdown()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]


def _env(**extra: str) -> dict:
    # PYTHONFAULTHANDLER: a worker that aborts prints where it was.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **extra}
    env.pop("SLOW", None)
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scripts") / "build.py"
    path.write_text(_BUILD)
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory, script) -> Path:
    """The single-process build every distributed one must equal."""
    out = tmp_path_factory.mktemp("single") / "cache"
    subprocess.run([sys.executable, str(script), str(out)], check=True, env=_env(), timeout=TIMEOUT)
    return out


def test_two_process_build_is_byte_identical(tmp_path, script, single):
    out = tmp_path / "cache"
    done = subprocess.run(_torchrun(2, str(script), str(out)), env=_env(), timeout=TIMEOUT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/2" in done.stdout and "rank 1/2" in done.stdout
    assert dir_bytes(out) == dir_bytes(single)  # every shard and the manifest
    # Both ranks did work: shard j went to rank j % 2.
    assert sorted(dir_bytes(out)) == sorted(dir_bytes(single))


@pytest.mark.slow
def test_killed_rank_resumes_to_identical_bytes(tmp_path, script, single):
    out = tmp_path / "cache"
    proc = subprocess.Popen(_torchrun(2, str(script), str(out)), env=_env(SLOW="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:  # until rank 1 has finished a shard
            try:
                if json.loads((out / "progress.rank-00001.json").read_text())["shards"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert proc.poll() is None, "the build ended before a rank could be killed"
            time.sleep(0.05)
        os.kill(int((tmp_path / "pid.rank-1").read_text()), signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0  # torchrun reports the dead worker and stops the other
    assert not (out / MANIFEST).exists()
    again = subprocess.run(_torchrun(2, str(script), str(out)), env=_env(), timeout=TIMEOUT,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert dir_bytes(out) == dir_bytes(single)


# The fast subset (-m "not slow") keeps the kill before the first shard.
@pytest.mark.parametrize("kill_after_shards", [0, pytest.param(1, marks=pytest.mark.slow),
                                               pytest.param(3, marks=pytest.mark.slow)])
def test_single_process_killed_at_several_points_resumes_identically(tmp_path, script, single,
                                                                     kill_after_shards):
    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=_env(SLOW="1"),
                            stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                shards = json.loads((out / "progress.json").read_text())["shards"]
                if len(shards) >= kill_after_shards:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert proc.poll() is None, "the build ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / MANIFEST).exists()
    subprocess.run([sys.executable, str(script), str(out)], check=True, env=_env(), timeout=TIMEOUT,
                   stdout=subprocess.DEVNULL)
    assert dir_bytes(out) == dir_bytes(single)


@pytest.mark.slow
def test_a_second_concurrent_build_is_refused(tmp_path, script, single):
    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=_env(SLOW="1"),
                            stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "progress.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        from torch import nn

        from kdfast.cache import build_cache

        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 7))
        x = torch.randn(300, 12, generator=torch.Generator().manual_seed(1)) * 3
        with pytest.raises(CacheError, match="being written by another build"):
            build_cache(teacher, x, out, batch_size=32, rows_per_shard=64, progress=False)
        assert proc.poll() is None  # the first build is unaffected ...
    finally:
        proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 0
    assert dir_bytes(out) == dir_bytes(single)  # ... and its cache is intact


_DISK_FULL = textwrap.dedent("""
    import resource, runpy, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def test_disk_full_is_a_clear_error_and_the_build_resumes(tmp_path, script, single):
    """A file-size limit stands in for a full disk: shard writes fail with EFBIG."""
    out = tmp_path / "cache"
    limiter = tmp_path / "limit.py"
    limiter.write_text(_DISK_FULL)
    # One 64-row shard of float16 x 7 classes is ~1 KB: 600 bytes lets the JSON files through
    # but no shard.
    failed = subprocess.run([sys.executable, str(limiter), "600", str(script), str(out)], env=_env(),
                            timeout=TIMEOUT, capture_output=True, text=True)
    assert failed.returncode != 0
    assert "failed" in failed.stderr and "rerun the same build to resume" in failed.stderr
    assert "File too large" in failed.stderr
    assert not (out / MANIFEST).exists()
    assert not list(out.glob(".*.tmp.*"))  # no half-written shard left behind
    subprocess.run([sys.executable, str(script), str(out)], check=True, env=_env(), timeout=TIMEOUT,
                   stdout=subprocess.DEVNULL)
    assert dir_bytes(out) == dir_bytes(single)


# ------------------------------------------------------------------------------- training
_TRAIN = textwrap.dedent("""
    import os, sys, time, torch
    import kdfast
    from kdfast import distributed
    from kdfast.data import load_digits_split
    from kdfast.models import mlp
    from kdfast.train import TrainConfig, fit
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    cache, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"pid.rank-{distributed.rank()}"), "w") as f:
        f.write(str(os.getpid()))
    train, test = load_digits_split()
    torch.manual_seed(0)
    student = mlp([64, 32, 10], dropout=0.1)
    if os.environ.get("SLOW") == "1":
        student.register_forward_hook(lambda *a: time.sleep(0.02))
    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.05, seed=3)
    fit(student, train, teacher=cache, loss=kdfast.KDLoss(temperature=4.0, alpha=0.9), config=cfg,
        eval_data=test, out_dir=out, progress=False)
    distributed.shutdown()
""")


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> Path:
    pytest.importorskip("sklearn")
    from kdfast.cache import build_cache
    from kdfast.data import load_digits_split
    from kdfast.models import mlp

    train, _ = load_digits_split()
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("digits") / "cache"
    build_cache(mlp([64, 64, 10]), train, out, batch_size=256, dtype="float32", progress=False)
    return out


@pytest.fixture(scope="module")
def train_script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scripts") / "train.py"
    path.write_text(_TRAIN)
    return path


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["state_dict"]


def _kill_after_first_checkpoint(cmd: list[str], run: Path, pid_file: str) -> None:
    proc = subprocess.Popen(cmd, env=_env(SLOW="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(int((run / pid_file).read_text()), signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    epochs = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"]
    assert 1 <= epochs < 4, f"killed after {epochs} of 4 epochs"


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_training_killed_and_resumed_ends_bit_identical(tmp_path, train_script, digits_cache, nproc):
    def command(run: Path) -> list[str]:
        args = [str(train_script), str(digits_cache), str(run)]
        return _torchrun(2, *args) if nproc == 2 else [sys.executable, *args]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(command(straight), env=_env(), timeout=TIMEOUT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    _kill_after_first_checkpoint(command(killed), killed, "pid.rank-1" if nproc == 2 else "pid.rank-0")
    again = subprocess.run(command(killed), env=_env(), timeout=TIMEOUT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads((straight / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4]
    assert all("test_errors" in e and e["train_loss"] > 0 for e in metrics["epochs"])
    if nproc == 2:
        assert metrics["config"]["world_size"] == 2
        # Rank 0 logged the loss over both ranks' rows: each rank has 1204 // 2 rows.
        assert all(e["rows_per_s"] > 0 for e in metrics["epochs"])


def test_resuming_with_another_process_count_is_refused(tmp_path, train_script, digits_cache):
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, str(train_script), str(digits_cache), str(run)], env=_env(),
                          timeout=TIMEOUT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    again = subprocess.run(_torchrun(2, str(train_script), str(digits_cache), str(run)), env=_env(),
                           timeout=TIMEOUT, capture_output=True, text=True)
    assert again.returncode != 0
    assert "another configuration" in again.stderr and "world_size" in again.stderr


@pytest.mark.slow
def test_cli_cache_build_under_torchrun_equals_one_process(tmp_path):
    """`kdfast cache build` itself under torchrun, with the default shard layout."""
    pytest.importorskip("sklearn")
    from kdfast.cli import main

    teacher = tmp_path / "teacher"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert main(["train", "--data", "digits", "--student", "64-64-10", "--epochs", "1", "--out",
                     str(teacher), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    args = ["cache", "build", "--teacher", str(teacher), "--data", "digits", "--batch-size", "64",
            "--threads", "1", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "kdfast.cli", *args, "--out", str(tmp_path / "one")],
                         env=_env(), timeout=TIMEOUT, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_torchrun(2, "-m", "kdfast.cli", *args, "--out", str(tmp_path / "two")),
                         env=_env(), timeout=TIMEOUT, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "by 2 processes" in two.stdout and two.stdout.count("cached") == 1  # rank 0 reports
    # 1204 rows = 19 batches of 64: 2 batches per shard, 10 shards.
    assert len(list((tmp_path / "one").glob("logits-*.npy"))) == 10
    assert dir_bytes(tmp_path / "one") == dir_bytes(tmp_path / "two")
