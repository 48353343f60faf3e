"""scripts/build_stamp.py: when setup_env.sh may skip rebuilding the extension.

Each test builds a small fake checkout (setup.py, pyproject.toml, csrc/, a 'compiled' module),
records a stamp and changes one thing: only a change to what the build reads, or a module that
is not the recorded one, may ask for a rebuild."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_stamp.py"
_spec = importlib.util.spec_from_file_location("build_stamp", _SCRIPT)
build_stamp = importlib.util.module_from_spec(_spec)
sys.modules["build_stamp"] = build_stamp
_spec.loader.exec_module(build_stamp)

MODULE = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]  # what this interpreter's build writes


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "csrc" / "cpu").mkdir(parents=True)
    (root / "kdfast").mkdir()
    (root / "setup.py").write_text("setup()\n")
    (root / "pyproject.toml").write_text("[project]\nname = 'kdfast'\n")
    (root / "csrc" / "ops.cpp").write_text("int ops;\n")
    (root / "csrc" / "cpu" / "rows.h").write_text("int rows;\n")
    (root / "kdfast" / "__init__.py").write_text("")
    (root / "kdfast" / MODULE).write_bytes(b"\x7fELF built once")
    (root / "README.md").write_text("docs\n")
    (tmp_path / "venv").mkdir()
    return root


def _digest(root: Path, env: dict | None = None, torch_version: str = "2.13.0") -> str:
    return build_stamp.source_digest(root, env={} if env is None else env, torch_version=torch_version,
                                     python_version="3.11.7")


def _reason(root: Path, digest: str | None = None, installed: bool = True) -> str | None:
    stamp = root.parent / "venv" / build_stamp.STAMP_NAME
    return build_stamp.rebuild_reason(root, stamp, digest or _digest(root), installed)


def _record(root: Path) -> None:
    build_stamp.record(root, root.parent / "venv" / build_stamp.STAMP_NAME, _digest(root))


def test_first_build_needs_the_build_then_a_second_run_skips_it(checkout):
    assert "no build stamp" in _reason(checkout)
    _record(checkout)
    assert _reason(checkout) is None


@pytest.mark.parametrize("change", [
    lambda root: (root / "csrc" / "ops.cpp").write_text("int ops2;\n"),
    lambda root: (root / "csrc" / "cpu" / "new.cpp").write_text(""),
    lambda root: (root / "csrc" / "cpu" / "rows.h").unlink(),
    lambda root: (root / "csrc" / "cpu" / "rows.h").rename(root / "csrc" / "cpu" / "rows2.h"),
    lambda root: (root / "setup.py").write_text("setup(ext_modules=[])\n"),
    lambda root: (root / "pyproject.toml").write_text("[project]\nname = 'kdfast'\nversion = '2'\n"),
], ids=["edited source", "added source", "removed header", "renamed header", "setup.py", "pyproject"])
def test_a_changed_build_input_asks_for_a_rebuild(checkout, change):
    _record(checkout)
    change(checkout)
    assert "build inputs changed" in _reason(checkout)


def test_files_the_build_does_not_read_do_not_ask_for_one(checkout):
    _record(checkout)
    (checkout / "README.md").write_text("new docs\n")
    (checkout / "kdfast" / "train.py").write_text("x = 1\n")  # editable install: Python is live
    os.utime(checkout / "csrc" / "ops.cpp")  # touched, same bytes
    assert _reason(checkout) is None


def test_torch_python_and_build_environment_are_inputs(checkout):
    base = _digest(checkout)
    assert _digest(checkout, torch_version="2.14.1") != base
    other_python = build_stamp.source_digest(checkout, env={}, torch_version="2.13.0",
                                             python_version="3.12.1")
    assert other_python != base
    for name in ("KDFAST_CUDA", "KDFAST_CUDA_ARCHS", "CXX", "CXXFLAGS"):
        assert _digest(checkout, env={name: "1"}) != base, name
    assert _digest(checkout, env={"HOME": "/elsewhere", "PATH": "/bin"}) == base


def test_a_replaced_or_missing_module_asks_for_a_rebuild(checkout):
    _record(checkout)
    module = checkout / "kdfast" / MODULE
    module.write_bytes(b"\x7fELF built by another venv")  # e.g. the CUDA build in .venv-cuda
    assert "not the module the stamp recorded" in _reason(checkout)
    module.unlink()
    assert "no compiled kdfast/_C*.so for this Python" in _reason(checkout)


def test_a_module_built_for_another_python_is_not_this_build(checkout):
    other = checkout / "kdfast" / "_C.cpython-39-x86_64-linux-gnu.so"
    other.write_bytes(b"\x7fELF for python 3.9")
    _record(checkout)  # two modules in the package: the stamp is this interpreter's
    assert _reason(checkout) is None
    other.write_bytes(b"\x7fELF rebuilt for python 3.9")
    assert _reason(checkout) is None
    assert build_stamp.built_module(checkout, [".cpython-39-x86_64-linux-gnu.so", ".so"]) == other


def test_not_installed_or_unreadable_stamp_asks_for_a_rebuild(checkout):
    _record(checkout)
    assert "not installed" in _reason(checkout, installed=False)
    stamp = checkout.parent / "venv" / build_stamp.STAMP_NAME
    stamp.write_text("{not json")
    assert "unreadable build stamp" in _reason(checkout)
    stamp.write_text("[1, 2]")
    assert "not a JSON object" in _reason(checkout)


def test_record_refuses_when_nothing_was_built(checkout):
    (checkout / "kdfast" / MODULE).unlink()
    with pytest.raises(FileNotFoundError, match=r"no compiled module kdfast/_C\*\.so for this Python"):
        _record(checkout)
    assert not (checkout.parent / "venv" / build_stamp.STAMP_NAME).exists()


def test_command_line_exit_codes(checkout, monkeypatch, capsys):
    monkeypatch.setattr(build_stamp, "_installed_from", lambda root: True)
    args = ["--root", str(checkout), "--venv", str(checkout.parent / "venv")]
    assert build_stamp.main(["check", *args]) == 1
    assert build_stamp.main(["record", *args]) == 0
    assert build_stamp.main(["check", *args]) == 0
    assert "skipping the rebuild" in capsys.readouterr().err
    (checkout / "csrc" / "ops.cpp").write_text("int changed;\n")
    assert build_stamp.main(["check", *args]) == 1
    assert "rebuilding kdfast: build inputs changed" in capsys.readouterr().err


def test_the_imported_checkout_is_found_installed():
    # find_spec (which runs no __init__) must name the checkout that `import kdfast` uses.
    import kdfast

    root = Path(kdfast.__file__).resolve().parents[1]
    assert build_stamp._installed_from(root)
    assert not build_stamp._installed_from(root / "tests")
