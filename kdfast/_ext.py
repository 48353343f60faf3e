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
