"""The on-disk format of a soft-target cache: names, dtypes, shards, the manifest.

A cache is one directory::

    manifest.json                         written last: the cache is complete iff it exists
    progress.json                         only while a build runs (config + finished shards)
    logits-000000000000-000000004096.npy  one shard per row range [start, stop)

Shards are plain ``.npy`` files (numpy's documented format, read with ``allow_pickle=False``),
fixed width, C-contiguous, so a reader memory-maps them and hands out rows without a copy.
numpy has no bfloat16, so a bfloat16 shard stores the raw bits as ``<u2`` and the manifest's
``dtype`` says how to view them. Shards are named by their row range and cover [0, N) in
order; a later multi-process build writes disjoint ranges and merges the shard lists.
Every file is written atomically (:mod:`kdfast._io`).

Format version 2 adds sparse caches (``"targets"`` in the manifest, see
:mod:`kdfast.cache.sparse`): a shard then holds one packed numpy record per row, and a
token-level cache (``"rows": "tokens"``) prefixes each shard with the int64 offsets of its
sequences, i.e. two ``.npy`` arrays back to back (``np.load(f)`` twice on one open file reads
them). A dense cache is still written as version 1, byte for byte as before, so older
kdfast versions keep reading dense caches and refuse sparse ones with their "rebuild" message.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdfast._io import atomic_write_bytes

FORMAT_NAME = "kdfast-soft-targets"
FORMAT_VERSION = 1  # dense caches
SPARSE_FORMAT_VERSION = 2  # sparse and token-level caches
READABLE_VERSIONS = (FORMAT_VERSION, SPARSE_FORMAT_VERSION)
ROW_KINDS = ("items", "tokens")
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
# A build of K > 1 processes: each rank records its finished shards in its own file.
RANK_PROGRESS_GLOB = "progress.rank-*.json"
BUILD_LOCK = "build.lock"
SHARD_PREFIX = "logits-"

# Stored dtype name -> (torch dtype, numpy dtype of the .npy payload).
DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<u2")),
}
ENSEMBLE_MODES = ("none", "mean_logits", "mean_probs", "members")


class CacheError(RuntimeError):
    """A cache directory is missing, incomplete or unreadable."""


class CacheMismatchError(CacheError, ValueError):
    """The cache was built for another teacher, dataset, class count or temperature."""


class CacheCorruptError(CacheError):
    """A shard's bytes do not match the SHA-256 recorded in the manifest."""


def dtype_name(dtype: str | torch.dtype) -> str:
    """Normalizes ``"float16"`` / ``torch.float16`` (etc.) to the manifest's dtype name."""
    name = str(dtype).removeprefix("torch.")
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
               "float": "float32"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return name


def shard_name(start: int, stop: int) -> str:
    """File name of the shard holding rows [start, stop); zero-padded so names sort by row."""
    return f"{SHARD_PREFIX}{start:012d}-{stop:012d}.npy"


def shard_ranges(num_rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """The row ranges [start, stop) of the shards covering [0, num_rows)."""
    return [(s, min(s + rows_per_shard, num_rows)) for s in range(0, num_rows, rows_per_shard)]


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def rank_progress_name(rank: int) -> str:
    return f"progress.rank-{rank:05d}.json"


class BuildLock:
    """An exclusive ``flock`` on ``DIR/build.lock`` for the duration of a build, so a second
    build into the same directory fails with a clear error instead of interleaving shards.
    The kernel drops the lock when its holder dies, so a killed build never leaves a stale one.
    """

    def __init__(self, cache_dir: Path) -> None:
        self.path = Path(cache_dir) / BUILD_LOCK
        self._fd: int | None = None

    def __enter__(self) -> BuildLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CacheError(
                f"{self.path.parent} is being written by another build (pid {holder} holds "
                f"{self.path}); wait for it to finish or use another directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._fd is not None:
            if exc_type is None:  # a finished build leaves only the cache's own files
                self.path.unlink(missing_ok=True)
            os.close(self._fd)  # releases the flock
            self._fd = None


def save_shard(path: Path, rows: torch.Tensor) -> str:
    """Atomically writes ``rows`` (stored dtype, CPU) as ``.npy``; returns its SHA-256."""
    rows = rows.contiguous()
    array = rows.view(torch.uint16).numpy() if rows.dtype == torch.bfloat16 else rows.numpy()
    atomic_write_bytes(path, lambda f: np.save(f, array, allow_pickle=False))
    return sha256_file(path)


def open_shard(path: Path, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Memory-maps a shard and returns it as a torch tensor sharing the mapped pages.

    ``mmap_mode="c"`` (copy-on-write) gives a writable array, so torch does not warn, and a
    caller that writes into a returned view changes only its private pages, never the file.
    """
    torch_dtype, np_dtype = DTYPES[dtype]
    try:
        # allow_pickle=False: an object array is refused, never unpickled; numpy also bounds
        # the header it parses (max_header_size).
        array = np.load(path, mmap_mode="c", allow_pickle=False)
    except FileNotFoundError:
        raise CacheCorruptError(f"shard {path} is missing; rebuild the cache") from None
    except Exception as exc:  # numpy's header parser raises many types (SyntaxError, ...)
        raise CacheCorruptError(f"shard {path} is unreadable ({type(exc).__name__}: {exc}); rebuild "
                                "the cache") from None
    if array.dtype != np_dtype or tuple(array.shape) != tuple(shape) or not array.flags.c_contiguous:
        raise CacheCorruptError(
            f"{path}: header says dtype {array.dtype} shape {tuple(array.shape)}, the manifest "
            f"expects {np_dtype} {tuple(shape)}; rebuild the cache"
        )
    tensor = torch.from_numpy(array)
    return tensor.view(torch_dtype) if torch_dtype == torch.bfloat16 else tensor


def save_records(path: Path, records: np.ndarray, offsets: np.ndarray | None = None) -> str:
    """Atomically writes a sparse shard: ``[offsets .npy]`` then the records' ``.npy``;
    returns its SHA-256."""
    def write(f) -> None:
        if offsets is not None:
            np.save(f, np.ascontiguousarray(offsets, dtype="<i8"), allow_pickle=False)
        np.save(f, np.ascontiguousarray(records), allow_pickle=False)

    atomic_write_bytes(path, write)
    return sha256_file(path)


def _read_npy_header(f, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(f)
    if fortran_order or dtype.hasobject:
        raise ValueError("not a C-ordered array of plain values")
    return shape, dtype


def open_records(path: Path, dtype: np.dtype, rows: int, sequences: int | None = None
                 ) -> tuple[np.ndarray | None, np.ndarray]:
    """Reads a sparse shard's offsets (``sequences + 1`` int64, token-level only) and
    memory-maps its ``rows`` records (copy-on-write, like :func:`open_shard`). Any header,
    size or offset that is not what the manifest says is a :class:`CacheCorruptError`."""
    try:
        with open(path, "rb") as f:
            offsets = None
            if sequences is not None:
                shape, odtype = _read_npy_header(f, path)
                if odtype != np.dtype("<i8") or shape != (sequences + 1,):
                    raise ValueError(f"offsets are {odtype} {shape}, expected int64 ({sequences + 1},)")
                offsets = np.fromfile(f, dtype="<i8", count=sequences + 1)
                if len(offsets) != sequences + 1 or offsets[0] != 0 or offsets[-1] != rows or (
                        np.diff(offsets) < 0).any():
                    raise ValueError(f"offsets are not a partition of the shard's {rows} tokens")
            shape, rdtype = _read_npy_header(f, path)
            start = f.tell()
        if rdtype != dtype or shape != (rows,):
            raise ValueError(f"records are {rdtype} {shape}, the manifest expects {dtype} ({rows},)")
        expected = start + rows * dtype.itemsize
        if os.path.getsize(path) != expected:
            raise ValueError(f"file has {os.path.getsize(path)} bytes, expected {expected}")
        records = np.memmap(path, dtype=dtype, mode="c", offset=start, shape=(rows,)) if rows else \
            np.zeros(0, dtype=dtype)
    except FileNotFoundError:
        raise CacheCorruptError(f"shard {path} is missing; rebuild the cache") from None
    except Exception as exc:  # numpy's header parser raises many types (SyntaxError, ...)
        raise CacheCorruptError(f"shard {path} is unreadable ({type(exc).__name__}: {exc}); rebuild "
                                "the cache") from None
    return offsets, records


# A manifest lists one small entry per shard; anything larger is not one of ours.
MAX_JSON_BYTES = 64 << 20


def read_json(path: Path, what: str) -> dict:
    """Reads a JSON object, turning a missing, oversized or garbled file into a CacheError."""
    try:
        size = os.path.getsize(path)
        if size > MAX_JSON_BYTES:
            raise CacheError(f"{what} {path} is too large ({size} bytes > {MAX_JSON_BYTES}): not a "
                             "kdfast cache file")
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CacheError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheError(f"{what} {path} is not valid JSON ({exc})") from None
    except RecursionError:
        raise CacheError(f"{what} {path} nests too deeply: not a kdfast cache file") from None
    if not isinstance(obj, dict):
        raise CacheError(f"{what} {path} is not a JSON object")
    return obj


def load_manifest(cache_dir: str | Path) -> dict:
    """Reads and sanity-checks ``manifest.json`` of a complete cache."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise CacheError(f"cache directory not found: {cache_dir} (build one with `kdfast cache build`)")
    path = cache_dir / MANIFEST
    if not path.exists():
        hint = (" a build is in progress or was interrupted: rerun the same build to resume"
                if (cache_dir / PROGRESS).exists() else " build one with `kdfast cache build`")
        raise CacheError(f"{cache_dir} has no {MANIFEST}:{hint}")
    manifest = read_json(path, "manifest")
    if manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{path} is not a kdfast soft-target cache (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CacheError(
            f"{path} has format_version {manifest.get('format_version')!r}; this kdfast reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}: rebuild the cache"
        )
    try:
        _check_manifest_fields(manifest)
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheError(f"{path} is malformed ({exc}); rebuild the cache") from None
    expected = 0
    for shard in manifest["shards"]:
        if shard["start"] != expected or shard["stop"] <= shard["start"]:
            raise CacheError(f"{path}: shards do not tile the rows (at row {expected}: {shard})")
        expected = shard["stop"]
    if expected != manifest["num_rows"]:
        raise CacheError(f"{path}: shards cover {expected} rows, num_rows is {manifest['num_rows']}")
    return manifest


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_manifest_fields(m: dict) -> None:
    """Types and ranges of every field the reader uses; the file names must be the ones a
    build writes (no path can point outside the cache directory)."""
    for key, low in (("num_rows", 1), ("num_classes", 1), ("rows_per_shard", 1)):
        if not _is_int(m[key], low):
            raise ValueError(f"field {key!r} must be an int >= {low}, got {m[key]!r}")
    if m["dtype"] not in DTYPES:
        raise ValueError(f"unknown dtype {m['dtype']!r}")
    ensemble = m["ensemble"]
    if not isinstance(ensemble, dict) or ensemble.get("mode") not in ENSEMBLE_MODES or not _is_int(
            ensemble.get("members"), 1):
        raise ValueError(f"bad ensemble {ensemble!r}")
    for key in ("teacher_fingerprint", "dataset_fingerprint"):
        if not isinstance(m[key], str):
            raise ValueError(f"field {key!r} must be a string")
    if not isinstance(m["shards"], list) or not m["shards"]:
        raise ValueError("field 'shards' must be a non-empty list")
    for shard in m["shards"]:
        if not isinstance(shard, dict) or not _is_int(shard.get("start")) or not _is_int(shard.get("stop")):
            raise ValueError(f"bad shard entry {shard!r}")
        if shard.get("file") != shard_name(shard["start"], shard["stop"]):
            raise ValueError(f"shard file {shard.get('file')!r} is not the name of rows "
                             f"[{shard['start']}, {shard['stop']})")
        sha = shard.get("sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise ValueError(f"bad sha256 in shard entry {shard!r}")
    if m["format_version"] == SPARSE_FORMAT_VERSION:
        _check_sparse_fields(m)
    elif "targets" in m or "rows" in m:
        raise ValueError("a format_version 1 (dense) manifest has sparse fields ('targets', 'rows')")


def _check_sparse_fields(m: dict) -> None:
    """The version-2 fields: the targets spec, the row kind and each token shard's size."""
    from kdfast.cache.sparse import SparseSpec  # sparse imports this module

    SparseSpec.from_manifest(m)
    if m["rows"] not in ROW_KINDS:
        raise ValueError(f"field 'rows' must be one of {ROW_KINDS}, got {m['rows']!r}")
    if m["rows"] == "tokens":
        if not all(_is_int(shard.get("tokens")) for shard in m["shards"]):
            raise ValueError("every shard entry of a token-level cache needs 'tokens' (an int >= 0)")
        if not _is_int(m["num_tokens"]) or m["num_tokens"] != sum(s["tokens"] for s in m["shards"]):
            raise ValueError(f"field 'num_tokens' {m['num_tokens']!r} is not the sum of the shards' tokens")


def row_shape(manifest: dict) -> tuple[int, ...]:
    """Shape of one stored row: ``(C,)``, or ``(M, C)`` for ensemble mode ``"members"``."""
    members = manifest["ensemble"]["members"]
    c = manifest["num_classes"]
    return (members, c) if manifest["ensemble"]["mode"] == "members" else (c,)
