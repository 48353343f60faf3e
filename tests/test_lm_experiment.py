"""`kdfast lm --preset`'s pipeline (kdfast.lm.experiment) on a tiny random Llama and a fake data
dir: every student trains, the tables and the plot are written, a rerun resumes, and another
preset's directory is refused."""

import json
from dataclasses import replace

import pytest

transformers = pytest.importorskip("transformers")

from kdfast.cache.sparse import make_spec  # noqa: E402
from kdfast.cli import main  # noqa: E402
from kdfast.lm import experiment as lm_experiment  # noqa: E402
from kdfast.lm.train import LMTrainConfig  # noqa: E402
from tests.lm_helpers import make_lm_data_dir  # noqa: E402

VOCAB, SEQ = 150, 10

TINY = lm_experiment.LMPreset(
    "tiny", sequences=8, seeds=(0, 1), eval_sequences=2, teacher_batch_size=4,
    train=LMTrainConfig(steps=2, batch_size=2, warmup_steps=1, eval_every=1, eval_sequences=2),
    student={"d_model": 16, "layers": 1, "heads": 2, "ffn": 16},
    caches=(lm_experiment.CacheSpec("topk", k=4, tails=("renormalize", "bucket")),
            lm_experiment.CacheSpec("sampled", samples=6, temperature=1.0)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_lm_data_dir(tmp_path_factory.mktemp("lm"), VOCAB, SEQ, {"train": 8, "valid": 2, "test": 2})


def test_every_student_trains_and_the_results_are_written(data_dir, tmp_path):
    out = tmp_path / "run"
    results = lm_experiment.run_lm_experiment(TINY, out, data_dir, progress=False)
    names = set(results["students"])
    assert names == {f"{kind}-s{seed}" for seed in (0, 1)
                     for kind in ("hard", "topk-k4-renormalize", "topk-k4-bucket", "sampled-n6-renormalize")}
    for run in results["students"].values():
        assert run["test"]["tokens"] == 2 * (SEQ - 1) and run["test"]["perplexity"] > 1
        assert [h["step"] for h in run["history"]] == [1, 2]
    assert set(results["caches"]) == {"topk-k4", "sampled-n6"}
    topk = results["caches"]["topk-k4"]
    assert topk["bytes_per_token"] < topk["dense_fp16_bytes_per_token"]
    table = (out / "results.md").read_text()
    for label in ("teacher", "hard labels", "topk-k4, renormalize", "topk-k4, bucket",
                  "sampled-n6, renormalize"):
        assert label in table
    assert (out / "valid_perplexity.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["students"].keys() == names


def test_a_rerun_resumes_without_training_again(data_dir, tmp_path):
    out = tmp_path / "run"
    first = lm_experiment.run_lm_experiment(TINY, out, data_dir, progress=False, plot=False)
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")}
    again = lm_experiment.run_lm_experiment(TINY, out, data_dir, progress=False, plot=False)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint.pt")} == stamps
    assert again["students"] == first["students"]


def test_the_same_seed_gives_the_same_hard_student_and_seeds_differ(data_dir, tmp_path):
    results = lm_experiment.run_lm_experiment(replace(TINY, caches=()), tmp_path / "r", data_dir,
                                              progress=False, plot=False)
    rows = lm_experiment.summarize(results)
    assert [r["student"] for r in rows] == ["hard labels"] and rows[0]["seeds"] == 2
    s0, s1 = (results["students"][f"hard-s{s}"]["test"]["perplexity"] for s in (0, 1))
    assert s0 != s1 and rows[0]["perplexity_spread"] == pytest.approx(abs(s0 - s1))


def test_another_preset_in_the_same_directory_is_refused(data_dir, tmp_path):
    out = tmp_path / "run"
    lm_experiment.run_lm_experiment(replace(TINY, caches=(), seeds=(0,)), out, data_dir, progress=False,
                                    plot=False)
    with pytest.raises(ValueError, match="out_dir: .* another preset"):
        lm_experiment.run_lm_experiment(replace(TINY, caches=(), seeds=(1,)), out, data_dir, progress=False)


def test_kdfast_lm_without_a_preset_or_step_says_what_to_give(capsys):
    assert main(["lm"]) == 1
    assert "--preset quick|full" in capsys.readouterr().err


def test_the_presets_budgets():
    quick, full = lm_experiment.PRESETS["quick"], lm_experiment.PRESETS["full"]
    assert quick.sequences * 256 >= 150_000 and full.sequences * 256 >= 1_000_000
    assert len(quick.seeds) >= 2 and len(full.seeds) >= 1
    assert {c.targets for c in full.caches} == {"topk", "sampled", "topk+sampled"}
    # The full preset compares the kinds at equal bytes per token.
    sizes = {make_spec(c.targets, 49_152, k=c.k, samples=c.samples, temperatures=c.temperature, seed=0,
                       logit_dtype="float16").bytes_per_row for c in full.caches}
    assert len(sizes) == 1
    assert {t for c in full.caches for t in c.tails} == {"renormalize", "bucket"}
