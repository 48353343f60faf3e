"""Atomic file writes, shared by the soft-target cache and the trainer's checkpoints.

A reader (or a resumed run) must see either the old file or the whole new one, never a torn
write: each helper writes a temp file next to the target, fsyncs it, renames it into place
and fsyncs the directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "temp_path"]


def temp_path(path: Path) -> Path:
    """The temp file :func:`atomic_write_bytes` writes before the rename: hidden, in the
    target's directory (a rename within one file system is atomic), unique per process."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry is flushed (POSIX).
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Writes ``path`` through ``write(fileobj)`` into a temp file, fsyncs, then renames it
    into place: readers and a resumed run see either the old file or the whole new one.

    If ``write`` raises (or the process is interrupted), the temp file is removed and the
    old file, if any, is left untouched.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically writes ``obj`` as sorted, indented JSON (deterministic bytes)."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(path, lambda f: f.write(data))
