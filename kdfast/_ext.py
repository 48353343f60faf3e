"""Loads the compiled module; kdfast still imports (reference path only) when it is missing."""

from __future__ import annotations

import warnings

try:
    from kdfast import _C  # noqa: F401  (importing registers torch.ops.kdfast.*)

    HAS_EXTENSION = True
    IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    HAS_EXTENSION = False
    IMPORT_ERROR = str(exc)
    warnings.warn(
        "kdfast: the compiled kernels (kdfast._C) could not be imported "
        f"({exc}); kdfast.distillation_loss falls back to the slow pure-PyTorch "
        "kdfast.reference path. Build them with `pip install -e . --no-build-isolation`.",
        RuntimeWarning,
        stacklevel=2,
    )


def build_info() -> dict:
    """What the compiled module contains: backends, CPU instruction sets, CUDA archs."""
    if not HAS_EXTENSION:
        return {"backends": [], "extension": False, "import_error": IMPORT_ERROR}
    return {"extension": True, **_C.build_info()}


def buffer_pool_stats() -> dict:
    """The CPU gradient-buffer pool: ``cached_blocks`` / ``cached_bytes`` held for reuse now,
    ``hits`` (allocations served from it) and ``misses`` (fresh mappings) so far.

    kdfast keeps up to two freed CPU gradient buffers of >= 4 MiB (the N x C ``.grad`` an
    optimizer releases each step) and reuses one of the same size in the next forward, which
    spares the page faults of mapping it again. ``KDFAST_CPU_BUFFER_POOL=0`` turns this off.
    """
    if not HAS_EXTENSION:
        return {"cached_blocks": 0, "cached_bytes": 0, "hits": 0, "misses": 0}
    return _C.buffer_pool_stats()


def release_buffers() -> None:
    """Returns the CPU gradient buffers kdfast keeps for reuse to the OS (like
    ``torch.cuda.empty_cache()``; buffers in use are not affected)."""
    if HAS_EXTENSION:
        _C.release_buffers()
