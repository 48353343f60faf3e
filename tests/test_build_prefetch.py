"""The CPU row loops' software prefetches are in the built binary.

GCC once deleted every call of the prefetch helper (its pure-const analysis sees no side effect
in a function that only prefetches), and the kernel ran 17-25 % slower on large rows with no
test noticing (benchmarks/NOTES.md, entry 13). This reads the compiled extension back."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

import kdfast

pytestmark = [
    pytest.mark.skipif(not kdfast.HAS_EXTENSION, reason="compiled extension not built"),
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 prefetch instructions"),
    pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed"),
]


def _row_loop_instructions() -> dict[str, str]:
    """Disassembly of each instruction set's functions (the row loops wherever the compiler
    placed them), joined per ISA."""
    from kdfast import _C

    text = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", _C.__file__], check=True, capture_output=True, text=True
    ).stdout
    per_isa: dict[str, list[str]] = {}
    # objdump starts each function with "<address> <demangled name>:" on a line of its own.
    for block in re.split(r"\n(?=[0-9a-f]+ <)", text):
        header = block.split("\n", 1)[0]
        match = re.search(r"kdfast::cpu::(avx512|avx2|baseline)::", header)
        if match:
            per_isa.setdefault(match.group(1), []).append(block)
    return {isa: "\n".join(blocks) for isa, blocks in per_isa.items()}


def test_every_isa_row_loop_prefetches():
    loops = _row_loop_instructions()
    compiled = kdfast.build_info()["cpu_isas_compiled"]
    assert sorted(loops) == sorted(compiled), f"row loops found for {sorted(loops)}, compiled: {compiled}"
    for isa, asm in loops.items():
        # Rows of several chunks prefetch with locality 1 (prefetcht2), one-chunk rows with 3
        # (prefetcht0): both paths are in every float instantiation.
        assert "prefetcht2" in asm, f"{isa}: long-row prefetches missing from the row loops"
        assert "prefetcht0" in asm, f"{isa}: one-chunk-row prefetches missing from the row loops"
