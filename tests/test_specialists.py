"""kdfast.specialists: clustering, the dustbin correction, the combination against a float64
optimum, and the whole experiment on sklearn digits."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdfast.specialists import (
    Specialist,
    active_specialists,
    combine,
    combine_objective,
    confusable_clusters,
    dustbin_correction,
    init_from_generalist,
    kmeans,
    prediction_covariance,
    specialist_labels,
    specialist_rows,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_covariance_is_numpys():
    probs = torch.softmax(torch.randn(50, 6, generator=torch.Generator().manual_seed(0)), -1)
    import numpy as np

    assert torch.allclose(prediction_covariance(probs), torch.from_numpy(np.cov(probs.double().numpy().T)))


def test_clusters_find_the_confused_groups():
    # A generalist that confuses {0, 3, 5} among themselves and {1, 4} among themselves; 2 is clear.
    gen = torch.Generator().manual_seed(1)
    groups, rows = [[0, 3, 5], [1, 4], [2]], []
    for _ in range(600):
        group = groups[int(torch.randint(3, (1,), generator=gen))]
        p = torch.full((6,), 0.01)
        p[group] = torch.rand(len(group), generator=gen) + 0.05
        rows.append(p / p.sum())
    probs = torch.stack(rows)
    assert confusable_clusters(probs, 3) == [[0, 3, 5], [1, 4]]  # the singleton {2} is dropped
    assert confusable_clusters(probs, 3, min_size=1) == [[0, 3, 5], [1, 4], [2]]


def test_kmeans_separates_blobs_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = centres.repeat_interleave(20, 0) + 0.3 * torch.randn(60, 2, generator=gen)
    assign = kmeans(points, 3, seed=4)
    for block in assign.split(20):
        assert (block == block[0]).all()
    assert len(set(assign.tolist())) == 3
    assert torch.equal(assign, kmeans(points, 3, seed=4))
    with pytest.raises(ValueError, match="k must be in"):
        kmeans(points, 61)


def test_specialist_rows_are_half_its_classes():
    labels = torch.arange(10).repeat(30)  # 300 rows, 30 per class
    rows, natural, trained = specialist_rows(labels, [2, 7], seed=0)
    inside = torch.isin(labels[rows], torch.tensor([2, 7]))
    assert int(inside.sum()) == 60 and len(rows) == 120 and len(set(rows.tolist())) == 120
    assert natural == pytest.approx(0.2) and trained == pytest.approx(0.5)
    with pytest.raises(ValueError, match="some but not all"):
        specialist_rows(labels, list(range(10)))


def test_dustbin_correction_recovers_the_natural_posterior():
    # Exact Bayes: 3 classes with known likelihoods at one x; the specialist covers class 0.
    # Trained on data where class 0 is half (naturally 20 %), its posterior is biased; adding the
    # correction to the dustbin logit gives the natural posterior P(0 | x) vs P(1 or 2 | x).
    prior = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    lik = torch.tensor([0.7, 0.1, 0.4], dtype=torch.float64)
    natural = prior * lik / (prior * lik).sum()
    trained_prior = torch.cat([torch.tensor([0.5]), 0.5 * prior[1:] / prior[1:].sum()]).double()
    trained = trained_prior * lik / (trained_prior * lik).sum()
    logits = torch.log(torch.stack([trained[0], trained[1:].sum()]))
    logits[1] += dustbin_correction(0.2, 0.5)
    corrected = torch.softmax(logits, 0)
    assert torch.allclose(corrected, torch.stack([natural[0], natural[1:].sum()]), atol=1e-12)
    assert dustbin_correction(0.2, 0.5) == pytest.approx(math.log(4.0))
    with pytest.raises(ValueError, match="natural_fraction must be in"):
        dustbin_correction(0.0, 0.5)


def test_specialist_applies_its_correction():
    model = nn.Linear(3, 3)
    x = torch.randn(4, 3)
    s = Specialist([1, 2], model, correction=0.7)
    expected = model(x).double().detach()
    expected[:, -1] += 0.7
    assert torch.allclose(s.log_probs(x), torch.log_softmax(expected, -1))


def test_init_from_generalist_keeps_its_classes_rows():
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5))
    spec = init_from_generalist(gen, [3, 1])
    x = torch.randn(6, 4)
    with torch.no_grad():
        g, s = gen(x), spec(x)
    assert s.shape == (6, 3)
    assert torch.allclose(s[:, :2], g[:, [3, 1]])
    assert torch.allclose(s[:, 2], g[:, [0, 2, 4]].mean(1) + math.log(3))
    assert gen[2].out_features == 5  # the generalist is untouched
    assert specialist_labels(torch.tensor([0, 1, 2, 3, 4]), [3, 1]).tolist() == [2, 1, 2, 0, 2]
    with pytest.raises(ValueError, match="distinct ids"):
        init_from_generalist(gen, [1, 1])
    with pytest.raises(ValueError, match="leave some classes"):
        init_from_generalist(gen, [0, 1, 2, 3, 4])


def _problem(n=64, c=9, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    clusters = [[0, 1, 2], [3, 4], [1, 5, 6, 7]]  # overlapping, as the paper's
    log_g = torch.log_softmax(2 * torch.randn(n, c, generator=gen, dtype=torch.float64), -1)
    log_s = [torch.log_softmax(2 * torch.randn(n, len(cl) + 1, generator=gen, dtype=torch.float64), -1)
             for cl in clusters]
    active = torch.rand(n, len(clusters), generator=gen) < 0.7
    return log_g.to(dtype), [s.to(dtype) for s in log_s], clusters, active


def _float64_optimum(log_g, log_s, clusters, active):
    """An independent float64 solution: L-BFGS (strong Wolfe line search) on unconstrained
    logits, the objective's gradient from autograd."""
    z = log_g.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1, max_iter=2000, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = combine_objective(torch.log_softmax(z, -1), log_g, log_s, clusters, active).sum()
        value.backward()
        return value

    opt.step(closure)
    return torch.log_softmax(z.detach(), -1)


def test_combine_reaches_the_float64_optimum():
    log_g, log_s, clusters, active = _problem(n=24)
    best = _float64_optimum(log_g, log_s, clusters, active)
    optimum = combine_objective(best, log_g, log_s, clusters, active)
    got = combine(log_g, log_s, clusters, active)
    gap = combine_objective(got, log_g, log_s, clusters, active) - optimum
    assert gap.abs().max() < 1e-8  # 50 steps (the default)
    assert (got.exp() - best.exp()).abs().max() < 1e-4
    few = combine(log_g, log_s, clusters, active, steps=5)
    assert (combine_objective(few, log_g, log_s, clusters, active) - optimum).max() > 1e-4  # steps matter
    got32 = combine(log_g.float(), [s.float() for s in log_s], clusters, active)
    assert (got32.double().exp() - best.exp()).abs().max() < 1e-4


def test_combine_without_active_specialists_is_the_generalist():
    log_g, log_s, clusters, active = _problem(n=8)
    active[:4] = False
    got = combine(log_g, log_s, clusters, active)
    assert torch.allclose(got[:4], log_g[:4], atol=1e-12)
    with pytest.raises(ValueError, match=r"active must be \(N, M\)"):
        combine(log_g, log_s, clusters, active[:, :2])


def test_agreeing_specialists_keep_the_generalist():
    # A specialist whose distribution is the generalist's coarsened one changes nothing.
    log_g, _, clusters, _ = _problem(n=16)
    from kdfast.specialists import _bins

    log_s = [torch.log(log_g.exp() @ _bins(cl, 9, log_g.dtype)) for cl in clusters]
    got = combine(log_g, log_s, clusters, torch.ones(16, 3, dtype=torch.bool))
    assert torch.allclose(got, log_g, atol=1e-10)


def test_active_specialists_from_top_n():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]])
    act = active_specialists(probs, [[0, 3], [1, 2]], top_n=2)
    assert act.tolist() == [[True, True], [True, True]]
    act = active_specialists(probs, [[0, 3], [1, 2]], top_n=1)
    assert act.tolist() == [[True, False], [True, False]]


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: spawned processes
def test_experiment_on_digits(tmp_path, workers):
    pytest.importorskip("sklearn")
    from kdfast.specialists_experiment import SpecialistsPreset, run_specialists

    preset = SpecialistsPreset("test", hidden=32, generalist_epochs=3, specialist_epochs=2, batch_size=64,
                               clusterings=(3, 4))
    r = run_specialists("digits", preset, out_dir=tmp_path, workers=workers, plot=False, progress=False,
                        log=lambda _: None)
    assert r["clusters"] and all(2 <= len(c) < 10 for c in r["clusters"])
    assert (tmp_path / "results.json").exists()
    table = r["table4"]
    assert sum(row["examples"] for row in table) == r["test_errors"]["n"] == 593
    errors = r["test_errors"]
    assert r["generalist_errors_eval"] == errors["generalist"]
    assert sum(row["correct_generalist"] for row in table) == 593 - errors["generalist"]
    assert sum(row["correct_combined"] for row in table) == 593 - errors["combined"]
    assert table[0]["covering"] == 0


@pytest.mark.slow
def test_cli_specialists_on_digits(tmp_path, capsys):
    pytest.importorskip("sklearn")
    import json

    from kdfast.cli import main

    out = tmp_path / "run"
    assert main(["specialists", "--dataset", "digits", "--preset", "tiny", "--out", str(out), "--quiet",
                 "--no-plot", "--workers", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "digits" and results["preset"]["name"] == "tiny"
    assert "| active specialists covering the true class |" in capsys.readouterr().out


def test_cli_specialists_refuses_bad_workers(tmp_path, capsys):
    from kdfast.cli import main

    assert main(["specialists", "--dataset", "digits", "--workers", "0", "--out", str(tmp_path / "r")]) == 1
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
