"""`build_lm_caches` with a tiny random transformers Llama (no download): one teacher pass writes
a top-k and a top-k + sampled cache; a 2-process torchrun build is byte-identical to one
process, and a SIGKILLed build resumes to the same bytes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from kdfast.cache.format import MANIFEST, PROGRESS  # noqa: E402
from tests.test_cache import dir_bytes  # noqa: E402
from tests.test_distributed import TIMEOUT, _torchrun  # noqa: E402
from tests.test_distributed import _env as _base_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    # The scripts run from a temp directory: import this checkout's kdfast, not another install.
    return _base_env(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

# argv: OUT [SLOW]. 24 sequences of 12 tokens, vocabulary 120, batches of 2, 16 shards; the
# caches OUT/topk and OUT/mix from one teacher pass.
_BUILD = textwrap.dedent("""
    import sys, time, numpy as np, torch, transformers
    from kdfast import distributed
    from kdfast.lm.teacher import TeacherLogits, build_lm_caches
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=120, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=16, tie_word_embeddings=True)
    teacher = TeacherLogits(transformers.LlamaForCausalLM(config), torch.float32)
    if len(sys.argv) > 2:
        teacher.register_forward_hook(lambda *a: time.sleep(0.25))  # time to kill it mid-way
    tokens = np.random.default_rng(1).integers(0, 120, size=(24, 12)).astype(np.uint16)
    outputs = {sys.argv[1] + "/topk": {"targets": "topk", "k": 4},
               sys.argv[1] + "/mix": {"targets": "topk+sampled", "k": 4, "samples": 8, "temperature": 1.0}}
    stats = build_lm_caches(teacher, tokens, outputs, fingerprint="tiny", dataset_fingerprint="tiny",
                            batch_size=2, progress=False)
    computed = sorted({s["tokens_computed"] for s in stats.values()})
    print(f"rank {distributed.rank()}/{distributed.world_size()} computed {computed}")
    distributed.shutdown()
""")


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scripts") / "build_lm.py"
    path.write_text(_BUILD)
    return path


@pytest.fixture(scope="module")
def single(script, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "cache"
    done = subprocess.run([sys.executable, str(script), str(out)], env=_env(), timeout=TIMEOUT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "computed [288]" in done.stdout
    return out


def _same_caches(out: Path, single: Path) -> None:
    for name in ("topk", "mix"):
        assert dir_bytes(out / name) == dir_bytes(single / name), name


@pytest.mark.slow
def test_two_process_lm_cache_is_byte_identical(tmp_path, script, single):
    out = tmp_path / "cache"
    done = subprocess.run(_torchrun(2, str(script), str(out)), env=_env(), timeout=TIMEOUT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/2" in done.stdout and "rank 1/2" in done.stdout
    _same_caches(out, single)


@pytest.mark.slow
def test_sigkilled_lm_cache_resumes_byte_identical(tmp_path, script, single):
    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, str(script), str(out), "slow"], env=_env())
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                if len(json.loads((out / "mix" / PROGRESS).read_text())["shards"]) >= 3:
                    break
            except (OSError, ValueError, KeyError):
                pass  # not written yet
            assert proc.poll() is None, "the build finished before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "mix" / MANIFEST).exists()
    again = subprocess.run([sys.executable, str(script), str(out)], env=_env(), timeout=TIMEOUT,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "computed" in again.stdout and "288" not in again.stdout  # shards were reused
    _same_caches(out, single)
