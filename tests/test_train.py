"""kdfast.train: cache vs live teacher, resume, logs, errors, and distillation on sklearn digits."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import kdfast
from kdfast.cache import CacheMismatchError, build_cache
from kdfast.models import jitter, mlp
from kdfast.train import (
    CachedTeacher,
    LiveTeacher,
    TrainConfig,
    _apply_max_norm,
    evaluate,
    fit,
    load_checkpoint,
    save_checkpoint,
)

D, C, N = 20, 6, 256


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster, and immune to OpenMP stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def toy():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    return TensorDataset(x, y)


def teacher_for(seed=0):
    torch.manual_seed(seed)
    return mlp([D, 48, C], dropout=0.3)


def student_for(seed=1):
    torch.manual_seed(seed)
    return mlp([D, 16, C])


def first_step_loss(source, data, loss) -> float:
    cfg = TrainConfig(epochs=1, batch_size=32, max_batches=1, seed=7)
    return fit(student_for(), data, teacher=source, loss=loss, config=cfg, progress=False).final["train_loss"]


def test_cache_and_live_teacher_give_the_same_first_step_loss(tmp_path, toy):
    teacher = teacher_for()
    loss = kdfast.KDLoss(temperature=3.0, alpha=0.7)
    build_cache(teacher, toy, tmp_path / "f32", dtype="float32", batch_size=64, progress=False)
    build_cache(teacher, toy, tmp_path / "f16", dtype="float16", batch_size=64, progress=False)
    live = first_step_loss(teacher, toy, loss)
    cached = first_step_loss(tmp_path / "f32", toy, loss)
    assert live == pytest.approx(cached, rel=1e-6)  # only GEMM blocking differs (batch 64 vs 32)
    assert first_step_loss(tmp_path / "f16", toy, loss) == pytest.approx(live, rel=1e-3)
    # Sources can be given explicitly, with the same result.
    assert first_step_loss(CachedTeacher(tmp_path / "f32"), toy, loss) == cached
    assert first_step_loss(LiveTeacher(teacher), toy, loss) == live


def test_cached_teacher_rows_train_a_subset_on_its_cache_rows(tmp_path, toy):
    # A transfer set that is part of the cached dataset (classes left out, a few-data sample):
    # its row i reads cache row rows[i], so the first step equals distilling from a cache of
    # the subset itself.
    teacher = teacher_for()
    loss = kdfast.KDLoss(temperature=3.0, alpha=0.7)
    rows = torch.nonzero(toy.tensors[1] != 2).flatten()[torch.randperm(200, generator=torch.Generator()
                                                                        .manual_seed(0))[:150]]
    subset = TensorDataset(*(t[rows] for t in toy.tensors))
    build_cache(teacher, toy, tmp_path / "full", dtype="float32", batch_size=64, progress=False)
    build_cache(teacher, subset, tmp_path / "sub", dtype="float32", batch_size=64, progress=False)
    via_rows = first_step_loss(CachedTeacher(tmp_path / "full", rows=rows), subset, loss)
    assert via_rows == pytest.approx(first_step_loss(tmp_path / "sub", subset, loss), rel=1e-6)
    assert CachedTeacher(tmp_path / "full", rows=rows)(torch.empty(0), torch.tensor([0, 5])).equal(
        CachedTeacher(tmp_path / "full").cache[rows[[0, 5]]])
    # The rows are part of the run config: a resume with other rows is refused.
    other = CachedTeacher(tmp_path / "full", rows=rows.flip(0))
    assert other.describe() != CachedTeacher(tmp_path / "full", rows=rows).describe()
    with pytest.raises(CacheMismatchError, match="rows select 150 rows, the dataset 256"):
        first_step_loss(CachedTeacher(tmp_path / "full", rows=rows), toy, loss)
    with pytest.raises(ValueError, match=r"rows must be cache row indices in \[0, 256\), got \[0, 256\]"):
        CachedTeacher(tmp_path / "full", rows=[0, 256])


def test_ensemble_live_and_members_cache_agree(tmp_path, toy):
    members = [teacher_for(0), teacher_for(1)]
    loss = kdfast.KDLoss(temperature=2.0, alpha=0.5)
    build_cache(members, toy, tmp_path, dtype="float32", ensemble="members", batch_size=64, progress=False)
    live = first_step_loss(LiveTeacher(members, "mean_probs", temperature=2.0), toy, loss)
    cached = first_step_loss(CachedTeacher(tmp_path, combine="mean_probs"), toy, loss)
    assert live == pytest.approx(cached, rel=1e-5)
    with pytest.raises(ValueError, match="combine="):
        CachedTeacher(tmp_path)


class _Stop(Exception):
    pass


class _FlakyTeacher(LiveTeacher):
    """A live teacher that dies after ``calls`` batches (same description, same run config)."""

    def __init__(self, teacher, calls):
        super().__init__(teacher)
        self.calls = calls

    def __call__(self, x, idx):
        self.calls -= 1
        if self.calls < 0:
            raise _Stop
        return super().__call__(x, idx)


def _untimed(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "rows_per_s")} for h in history]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(p, q) for p, q in pairs)


def test_resume_after_an_interruption_continues_exactly(tmp_path, toy):
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, seed=2)
    teacher = teacher_for()
    loss = kdfast.KDLoss(temperature=2.0, alpha=0.8)
    kw = dict(loss=loss, config=cfg, eval_data=toy, progress=False)
    straight = student_for()
    full = fit(straight, toy, teacher=teacher, out_dir=tmp_path / "a", **kw)
    steps = N // 32
    with pytest.raises(_Stop):  # dies in the middle of epoch 3
        fit(student_for(), toy, teacher=_FlakyTeacher(teacher, 2 * steps + 3), out_dir=tmp_path / "b", **kw)
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["epochs"][-1]["epoch"] == 2
    resumed = student_for()
    result = fit(resumed, toy, teacher=teacher, out_dir=tmp_path / "b", **kw)
    assert _same_weights(resumed, straight)
    assert _untimed(result.history) == _untimed(full.history)
    # Finished runs load instead of training again.
    again = student_for()
    assert _untimed(fit(again, toy, teacher=teacher, out_dir=tmp_path / "b", **kw).history) == \
        _untimed(full.history)
    assert _same_weights(again, straight)


def test_resume_refuses_another_configuration(tmp_path, toy):
    fit(student_for(), toy, config=TrainConfig(epochs=1, batch_size=64), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="another configuration"):
        fit(student_for(), toy, config=TrainConfig(epochs=1, batch_size=32), out_dir=tmp_path, progress=False)
    fit(student_for(), toy, config=TrainConfig(epochs=1, batch_size=32), out_dir=tmp_path, progress=False,
        resume=False)


def test_checkpoint_from_before_a_new_option_still_resumes(tmp_path, toy):
    cfg = TrainConfig(epochs=1, batch_size=64)
    fit(student_for(), toy, config=cfg, out_dir=tmp_path, progress=False)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del payload["run_config"]["train"]["clip_grad_norm"]  # as written by an older kdfast
    save_checkpoint(tmp_path / "checkpoint.pt", payload)
    assert len(fit(student_for(), toy, config=cfg, out_dir=tmp_path, progress=False).history) == 1
    with pytest.raises(ValueError, match="differs in: train"):  # not at its default: refused
        fit(student_for(), toy, config=TrainConfig(epochs=1, batch_size=64, clip_grad_norm=1.0),
            out_dir=tmp_path, progress=False)


def _distil_one_epoch(out_dir, data, loss, **kw):
    return fit(student_for(), data, teacher=teacher_for(), loss=loss, out_dir=out_dir, progress=False,
               config=TrainConfig(epochs=1, batch_size=64), **kw)


def test_run_config_records_the_whole_loss_config(tmp_path, toy):
    loss = kdfast.KDLoss(temperature=2.0, alpha=0.8, kind="jsd", beta=0.3, label_smoothing=0.1,
                         scale_by_t2=False)
    _distil_one_epoch(tmp_path, toy, loss)
    expected = {"type": "KDLoss", **loss.config()}
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["loss"] == expected
    _, payload = load_checkpoint(tmp_path)
    assert payload["run_config"]["loss"] == expected
    assert kdfast.KDLoss(**{k: v for k, v in expected.items() if k != "type"}).config() == loss.config()


@pytest.mark.parametrize("change,keys", [
    ({"label_smoothing": 0.2}, "loss.label_smoothing"),
    ({"beta": 0.7}, "loss.beta"),
    ({"scale_by_t2": True}, "loss.scale_by_t2"),
    ({"ignore_index": -1}, "loss.ignore_index"),
    ({"reduction": "sum"}, "loss.reduction"),
    ({"inplace": True}, "loss.inplace"),
    ({"temperature": 3.0, "alpha": 0.5}, "loss.alpha, loss.temperature"),
])
def test_resume_refuses_another_loss_config_naming_the_keys(tmp_path, toy, change, keys):
    base = dict(temperature=2.0, alpha=0.8, kind="jsd", beta=0.3, label_smoothing=0.1, scale_by_t2=False)
    _distil_one_epoch(tmp_path, toy, kdfast.KDLoss(**base))
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=rf"another configuration \(differs in: {keys}\); use another "
                       "out_dir, or resume=False"):
        _distil_one_epoch(tmp_path, toy, kdfast.KDLoss(**{**base, **change}))
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # refused before touching anything
    # The same loss resumes (a finished run: nothing to train); resume=False starts over.
    assert len(_distil_one_epoch(tmp_path, toy, kdfast.KDLoss(**base)).history) == 1
    _distil_one_epoch(tmp_path, toy, kdfast.KDLoss(**{**base, **change}), resume=False)


def test_checkpoint_from_before_the_whole_loss_config_still_resumes(tmp_path, toy):
    """Older checkpoints recorded only temperature, alpha and kind: the other arguments count as
    their defaults, so the same loss resumes and a non-default one is refused."""
    loss = kdfast.KDLoss(temperature=2.0, alpha=0.8)
    _distil_one_epoch(tmp_path, toy, loss)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    payload["run_config"]["loss"] = {"temperature": 2.0, "alpha": 0.8, "kind": "kl"}
    save_checkpoint(tmp_path / "checkpoint.pt", payload)
    assert len(_distil_one_epoch(tmp_path, toy, loss).history) == 1
    with pytest.raises(ValueError, match=r"differs in: loss\.label_smoothing\)"):
        _distil_one_epoch(tmp_path, toy, kdfast.KDLoss(temperature=2.0, alpha=0.8, label_smoothing=0.1))


def test_resume_names_nested_and_top_level_differences(tmp_path, toy):
    fit(student_for(), toy, config=TrainConfig(epochs=1, batch_size=64), out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"differs in: name, train\.batch_size, train\.lr\)"):
        fit(student_for(), toy, config=TrainConfig(epochs=1, batch_size=32, lr=0.2), out_dir=tmp_path,
            name="other", progress=False)
    with pytest.raises(ValueError, match=r"differs in: loss, teacher\)"):  # hard labels -> distilled
        _distil_one_epoch(tmp_path, toy, kdfast.KDLoss())


def test_seed_makes_runs_reproducible(toy):
    cfg = TrainConfig(epochs=2, batch_size=32, seed=4)
    a, b = student_for(), student_for()
    fit(a, toy, config=cfg, progress=False, augment=lambda x, g: x + 0.1 * torch.randn(x.shape, generator=g))
    fit(b, toy, config=cfg, progress=False, augment=lambda x, g: x + 0.1 * torch.randn(x.shape, generator=g))
    assert _same_weights(a, b)


def test_on_epoch_sees_each_epoch_and_its_additions_are_logged(tmp_path, toy):
    seen = []
    student = student_for()

    def on_epoch(model, record):
        assert model is student
        seen.append((record["epoch"], "test_errors" in record))
        record["val_errors"] = evaluate(model, toy)["errors"]

    cfg = TrainConfig(epochs=3, batch_size=64, seed=0, eval_every=2)
    result = fit(student, toy, config=cfg, eval_data=toy, out_dir=tmp_path, progress=False,
                 on_epoch=on_epoch)
    assert seen == [(1, False), (2, True), (3, True)]  # after the evaluation of epochs 2 and 3
    logged = json.loads((tmp_path / "metrics.json").read_text())["epochs"]
    assert [r["val_errors"] for r in logged] == [r["val_errors"] for r in result.history]


def test_checkpoint_and_metrics_log(tmp_path, toy):
    spec = {"arch": "mlp", "sizes": [D, 16, C], "dropout": 0.0, "input_dropout": 0.0}
    student = student_for()
    fit(student, toy, config=TrainConfig(epochs=2, batch_size=64), eval_data=toy, out_dir=tmp_path,
        model_spec=spec, name="s", progress=False)
    log = json.loads((tmp_path / "metrics.json").read_text())
    assert log["config"]["name"] == "s" and log["config"]["train"]["batch_size"] == 64
    assert [e["epoch"] for e in log["epochs"]] == [1, 2]
    for key in ("train_loss", "lr", "seconds", "rows_per_s", "test_errors", "test_n", "test_error_rate"):
        assert key in log["epochs"][-1]
    model, payload = load_checkpoint(tmp_path)
    assert payload["epoch"] == 2 and _same_weights(model, student)
    assert evaluate(model, toy)["errors"] == log["epochs"][-1]["test_errors"]


def test_argument_errors(tmp_path, toy):
    teacher = teacher_for()
    build_cache(teacher, toy, tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="augment cannot be combined with a cached teacher"):
        fit(student_for(), toy, teacher=tmp_path / "cache", augment=jitter, progress=False)
    with pytest.raises(CacheMismatchError, match="dataset"):
        other = TensorDataset(toy.tensors[0] + 1, toy.tensors[1])
        fit(student_for(), other, teacher=tmp_path / "cache", progress=False)
    wide = mlp([D, 16, C + 1])
    with pytest.raises(CacheMismatchError, match=f"C={C} classes, the student outputs C={C + 1}"):
        fit(wide, toy, teacher=tmp_path / "cache", progress=False)
    with pytest.raises(TypeError, match="KDLoss"):
        fit(student_for(), toy, teacher=teacher, loss=nn.CrossEntropyLoss(), progress=False)
    with pytest.raises(ValueError, match="needs a teacher"):
        fit(student_for(), toy, loss=kdfast.KDLoss(), progress=False)
    with pytest.raises(ValueError, match="needs labels"):
        fit(student_for(), TensorDataset(toy.tensors[0]), progress=False)
    for kwargs, match in (({"epochs": 0}, "epochs must be a positive int"),
                          ({"lr": -1.0}, "lr must be"),
                          ({"optimizer": "lbfgs"}, "optimizer must be"),
                          ({"max_batches": 0}, "max_batches"),
                          ({"epochs": 2, "warmup_epochs": 3}, "warmup_epochs must be in"),
                          ({"clip_grad_norm": 0.0}, "clip_grad_norm must be"),
                          ({"max_norm": 0.0}, "max_norm must be None or > 0"),
                          ({"max_norm": float("inf")}, "max_norm must be None or > 0")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kwargs)


def test_warmup_then_cosine_schedule(toy):
    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.2, warmup_epochs=2, schedule="constant")
    lrs = [h["lr"] for h in fit(student_for(), toy, config=cfg, progress=False).history]
    assert lrs == pytest.approx([0.2 * 5 / 8, 0.2, 0.2, 0.2])  # 4 steps per epoch, 8 to warm up
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.2)
    lrs = [h["lr"] for h in fit(student_for(), toy, config=cfg, progress=False).history]
    assert lrs == pytest.approx([0.1, 0.0], abs=1e-12)  # cosine: half-way, then 0


def test_clip_grad_norm_bounds_each_step(toy):
    """With a tiny clip norm and plain SGD, no step moves the weights by more than lr * norm."""
    before = student_for()
    after = student_for()
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1.0, momentum=0.0, clip_grad_norm=1e-3,
                      schedule="constant", max_batches=1)
    fit(after, toy, teacher=teacher_for(), loss=kdfast.KDLoss(temperature=20.0, alpha=0.9), config=cfg,
        progress=False)
    moved = torch.cat([(a - b).flatten() for a, b in zip(after.parameters(), before.parameters(),
                                                          strict=True)])
    assert 0 < moved.norm() <= 1e-3 * (1 + 1e-5)


def test_max_norm_bounds_every_units_incoming_weights(toy):
    """After a step with a huge learning rate every Linear weight row lies within the max-norm
    ball; rows already inside it are left exactly as the optimizer wrote them, and biases are
    never touched."""
    cfg = dict(epochs=1, batch_size=64, lr=5.0, momentum=0.0, schedule="constant", max_batches=2)
    free, bounded = student_for(), student_for()
    fit(free, toy, config=TrainConfig(**cfg), progress=False)
    fit(bounded, toy, config=TrainConfig(**cfg, max_norm=0.5), progress=False)
    linears = [m for m in bounded.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.norm(dim=1).max() <= 0.5 * (1 + 1e-6) for m in linears)
    assert any((m.weight.norm(dim=1) > 0.5).any() for m in free.modules() if isinstance(m, nn.Linear))
    one = student_for()
    layers = [m for m in one.modules() if isinstance(m, nn.Linear)]
    for m in layers:
        m.weight.data[0] *= 100.0  # one row far outside the ball
    before = [(m.weight.clone(), m.bias.clone()) for m in layers]
    bound = 1.01 * float(max(w[1:].norm(dim=1).max() for w, _ in before))
    _apply_max_norm(one, bound)
    for (w0, b0), m in zip(before, layers, strict=True):
        assert torch.equal(m.weight[1:], w0[1:]) and torch.equal(m.bias, b0)
        assert float(m.weight[0].norm()) == pytest.approx(bound, rel=1e-5)


def test_jitter_shifts_by_at_most_two_pixels():
    img = torch.zeros(64, 28, 28)
    img[:, 14, 14] = 1.0
    out = jitter(img.reshape(64, 784), torch.Generator().manual_seed(0)).reshape(64, 28, 28)
    assert out.shape == (64, 28, 28) and torch.all(out.sum((1, 2)) == 1)
    rows, cols = out.nonzero()[:, 1], out.nonzero()[:, 2]
    assert (rows - 14).abs().max() == 2 and (cols - 14).abs().max() == 2
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 10  # independent per image
    assert torch.equal(jitter(img, max_shift=0), img)
    corner = torch.zeros(1, 28, 28)
    corner[0, 0, 0] = 1.0
    assert jitter(corner.expand(50, 28, 28).clone(), torch.Generator().manual_seed(1)).sum() < 50  # zero fill


# --------------------------------------------------------------------------- sklearn digits
@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """A 64-256-256-10 teacher trained on all 1,204 labelled training digits, and a float16
    cache of its logits on those inputs (the transfer set)."""
    pytest.importorskip("sklearn")
    from kdfast.data import load_digits_split

    train, test = load_digits_split()
    torch.manual_seed(0)
    teacher = mlp([64, 256, 256, 10], dropout=0.2)
    fit(teacher, train, config=TrainConfig(epochs=30, batch_size=64, lr=0.05, seed=0), progress=False)
    path = tmp_path_factory.mktemp("digits-cache")
    transfer = TensorDataset(train.tensors[0])  # inputs only: labels are not needed to distil
    build_cache(teacher, transfer, path, dtype="float16", batch_size=512, progress=False)
    return train, test, transfer, teacher, path


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distilled_student_beats_hard_label_student_on_digits(digits_teacher, seed):
    """The paper's claim in miniature: a small 64-32-10 student with only 60 labelled digits
    vs the same student trained from the teacher's cached soft targets on the 1,204-image
    transfer set (no labels). Same architecture, same seed, same optimizer."""
    train, test, transfer, teacher, cache = digits_teacher
    teacher_errors = evaluate(teacher, test)["errors"]
    x, y = train.tensors
    labelled = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:60]
    torch.manual_seed(seed)
    hard = mlp([64, 32, 10])
    fit(hard, TensorDataset(x[labelled], y[labelled]),
        config=TrainConfig(epochs=60, batch_size=32, lr=0.05, seed=seed), progress=False)
    torch.manual_seed(seed)
    distilled = mlp([64, 32, 10])
    fit(distilled, transfer, teacher=cache, loss=kdfast.KDLoss(temperature=4.0),
        config=TrainConfig(epochs=30, batch_size=64, lr=0.05, seed=seed), progress=False)
    hard_errors, kd_errors = evaluate(hard, test)["errors"], evaluate(distilled, test)["errors"]
    assert teacher_errors < 40  # of 593
    assert kd_errors < 0.6 * hard_errors, (teacher_errors, hard_errors, kd_errors)
