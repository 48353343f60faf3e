"""Faults of token-level sparse caches (top-k and sampled), as tests/test_cache.py,
test_cache_faults.py and test_distributed.py check them for dense caches: a SIGKILLed build
resumes to the same bytes, a 2-process torchrun build equals a 1-process one, damaged shards
and manifests are refused with a CacheError, and a fuzzed cache never gives anything else.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdfast.cache import SoftTargetCache, verify_cache
from kdfast.cache.format import MANIFEST, PROGRESS, CacheCorruptError, CacheError
from tests.test_cache import dir_bytes
from tests.test_cache_faults import VALUES
from tests.test_distributed import TIMEOUT, _env, _torchrun

# argv: OUT KIND [SLOW]. A tiny causal LM over 23 sequences of 1..12 tokens, vocabulary 40.
_BUILD = textwrap.dedent("""
    import os, sys, time, torch
    from torch import nn
    from kdfast import distributed
    from kdfast.cache import build_cache
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    out, kind = sys.argv[1], sys.argv[2]

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(40, 16), nn.Linear(16, 40)

        def forward(self, ids):
            h = self.embed(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1)[:, None]
            return self.head(torch.tanh(h)) * 3

    torch.manual_seed(0)
    lm = LM()
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 40, (int(n),), generator=g) for n in torch.randint(1, 13, (23,), generator=g)]
    if len(sys.argv) > 3:
        lm.register_forward_hook(lambda *a: time.sleep(0.25))  # time to kill it mid-way
    args = {"topk": dict(targets="topk", k=4, temperatures=(1.0, 2.0)),
            "sampled": dict(targets="sampled", samples=12, temperature=2.0, seed=3)}[kind]
    result = build_cache(lm, seqs, out, batch_size=2, rows_per_shard=4, progress=False, **args)
    print(f"rank {distributed.rank()}/{distributed.world_size()} computed {result.rows_computed}")
    distributed.shutdown()
""")
KINDS = ("topk", "sampled")
SERVE_T = {"topk": 1.0, "sampled": 2.0}


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scripts") / "build_tokens.py"
    path.write_text(_BUILD)
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, Path]:
    """One single-process build per kind, run in this process (the script's code, one
    thread): what every other build must equal."""
    out, argv, threads = {}, sys.argv, torch.get_num_threads()
    try:
        for kind in KINDS:
            out[kind] = tmp_path_factory.mktemp(f"single-{kind}") / "cache"
            sys.argv = ["build_tokens.py", str(out[kind]), kind]
            exec(compile(_BUILD, "build_tokens.py", "exec"), {"__name__": "build_tokens"})
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    return out


def _read_all(path: Path, kind: str, verify_on_open: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    cache = SoftTargetCache(path, verify_on_open=verify_on_open)
    served = cache.sparse_targets(slice(None), SERVE_T[kind])
    return served.indices, served.logits


@pytest.mark.parametrize("kind", KINDS)
def test_token_cache_layout_and_bytes_per_token(single, kind):
    cache = SoftTargetCache(single[kind])
    m = cache.manifest
    assert cache.token_level and m["num_rows"] == 23 and len(m["shards"]) == 6
    assert m["num_tokens"] == sum(s["tokens"] for s in m["shards"])
    payload = sum(_payload_bytes(single[kind] / s["file"]) for s in m["shards"])  # files less headers
    assert payload == m["num_tokens"] * cache.bytes_per_row + 8 * (m["num_rows"] + len(m["shards"]))
    if kind == "topk":  # issue 12: <= 4k + 4 n_T + 8 bytes per token (uint16 ids, fp16 logits)
        assert payload <= m["num_tokens"] * (4 * 4 + 4 * 2 + 8)


def _payload_bytes(path: Path) -> int:
    """A token shard's bytes less its two .npy headers (offsets, records)."""
    headers = 0
    with open(path, "rb") as f:
        for _ in range(2):
            start = f.tell()
            np.lib.format.read_magic(f)
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            headers += f.tell() - start
            f.seek(int(np.prod(shape)) * dtype.itemsize, os.SEEK_CUR)
    return path.stat().st_size - headers


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_two_process_build_is_byte_identical(tmp_path, script, single, kind):
    out = tmp_path / "cache"
    done = subprocess.run(_torchrun(2, str(script), str(out), kind), env=_env(), timeout=TIMEOUT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/2" in done.stdout and "rank 1/2" in done.stdout
    assert dir_bytes(out) == dir_bytes(single[kind])


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_then_resume_is_byte_identical(tmp_path, script, single, kind):
    out = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, str(script), str(out), kind, "slow"], env=_env())
    try:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                if len(json.loads((out / PROGRESS).read_text())["shards"]) >= 2:
                    break
            except (OSError, ValueError, KeyError):
                pass  # not written yet
            assert proc.poll() is None, "the build finished before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / MANIFEST).exists()
    again = subprocess.run([sys.executable, str(script), str(out), kind], env=_env(), timeout=TIMEOUT,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "computed" in again.stdout and "computed 23" not in again.stdout  # shards were reused
    assert dir_bytes(out) == dir_bytes(single[kind])


# ---------------------------------------------------------------------------- corruption
@pytest.fixture(params=KINDS)
def damaged(request, single, tmp_path) -> tuple[str, Path]:
    copy = tmp_path / "cache"
    shutil.copytree(single[request.param], copy)
    return request.param, copy


def _shard(path: Path) -> Path:
    return sorted(path.glob("logits-*.npy"))[1]


def test_flipped_byte_is_refused(damaged):
    kind, path = damaged
    shard = _shard(path)
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheCorruptError, match=shard.name):
        _read_all(path, kind)
    with pytest.raises(CacheCorruptError, match=shard.name):
        verify_cache(path)


@pytest.mark.parametrize("cut", [5, 200])  # inside the records; inside the offsets' header
def test_truncated_shard_is_refused_even_unverified(damaged, cut):
    kind, path = damaged
    shard = _shard(path)
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-cut] if cut < 100 else raw[:cut // 2])
    with pytest.raises(CacheCorruptError, match=shard.name):
        _read_all(path, kind, verify_on_open=False)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda m: m["shards"][1].update(tokens=m["shards"][1]["tokens"] + 1), "num_tokens"),
    (lambda m: m.update(num_tokens=m["num_tokens"] + 1), "num_tokens"),
    (lambda m: m["shards"][0].pop("tokens"), "tokens"),
    (lambda m: m.update(rows="words"), "rows"),
    (lambda m: m["targets"].update(kind="everything"), "targets"),
    (lambda m: m["targets"].update(temperatures=[]), "temperatures"),
    (lambda m: m["targets"].update(k=-1), "k"),
    (lambda m: m.pop("targets"), "targets"),
])
def test_damaged_manifest_is_refused(damaged, edit, match):
    kind, path = damaged
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=match):
        _read_all(path, kind, verify_on_open=False)


def test_shard_tokens_that_disagree_with_the_file_are_refused(damaged):
    kind, path = damaged
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["shards"][0]["tokens"] += 1
    manifest["shards"][1]["tokens"] -= 1  # the total still adds up
    (path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptError, match="logits-000000000000"):
        _read_all(path, kind, verify_on_open=False)


# ------------------------------------------------------------------------------ fuzzing
SPARSE_FIELDS = ["targets", "rows", "num_tokens", "num_classes", "dtype", "format_version", "num_rows"]
TARGET_KEYS = ["kind", "k", "samples", "temperatures", "seed"]


@st.composite
def damage(draw):
    """One to three random edits: manifest fields, the targets spec, shard entries, shard bytes."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["field", "targets", "shard_entry", "flip", "truncate", "append"]))
        if what == "field":
            edits.append((what, draw(st.sampled_from(SPARSE_FIELDS)), draw(VALUES)))
        elif what == "targets":
            edits.append((what, draw(st.sampled_from(TARGET_KEYS)), draw(VALUES)))
        elif what == "shard_entry":
            edits.append((what, draw(st.integers(0, 5)),
                          draw(st.sampled_from(["start", "stop", "tokens", "sha256"])), draw(VALUES)))
        else:
            edits.append((what, draw(st.integers(0, 5)), draw(st.integers(0, 10_000))))
    return edits


def _apply(cache_dir: Path, edits) -> None:
    manifest = json.loads((cache_dir / MANIFEST).read_text())
    shards = sorted(cache_dir.glob("logits-*.npy"))
    for edit in edits:
        if edit[0] == "field":
            manifest[edit[1]] = edit[2]
        elif edit[0] == "targets":
            if isinstance(manifest.get("targets"), dict):
                manifest["targets"][edit[1]] = edit[2]
        elif edit[0] == "shard_entry":
            manifest["shards"][edit[1]][edit[2]] = edit[3]
        else:
            path = shards[edit[1]]
            raw = bytearray(path.read_bytes())
            pos = edit[2] % max(len(raw), 1)
            if edit[0] == "flip" and raw:
                raw[pos] ^= 0xFF
            elif edit[0] == "truncate":
                raw = raw[:pos]
            else:
                raw += b"\0" * (pos % 97 + 1)
            path.write_bytes(bytes(raw))
    (cache_dir / MANIFEST).write_text(json.dumps(manifest, allow_nan=True))


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=damage(), verify_on_open=st.booleans())
@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_token_reader_only_raises_cache_errors(single, tmp_path_factory, kind, edits, verify_on_open):
    cache_dir = tmp_path_factory.mktemp("fuzz") / "cache"
    shutil.copytree(single[kind], cache_dir)
    reference = _read_all(single[kind], kind)
    _apply(cache_dir, edits)
    try:
        rows = _read_all(cache_dir, kind, verify_on_open)
    except CacheError:
        return  # named and refused
    if not (torch.equal(rows[0], reference[0]) and torch.equal(rows[1], reference[1])):
        assert not verify_on_open  # only what verify() exists to catch
        with pytest.raises(CacheCorruptError):
            verify_cache(cache_dir)
