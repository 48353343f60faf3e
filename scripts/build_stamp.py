"""Decides whether `scripts/setup_env.sh` must rebuild the extension (`pip install -e .`).

A rebuild takes minutes; it is needed only when what the build reads changed. After a
successful build, ``record`` writes a stamp into the venv: the digest of the build's inputs
(setup.py, pyproject.toml, every file under csrc/, the Python and torch versions of the venv,
the environment variables setup.py and the compiler read) and the SHA-256 of the built
``kdfast/_C*.so``. ``check`` exits 0 when the stamp matches the tree and that very module is
still in place and installed from this checkout, 1 (with the reason) otherwise.

Standard library only; run it with the venv's interpreter so the versions are the venv's:

    .venv/bin/python scripts/build_stamp.py check  --root . --venv .venv
    .venv/bin/python scripts/build_stamp.py record --root . --venv .venv
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

STAMP_NAME = "kdfast-build-stamp.json"
BUILD_FILES = ("setup.py", "pyproject.toml")
SOURCE_DIRS = ("csrc",)
# What setup.py (KDFAST_*, CUDA) and the compiler (CC, flags) read besides the files.
BUILD_ENV = ("KDFAST_CUDA", "KDFAST_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CC", "CXX",
             "CFLAGS", "CXXFLAGS", "LDFLAGS")


def _build_inputs(root: Path) -> list[Path]:
    files = [root / name for name in BUILD_FILES if (root / name).is_file()]
    for directory in SOURCE_DIRS:
        files += sorted(p for p in (root / directory).rglob("*") if p.is_file())
    return files


def _torch_version() -> str | None:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def source_digest(root: Path, env: dict[str, str] | None = None, torch_version: str | None = None,
                  python_version: str | None = None) -> str:
    """SHA-256 over the build's inputs: each file's path (relative to ``root``) and bytes,
    the torch and Python versions, and the build environment variables that are set."""
    env = os.environ if env is None else env
    h = hashlib.sha256()
    for path in _build_inputs(root):
        data = path.read_bytes()
        h.update(f"file {path.relative_to(root).as_posix()} {len(data)}\n".encode())
        h.update(data)
    h.update(f"torch {torch_version if torch_version is not None else _torch_version()}\n".encode())
    h.update(f"python {python_version or sys.version}\n".encode())
    for name in BUILD_ENV:
        if name in env:
            h.update(f"env {name}={env[name]}\n".encode())
    return h.hexdigest()


def built_module(root: Path, suffixes: list[str] | None = None) -> Path | None:
    """The compiled extension an editable install leaves in the package for this interpreter
    (``_C`` + one of its extension suffixes, e.g. ``_C.cpython-311-x86_64-linux-gnu.so``), or
    None. Modules built for other Python versions in the same checkout are not this build."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES if suffixes is None else suffixes:
        path = root / "kdfast" / f"_C{suffix}"
        if path.is_file():
            return path
    return None


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _installed_from(root: Path) -> bool:
    # find_spec of a top-level package locates it without running its __init__ (no torch import).
    spec = importlib.util.find_spec("kdfast")
    if spec is None or spec.origin is None:
        return False
    return Path(spec.origin).resolve().parent == (root / "kdfast").resolve()


def rebuild_reason(root: Path, stamp_path: Path, digest: str, installed: bool) -> str | None:
    """Why the extension must be rebuilt, or None when the recorded build is current: the
    stamp exists, its digest is ``digest``, the module it recorded is the one in place, and
    kdfast is ``installed`` (importable from this checkout)."""
    if not installed:
        return "kdfast is not installed from this checkout"
    try:
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no build stamp ({stamp_path})"
    except (OSError, ValueError) as exc:
        return f"unreadable build stamp {stamp_path} ({exc})"
    if not isinstance(stamp, dict):
        return f"build stamp {stamp_path} is not a JSON object"
    if stamp.get("source_digest") != digest:
        return "build inputs changed since the last build (csrc/, setup.py, pyproject.toml, torch, env)"
    module = built_module(root)
    if module is None:
        return "no compiled kdfast/_C*.so for this Python in place"
    if stamp.get("module") != module.name or stamp.get("module_sha256") != _file_sha256(module):
        return f"{module.name} is not the module the stamp recorded (rebuilt or replaced since)"
    return None


def record(root: Path, stamp_path: Path, digest: str) -> dict:
    """Writes the stamp for the module now in place (atomically); returns it."""
    module = built_module(root)
    if module is None:
        raise FileNotFoundError(f"no compiled module kdfast/_C*.so for this Python under {root}: build first")
    stamp = {"source_digest": digest, "module": module.name, "module_sha256": _file_sha256(module)}
    tmp = stamp_path.with_name(stamp_path.name + ".tmp")
    tmp.write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, stamp_path)
    return stamp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("check", "record"))
    parser.add_argument("--root", default=".", help="the checkout (default .)")
    parser.add_argument("--venv", required=True, help="the venv whose build is stamped")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    stamp_path = Path(args.venv) / STAMP_NAME
    digest = source_digest(root)
    if args.command == "record":
        record(root, stamp_path, digest)
        return 0
    reason = rebuild_reason(root, stamp_path, digest, _installed_from(root))
    if reason is not None:
        print(f"rebuilding kdfast: {reason}", file=sys.stderr)
        return 1
    print("kdfast extension up to date (build inputs unchanged): skipping the rebuild", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
