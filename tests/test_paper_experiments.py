"""kdfast.paper_experiments (omit-3, only-7-8, few-data): the helpers against independent
oracles, and each experiment's whole pipeline (teacher, cache, students, bias search, early
stopping, results, plot, resume, CLI) on small synthetic MNIST files."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from kdfast import paper_experiments as pe
from kdfast.data import mnist
from kdfast.mnist_experiment import Preset
from kdfast.train import evaluate, load_checkpoint
from tests.test_mnist import synthetic_mnist

TINY = Preset("tiny", teacher_epochs=2, student_epochs=2, sweep_epochs=1, batch_size=32, speed_batches=1)
CONFIG = pe.ExperimentConfig(val_fraction=0.2, bias_max=4.0, bias_step=0.5, few_data_fraction=0.1,
                             few_data_epochs=3, few_data_seeds=(0, 1))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """600 training and 200 test images of the synthetic MNIST, as IDX files whose MD5s are
    made the known ones."""
    files = synthetic_mnist(n_train=600, n_test=200)
    directory = tmp_path_factory.mktemp("mnist")
    for name, data in files.items():
        (directory / name).write_bytes(data)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mnist, "MD5", {name: hashlib.md5(data).hexdigest() for name, data in files.items()})
        yield directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("run")  # one teacher + cache shared by the experiments


# ------------------------------------------------------------------------------ helpers
def test_shift_errors_match_a_loop_over_the_shifts():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(300, 10, generator=g) * 3, torch.randint(0, 10, (300,), generator=g)
    shifts = torch.tensor([0.0, 0.7, 2.0, -1.5])
    errors, class_errors = pe.shift_errors(logits, labels, [3, 7], shifts)
    for i, delta in enumerate(shifts):
        shifted = logits.clone()
        shifted[:, [3, 7]] += delta
        wrong = shifted.argmax(1) != labels
        assert errors[i] == int(wrong.sum())
        assert class_errors[i] == int(wrong[(labels == 3) | (labels == 7)].sum())


def test_split_validation_and_few_data_rows():
    train, val = pe.split_validation(60, 1 / 12, seed=4)
    assert len(val) == 5 and len(train) == 55
    assert sorted(train.tolist() + val.tolist()) == list(range(60))
    assert train.tolist() == sorted(train.tolist()) and val.tolist() == sorted(val.tolist())
    assert torch.equal(pe.split_validation(60, 1 / 12, seed=4)[1], val)
    assert not torch.equal(pe.split_validation(60, 1 / 12, seed=5)[1], val)
    rows = pe.few_data_rows(train, 60, 0.1, seed=0)
    assert len(rows) == 6 and set(rows.tolist()) <= set(train.tolist())
    with pytest.raises(ValueError, match="val_fraction must be in"):
        pe.split_validation(60, 1.0)
    with pytest.raises(ValueError, match="more than the 55 rows"):
        pe.few_data_rows(train, 60, 0.95, seed=0)


def test_bias_grid_and_margins():
    cfg = pe.ExperimentConfig(bias_max=1.0, bias_step=0.25)
    assert pe.bias_grid(cfg, 1.0).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert pe.bias_grid(cfg, -1.0).tolist() == [0.0, -0.25, -0.5, -0.75, -1.0]
    assert str(pe.bias_grid(cfg, -1.0)[0].item()) == "0.0"  # not -0.0 in the results
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0]])
    assert pe._margins(logits, torch.tensor([1, 2])).tolist() == [1.0, -4.0]


def test_bias_analysis_reads_the_output_layer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3))
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([1.0, -2.0, 4.0]))
    teacher = torch.tensor([[0.0, 9.0, 0.0], [0.0, 0.0, 9.0]])
    student = torch.zeros(2, 3)
    setup = pe._BiasSetup("x", keep=lambda y: y != 1, classes=(1,), sign=1.0, focus=lambda y: y == 1,
                          focus_label="1s")
    out = pe.bias_analysis(model, student, teacher, torch.randn(5, 3), torch.tensor([1, 1, 0, 2, 1]), setup,
                           temperature=1.0)
    assert out["bias_minus_mean_of_others"] == pytest.approx([0.0, -4.5, 4.5])  # b_k - mean of the other two
    assert out["teacher_argmax_rows"] == 1 and out["focus_test_rows"] == 3
    assert out["student_mass_at_1"] == pytest.approx(1 / 3)
    assert out["teacher_mass_at_1"] == pytest.approx((torch.softmax(teacher, -1)[:, 1]).mean().item())


# ------------------------------------------------------------------- whole experiments
def _labels(data_dir, split="train"):
    return mnist.load_mnist(split, data_dir).tensors[1]


@pytest.mark.parametrize(("experiment", "keep", "classes"), [
    ("omit-3", lambda y: y != 3, [3]),
    ("only-7-8", lambda y: (y == 7) | (y == 8), [7, 8]),
])
def test_bias_experiment_end_to_end(data_dir, run_dir, experiment, keep, classes):
    logs = []
    results = pe.run_experiment(experiment, TINY, out_dir=run_dir, data_dir=data_dir, config=CONFIG,
                                progress=False, log=logs.append)
    saved = json.loads((run_dir / experiment / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert (run_dir / experiment / "bias_shift.png").read_bytes()[:4] == b"\x89PNG"
    # The transfer set: the training rows outside the validation split whose label is kept.
    labels = _labels(data_dir)
    train_rows, val_rows = pe.split_validation(len(labels), CONFIG.val_fraction, 0)
    assert results["transfer_rows"] == int(keep(labels[train_rows]).sum())
    assert results["val_rows"] == len(val_rows)
    student, payload = load_checkpoint(run_dir / experiment / "student")
    assert payload["run_config"]["train_rows"] == results["transfer_rows"]
    # The shift chosen on validation is the first minimum of the validation curve ...
    curve = results["curve"]
    chosen = results["chosen_on_validation"]
    assert chosen["val_errors"] == min(curve["val_errors"])
    assert curve["bias_shift"][curve["val_errors"].index(chosen["val_errors"])] == chosen["bias_shift"]
    assert chosen["bias_shift"] * (1 if classes == [3] else -1) >= 0
    # ... and its test errors are those of the checkpointed student with that bias added.
    test = mnist.load_mnist("test", data_dir)
    for summary in (results["before"], chosen, results["chosen_on_test"]):
        shifted = load_checkpoint(run_dir / experiment / "student")[0]
        with torch.no_grad():
            shifted[-1].bias[classes] += summary["bias_shift"]
        assert evaluate(shifted, test)["errors"] == summary["test_errors"]
    focus = ~torch.isin(test.tensors[1], torch.tensor([7, 8])) if classes == [7, 8] else test.tensors[1] == 3
    assert results["focus_n"] == int(focus.sum())
    assert results["chosen_on_test"]["test_errors"] == min(curve["test_errors"])
    assert results["bias"]["transfer_rows"] == results["transfer_rows"]
    table = pe.format_experiment(results)
    assert f"| {experiment} (transfer set: {results['transfer_rows']:,} rows)" in table
    # A rerun resumes the teacher, the cache and the student: the same numbers.
    again = pe.run_experiment(experiment, TINY, out_dir=run_dir, data_dir=data_dir, config=CONFIG,
                              plot=False, progress=False, log=logs.append)
    assert again["curve"] == results["curve"] and again["bias"] == results["bias"]


def test_few_data_end_to_end(data_dir, run_dir):
    results = pe.run_experiment("few-data", TINY, out_dir=run_dir, data_dir=data_dir, config=CONFIG,
                                progress=False, log=lambda _: None)
    assert (run_dir / "few-data" / "few_data.png").read_bytes()[:4] == b"\x89PNG"
    assert results["rows"] == 60 and results["seeds"] == [0, 1]
    for kind in ("hard", "soft"):
        assert [r["seed"] for r in results["runs"][kind]] == [0, 1]
        for run in results["runs"][kind]:
            curve = run["val_errors_per_epoch"]
            assert len(curve) == CONFIG.few_data_epochs
            early, fixed = run["early_stopping"], run["fixed_schedule"]
            assert early["val_errors"] == min(curve) and early["epoch"] == curve.index(min(curve)) + 1
            assert fixed["epoch"] == CONFIG.few_data_epochs and fixed["val_errors"] == curve[-1]
            assert early["train_n"] == 60 and early["test_n"] == 200 and early["val_n"] == 120
        test_errors = [r["fixed_schedule"]["test_errors"] for r in results["runs"][kind]]
        summary = results["summary"][f"{kind}/fixed_schedule"]
        assert summary["test_errors"]["mean"] == pytest.approx(sum(test_errors) / 2)
    # Hard and soft runs of a seed train on the same rows from the same initial weights; the
    # soft targets change the result.
    hard, soft = results["runs"]["hard"][0], results["runs"]["soft"][0]
    assert hard["val_errors_per_epoch"] != soft["val_errors_per_epoch"]
    assert "| soft targets, early stopping |" in pe.format_experiment(results)
    # Finished runs are kept: a rerun only reads them back.
    again = pe.run_experiment("few-data", TINY, out_dir=run_dir, data_dir=data_dir, config=CONFIG,
                              plot=False, progress=False, log=lambda _: None)
    assert again["runs"] == results["runs"]
    assert not any(k.startswith("few-data:") for k in again["stage_seconds"])


def test_unknown_experiment_and_cli(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="experiment must be one of"):
        pe.run_experiment("omit-4")
    calls = []
    monkeypatch.setattr(pe, "run_experiment", lambda *a, **kw: calls.append((a, kw)))
    from kdfast.cli import main

    assert main(["mnist", "--experiment", "only-7-8", "--out", str(tmp_path), "--no-plot", "--quiet"]) == 0
    (name, preset), kw = calls[0]
    assert (name, preset, kw["out_dir"], kw["plot"], kw["progress"]) == ("only-7-8", "quick", str(tmp_path),
                                                                         False, False)
