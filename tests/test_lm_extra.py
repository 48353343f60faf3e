"""The optional `lm` extra stays optional: the core package never imports it."""

import subprocess
import sys

LM_MODULES = ("transformers", "gguf", "accelerate", "safetensors")


def test_import_kdfast_does_not_import_the_lm_extra():
    code = ("import sys, kdfast, kdfast.cache, kdfast.train, kdfast.cli, kdfast.lm; "
            f"print([m for m in {LM_MODULES!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
