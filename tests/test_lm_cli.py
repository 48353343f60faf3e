"""`kdfast lm cache | train | eval-teacher` on a tiny random Llama and a fake data dir."""

import json

import pytest

transformers = pytest.importorskip("transformers")

from kdfast.cli import main  # noqa: E402
from tests.lm_helpers import make_lm_data_dir  # noqa: E402

VOCAB, SEQ = 200, 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_lm_data_dir(tmp_path_factory.mktemp("lm"), VOCAB, SEQ, {"train": 16, "valid": 4, "test": 4})


def _run(capsys, *argv) -> dict:
    assert main([*argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_cache_train_and_teacher_eval_commands(data_dir, tmp_path, capsys):
    common = ["--data-dir", str(data_dir), "--threads", "1", "--quiet"]
    stats = _run(capsys, "lm", "cache", *common, "--out", str(tmp_path / "c"), "--sequences", "8",
                 "--k", "4", "--batch-size", "4", "--body-dtype", "float32", "--measure-overhead", "4")
    assert stats["tokens"] == 8 * SEQ and stats["bare_forward_tokens_per_s"] > 0
    assert stats["bytes_per_token"] < stats["dense_fp16_bytes_per_token"]
    train = ["--steps", "2", "--batch-size", "2", "--eval-every", "2", "--eval-sequences", "2", "--d-model",
             "16", "--layers", "1", "--heads", "2", "--ffn", "16", "--sequences", "8"]
    hard = _run(capsys, "lm", "train", *common, *train, "--out", str(tmp_path / "h"))
    soft = _run(capsys, "lm", "train", *common, *train, "--out", str(tmp_path / "s"), "--mode", "distill",
                "--cache", str(tmp_path / "c"))
    assert hard["step"] == soft["step"] == 2
    teacher = _run(capsys, "lm", "eval-teacher", *common, "--sequences", "2", "--body-dtype", "float32")
    assert teacher["tokens"] == 2 * (SEQ - 1) and teacher["perplexity"] > 1


def test_a_cache_over_other_sequences_is_refused(data_dir, tmp_path, capsys):
    common = ["--data-dir", str(data_dir), "--threads", "1", "--quiet"]
    _run(capsys, "lm", "cache", *common, "--out", str(tmp_path / "c"), "--sequences", "4", "--k", "4",
         "--batch-size", "4", "--body-dtype", "float32")
    assert main(["lm", "train", *common, "--out", str(tmp_path / "s"), "--mode", "distill", "--cache",
                 str(tmp_path / "c"), "--sequences", "8", "--steps", "1", "--d-model", "16", "--heads",
                 "2"]) == 1
    assert "holds 4 sequences" in capsys.readouterr().err


def test_one_cache_pass_writes_every_spec(data_dir, tmp_path, capsys):
    common = ["--data-dir", str(data_dir), "--threads", "1", "--quiet", "--sequences", "8", "--batch-size",
              "4", "--body-dtype", "float32"]
    stats = _run(capsys, "lm", "cache", *common, "--out", str(tmp_path / "c"), "--spec", "topk:k=4",
                 "--spec", "sampled:samples=5,temperature=1.5", "--spec", "topk+sampled:k=2,samples=2")
    names = ["topk-k4", "sampled-n5", "topk-sampled-k2-n2"]
    assert sorted(stats) == sorted(str(tmp_path / "c" / n) for n in names)
    assert len({s["seconds"] for s in stats.values()}) == 1  # one pass
    # The same bytes as a cache built alone.
    _run(capsys, "lm", "cache", *common, "--out", str(tmp_path / "alone"), "--targets", "sampled",
         "--samples", "5", "--temperature", "1.5")
    for name in ("manifest.json", *(p.name for p in (tmp_path / "alone").glob("logits-*.npy"))):
        assert (tmp_path / "c" / "sampled-n5" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes()


@pytest.mark.parametrize("extra, message", [
    (["--spec", "topk:kk=4"], "--spec 'topk:kk=4': unknown key 'kk'"),
    (["--spec", "topk:k=four"], "--spec 'topk:k=four': k must be an int"),
    (["--spec", "topk:k=4", "--k", "8"], "--spec: give each cache's arguments in its spec, not --k"),
    (["--spec", "ranked:k=4"], "targets must be one of"),
])
def test_bad_specs_name_the_argument(data_dir, tmp_path, capsys, extra, message):
    argv = ["lm", "cache", "--data-dir", str(data_dir), "--threads", "1", "--quiet", "--sequences", "4",
            "--batch-size", "4", "--out", str(tmp_path / "c"), *extra]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert not list(tmp_path.rglob("manifest.json"))
