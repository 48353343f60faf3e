"""A plain-PyTorch trainer for students, from a soft-target cache or a live teacher.

:func:`fit` is one loop for every case: hard labels (no teacher), a live teacher (run on
each batch) or a :class:`~kdfast.cache.SoftTargetCache` (rows looked up by index). Only the
source of the teacher rows differs (:class:`LiveTeacher` / :class:`CachedTeacher`); the loss
is always :class:`kdfast.KDLoss`. Each epoch's seed is derived from ``(seed, epoch)``, so a
run resumed from its checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset, default_collate
from tqdm.auto import tqdm

from kdfast import distributed
from kdfast._io import atomic_write_bytes, atomic_write_json
from kdfast._sparse_checks import SparseTargets
from kdfast.cache.ensemble import check_ensemble, combine_members, teacher_logits
from kdfast.cache.format import CacheMismatchError
from kdfast.cache.reader import SoftTargetCache
from kdfast.module import KDLoss
from kdfast.sparse import SparseKDLoss

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"


# ------------------------------------------------------------------------------ teachers
class LiveTeacher:
    """Teacher rows computed on the fly: ``teacher(x)`` in eval mode under ``no_grad``
    (an ensemble is combined as in :func:`kdfast.cache.build_cache`)."""

    def __init__(self, teacher: nn.Module | Sequence[nn.Module], ensemble: str | None = None,
                 temperature: float | None = None) -> None:
        self.teachers = [teacher] if isinstance(teacher, nn.Module) else list(teacher)
        self.mode = ensemble or ("none" if len(self.teachers) == 1 else "mean_logits")
        if self.mode == "members":
            raise ValueError("ensemble='members' is a storage mode; a live ensemble needs "
                             "'mean_logits' or 'mean_probs'")
        check_ensemble(self.mode, len(self.teachers), temperature)
        self.temperature = temperature

    def prepare(self, dataset: Dataset, loss: KDLoss) -> None:
        """Called once by :func:`fit` before training; puts the teacher(s) in eval mode."""
        for t in self.teachers:
            t.eval()
        if self.mode == "mean_probs" and not math.isclose(self.temperature, loss.temperature):
            raise ValueError(f"mean_probs ensemble built for T={self.temperature}, loss has "
                             f"temperature={loss.temperature}")

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return teacher_logits(self.teachers, x, self.mode, self.temperature)

    def describe(self) -> str:
        return f"live teacher ({self.mode}, {len(self.teachers)} member(s))"


class CachedTeacher:
    """Teacher rows read from a soft-target cache by row index.

    For a cache stored per member (``ensemble="members"``) pass ``combine="mean_logits"`` or
    ``"mean_probs"``; the latter averages probabilities at the loss's temperature.

    A sparse (item-level) cache serves :class:`kdfast.SparseTargets` to a
    :class:`kdfast.SparseKDLoss`: top-k rows at the loss's temperatures (``tail="bucket"``
    needs its teacher temperature among the declared ones); sampled rows only at
    ``temperature = T_s`` and with ``teacher_temperature=1.0`` (they are log-probabilities).

    ``rows``: train on a subset of the cached dataset (a transfer set with some classes left
    out, a few-data sample): row i of the training set is cache row ``rows[i]``. The training
    set is then not the cached dataset, so its fingerprint is not checked: check the cache
    against the full dataset first (``open_cache(path, dataset=full)``).
    """

    def __init__(self, cache: SoftTargetCache | str | Path, combine: str | None = None,
                 check_dataset: bool = True, rows: torch.Tensor | Sequence[int] | None = None) -> None:
        self.cache = cache if isinstance(cache, SoftTargetCache) else SoftTargetCache(cache)
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long).flatten()
        if self.rows is not None and len(self.rows) and not (
                0 <= int(self.rows.min()) and int(self.rows.max()) < len(self.cache)):
            raise ValueError(f"rows must be cache row indices in [0, {len(self.cache)}), got "
                             f"[{int(self.rows.min())}, {int(self.rows.max())}]")
        members = self.cache.ensemble["mode"] == "members"
        if members and combine not in ("mean_logits", "mean_probs"):
            raise ValueError(f"cache {self.cache.path} stores each ensemble member: pass "
                             f"combine='mean_logits' or 'mean_probs', got {combine!r}")
        if not members and combine is not None:
            raise ValueError("combine only applies to caches built with ensemble='members'")
        if self.cache.token_level:
            raise ValueError(f"cache {self.cache.path} is token-level: fit trains classification "
                             "students; read it with cache.sparse_targets(seq_ids, T) in your own loop")
        self.combine = combine
        self.check_dataset = check_dataset and self.rows is None
        self.temperature: float | None = None
        self.loss: SparseKDLoss | None = None

    @property
    def sparse(self) -> bool:
        return self.cache.sparse_spec is not None

    def default_loss(self) -> KDLoss | SparseKDLoss:
        """``KDLoss()`` for a dense cache; for a sparse one the ``SparseKDLoss`` it serves
        (at T_s with ``teacher_temperature=1.0`` for the sampled kinds)."""
        if not self.sparse:
            return KDLoss()
        spec = self.cache.sparse_spec
        temperature = 1.0 if spec.kind == "topk" else spec.temperatures[0]
        return SparseKDLoss(temperature=temperature, teacher_temperature=self.cache.teacher_temperature)

    def prepare(self, dataset: Dataset, loss: KDLoss | SparseKDLoss) -> None:
        """Checks the cache against the training set and the loss (its type and temperatures)."""
        if self.sparse != isinstance(loss, SparseKDLoss):
            want = "SparseKDLoss" if self.sparse else "KDLoss"
            raise TypeError(f"cache {self.cache.path} stores {self.cache.targets} targets: train with a "
                            f"kdfast.{want}, got {type(loss).__name__}")
        self.cache.check_compatible(dataset=dataset if self.check_dataset else None,
                                    temperature=None if self.sparse else loss.temperature)
        expected = len(self.cache) if self.rows is None else len(self.rows)
        if len(dataset) != expected:
            what = "cache has" if self.rows is None else "rows select"
            raise CacheMismatchError(f"{what} {expected} rows, the dataset {len(dataset)}")
        self.temperature = loss.temperature
        if self.sparse:
            want = self.cache.teacher_temperature
            if want is not None and loss.teacher_temperature != want:
                raise ValueError(
                    f"cache {self.cache.path} serves {self.cache.targets} targets as log-probabilities: "
                    f"the loss needs teacher_temperature={want}, got {loss.teacher_temperature}")
            self.cache.sparse_targets([], loss.temperature, loss.tail,
                                      teacher_temperature=loss.teacher_temperature)  # refuses early
            self.loss = loss

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | SparseTargets:
        idx = idx if self.rows is None else self.rows[idx]
        if self.sparse:
            served = self.cache.sparse_targets(idx, self.loss.temperature, self.loss.tail,
                                               teacher_temperature=self.loss.teacher_temperature)
            return SparseTargets(*(None if t is None else t.to(x.device) for t in served))
        rows = self.cache[idx]
        if self.combine is not None:
            rows = combine_members(rows, self.combine, self.temperature)
        return rows.to(x.device)

    def describe(self) -> str:
        targets = "" if not self.sparse else f"{self.cache.targets}, "
        text = (f"cache {self.cache.path} ({targets}{self.cache.manifest['dtype']}, "
                f"{self.cache.ensemble['mode']})")
        if self.rows is not None:  # part of the run config: a resume with other rows is refused
            digest = hashlib.sha256(self.rows.numpy().tobytes()).hexdigest()[:16]
            text += f", {len(self.rows)} rows sha256:{digest}"
        return text


TeacherLike = nn.Module | Sequence[nn.Module] | SoftTargetCache | str | Path | LiveTeacher | CachedTeacher


def as_teacher_source(teacher: TeacherLike) -> LiveTeacher | CachedTeacher:
    """A module/ensemble becomes a :class:`LiveTeacher`; a cache or its path a
    :class:`CachedTeacher`; sources pass through."""
    if isinstance(teacher, (LiveTeacher, CachedTeacher)):
        return teacher
    if isinstance(teacher, (SoftTargetCache, str, Path)):
        return CachedTeacher(teacher)
    return LiveTeacher(teacher)


# ---------------------------------------------------------------------------------- data
class _Batches(Dataset):
    """Map-style view whose items are whole batches: ``__getitem__(index_tensor)`` returns
    ``(*fields, index_tensor)``. A TensorDataset is sliced with one gather per tensor instead
    of per-item indexing plus collation."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: torch.Tensor):
        if isinstance(self.dataset, TensorDataset):
            parts = tuple(t[idx] for t in self.dataset.tensors)
        else:
            items = [self.dataset[i] for i in idx.tolist()]
            batch = default_collate(items)
            parts = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        return (*parts, idx)


def _loader(dataset: Dataset, order: torch.Tensor, batch_size: int, num_workers: int) -> DataLoader:
    # batch_size=None + a sampler of index tensors: each "item" fetched is a whole batch.
    return DataLoader(_Batches(dataset), sampler=list(order.split(batch_size)), batch_size=None,
                      num_workers=num_workers)


def _split(batch, device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    x, *rest, idx = batch
    y = rest[0].to(device) if rest else None
    return x.to(device), y, idx


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 1000) -> dict:
    """Test errors of ``model`` on a labelled dataset: ``{"errors", "n", "error_rate",
    "loss"}`` (loss = mean cross-entropy). Runs in eval mode and restores the mode after."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    errors, total_loss, n = 0, 0.0, 0
    try:
        for batch in _loader(dataset, torch.arange(len(dataset)), batch_size, 0):
            x, y, _ = _split(batch, device)
            if y is None:
                raise ValueError("evaluate needs a labelled dataset: items (input, label)")
            logits = model(x)
            errors += int((logits.argmax(-1) != y).sum())
            total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
    finally:
        model.train(was_training)
    return {"errors": errors, "n": n, "error_rate": errors / max(n, 1), "loss": total_loss / max(n, 1)}


# ------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`fit` (JSON-able: stored in checkpoints and logs).

    ``optimizer``: "sgd" (momentum, Nesterov) or "adam"; ``schedule``: "cosine" (to 0 over
    the run, per step) or "constant"; ``warmup_epochs``: linear warm-up of the learning rate
    from 0 over this many epochs (fractions allowed; it keeps the first steps of a high-T
    soft term, whose gradients grow with the teacher's logits, from wrecking the student);
    ``clip_grad_norm``: rescale the gradient to at most this global L2 norm (None: off; with
    T**2 scaling the soft term's early gradients grow like T times the teacher's logits, so
    high-T distillation from a confident teacher needs it); ``max_norm``: after every step,
    scale each unit's incoming weight vector (each row of every ``nn.Linear`` weight) back to
    at most this L2 norm (None: off), the max-norm constraint that Hinton et al. (2012) pair
    with dropout: it bounds the weights however large the learning rate; ``max_batches``: cap on batches
    per epoch (timing runs, smoke tests); ``eval_every``: evaluate every k epochs (and after
    the last).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    clip_grad_norm: float | None = None
    max_norm: float | None = None
    seed: int = 0
    max_batches: int | None = None
    eval_every: int = 1
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_batches is not None and (not isinstance(self.max_batches, int) or self.max_batches < 1):
            raise ValueError(f"max_batches must be None or a positive int, got {self.max_batches!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite float, got {self.lr!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not (math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs):
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}], "
                             f"got {self.warmup_epochs!r}")
        if self.clip_grad_norm is not None and not (math.isfinite(self.clip_grad_norm)
                                                    and self.clip_grad_norm > 0):
            raise ValueError(f"clip_grad_norm must be None or > 0, got {self.clip_grad_norm!r}")
        if self.max_norm is not None and not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ValueError(f"max_norm must be None or > 0, got {self.max_norm!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")


@dataclass
class TrainResult:
    """``history``: one dict per epoch (train_loss, lr, seconds, rows_per_s and, when
    evaluated, test_errors / test_n / test_error_rate); ``seconds``: wall time of this call."""

    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Atomically writes a checkpoint (``torch.save`` of tensors and plain data; load it
    with :func:`load_checkpoint`, which uses ``weights_only=True``)."""
    atomic_write_bytes(Path(path), lambda f: torch.save(payload, f))


def load_checkpoint(path: str | Path) -> tuple[nn.Module | None, dict]:
    """Loads a checkpoint written by :func:`fit`; returns ``(model, payload)`` where model is
    rebuilt from the stored spec (None when fit had no ``model_spec``)."""
    from kdfast.models import build_model

    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != "kdfast-checkpoint":
        raise ValueError(f"{path} is not a kdfast checkpoint")
    model = None
    if payload.get("model_spec"):
        model = build_model(payload["model_spec"])
        model.load_state_dict(payload["state_dict"])
    return model, payload


def fit(
    student: nn.Module,
    train_data: Dataset,
    *,
    teacher: TeacherLike | None = None,
    loss: KDLoss | None = None,
    config: TrainConfig | None = None,
    eval_data: Dataset | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = True,
    model_spec: dict | None = None,
    name: str = "student",
    progress: bool = True,
    on_epoch: Callable[[nn.Module, dict], None] | None = None,
) -> TrainResult:
    """Trains ``student`` on ``train_data``; returns the per-epoch history.

    Args:
        student: the model to train (in place), on the device of its parameters.
        train_data: map-style dataset of ``(input, label)`` or just ``input`` (an unlabelled
            transfer set: then the loss is the soft term alone). Row i must be row i of the
            cache when ``teacher`` is a cache.
        teacher: None (hard labels: cross-entropy), an ``nn.Module`` / ensemble (live), a
            :class:`SoftTargetCache` or cache path (rows looked up by index), or a
            :class:`LiveTeacher` / :class:`CachedTeacher`.
        loss: the :class:`kdfast.KDLoss` used with a teacher (default ``KDLoss()``), or a
            :class:`kdfast.SparseKDLoss` with a sparse cache (default: the one
            :meth:`CachedTeacher.default_loss` gives).
        config: :class:`TrainConfig` (epochs, batch size, optimizer, schedule, seed, ...).
        eval_data: labelled dataset evaluated every ``config.eval_every`` epochs.
        augment: ``augment(x, generator) -> x`` applied to training inputs (e.g. jitter).
            Not allowed with a cache, whose rows belong to the un-augmented inputs.
        out_dir: where ``checkpoint.pt`` (each epoch, atomic) and ``metrics.json`` go.
        resume: continue from ``out_dir/checkpoint.pt`` if present. The run configuration
            must be the same: train config, teacher, the loss's whole ``loss.config()`` (its
            temperature, alpha, label smoothing, beta, T**2 scaling, ...), model spec; a
            difference is refused with an error naming the differing keys.
        model_spec: JSON-able spec stored in the checkpoint so :func:`load_checkpoint` can
            rebuild the model (see :func:`kdfast.models.build_model`).
        name: label for the progress bar and the log.
        progress: show progress bars (epochs; rows/s and loss within an epoch).
        on_epoch: ``on_epoch(student, record)`` after each epoch's evaluation, on the main
            rank: e.g. evaluate a validation split into ``record`` (logged and checkpointed
            after the call) and keep the best weights for early stopping. Not called again
            for the epochs a resumed run skips.

    Inside an initialized ``torch.distributed`` process group of K > 1 ranks (e.g. under
    ``torchrun``; the CLI initializes it) the student is wrapped in DistributedDataParallel
    and each rank trains on its ``DistributedSampler`` share of every epoch with
    ``config.batch_size`` rows per step (K times that per optimizer step overall). Loss and
    rows are summed over the ranks; rank 0 evaluates, logs and writes the checkpoint, every
    rank resumes from it, and the checkpoint records K (resuming with another K is refused).
    """
    cfg = config or TrainConfig()
    source, loss = _teacher_and_loss(teacher, loss, augment, train_data)
    world = distributed.world_size()
    run_config = _run_config(name, cfg, source, loss, augment, model_spec, len(train_data), world)
    steps_per_epoch = _steps_per_epoch(len(train_data), world, cfg)
    optimizer = _make_optimizer(student, cfg)
    scheduler = _make_scheduler(optimizer, cfg, steps_per_epoch)
    result = TrainResult()
    start_epoch = 0
    ckpt_path = Path(out_dir) / CHECKPOINT if out_dir is not None else None
    if ckpt_path is not None:
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        if resume and ckpt_path.exists():
            result.history, start_epoch = _resume(ckpt_path, run_config, student, optimizer, scheduler)

    began = time.perf_counter()
    main = distributed.is_main()
    progress = progress and main
    device = next(student.parameters()).device
    with _data_parallel(student, world, device) as model:
        epochs_bar = tqdm(range(start_epoch, cfg.epochs), desc=name, unit="epoch", disable=not progress,
                          initial=start_epoch, total=cfg.epochs, dynamic_ncols=True)
        for epoch in epochs_bar:
            record = _train_epoch(model, train_data, source, loss, cfg, optimizer, scheduler,
                                  augment, epoch, steps_per_epoch, device, progress)
            if main:  # rank 0 evaluates and writes the checkpoint; the others wait at the barrier
                _evaluate_epoch(record, student, eval_data, cfg, epochs_bar)
                if on_epoch is not None:
                    on_epoch(student, record)
            result.history.append(record)
            if main and ckpt_path is not None:
                _save_run(ckpt_path, epoch + 1, run_config, student, optimizer, scheduler, result.history)
            distributed.barrier()
        epochs_bar.close()
    result.seconds = time.perf_counter() - began
    return result


# ----------------------------------------------------------------------- steps of fit
def _teacher_and_loss(teacher: TeacherLike | None, loss: KDLoss | None, augment, train_data: Dataset
                      ) -> tuple[LiveTeacher | CachedTeacher | None, KDLoss | None]:
    """Checks fit's teacher/loss/augment arguments; returns the prepared teacher source
    (None: hard labels) and the loss (``KDLoss()`` by default with a teacher)."""
    if teacher is None:
        if loss is not None:
            raise ValueError("loss is the distillation loss and needs a teacher; without one, fit "
                             "trains on hard labels with cross-entropy")
        return None, None
    source = as_teacher_source(teacher)
    loss = loss or (source.default_loss() if isinstance(source, CachedTeacher) else KDLoss())
    if not isinstance(loss, (KDLoss, SparseKDLoss)):
        raise TypeError(f"loss must be a kdfast.KDLoss (or a SparseKDLoss with a sparse cache), got "
                        f"{type(loss).__name__}")
    if isinstance(loss, SparseKDLoss) and not isinstance(source, CachedTeacher):
        raise TypeError("a SparseKDLoss needs a sparse cache as the teacher; a live teacher gives "
                        "dense logits (use kdfast.KDLoss)")
    if augment is not None and isinstance(source, CachedTeacher):
        raise ValueError("augment cannot be combined with a cached teacher: the cached rows "
                         "are the teacher's outputs on the un-augmented inputs")
    source.prepare(train_data, loss)
    return source, loss


def _loss_config(loss: KDLoss) -> dict:
    """What the run config records of a loss: its type and its whole ``config()``."""
    return {"type": type(loss).__name__, **loss.config()}


def _run_config(name: str, cfg: TrainConfig, source, loss: KDLoss | None, augment, model_spec: dict | None,
                train_rows: int, world: int) -> dict:
    """Everything that makes two runs the same run: stored in the checkpoint and the log, and
    compared on resume."""
    run_config = {
        "name": name, "train": asdict(cfg),
        "loss": None if source is None else _loss_config(loss),
        "teacher": None if source is None else source.describe(),
        "augment": None if augment is None else getattr(augment, "__name__", repr(augment)),
        "model_spec": model_spec, "train_rows": train_rows,
    }
    if world > 1:
        # Another process count deals other rows to each rank: a checkpoint is tied to it.
        run_config["world_size"] = world
    return run_config


def _steps_per_epoch(train_rows: int, world: int, cfg: TrainConfig) -> int:
    # Under torch.distributed each rank trains on its DistributedSampler share (drop_last,
    # so every rank runs the same number of steps) with batch_size rows per step; DDP
    # averages the gradients, so one step sees world * batch_size rows.
    rows_per_rank = train_rows // world
    steps = math.ceil(rows_per_rank / cfg.batch_size)
    return min(steps, cfg.max_batches) if cfg.max_batches else steps


def _make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: linear warm-up, then cosine decay to 0 (or constant)."""
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        if cfg.schedule == "constant":
            return warm
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _with_new_defaults(saved: dict) -> dict:
    """A saved run config with the options added since it was written at their defaults
    (which keep the old behaviour), so old runs still resume: TrainConfig fields, and loss
    arguments recorded only since the loss's whole ``config()`` is stored."""
    saved = dict(saved)
    if isinstance(saved.get("train"), dict):
        saved["train"] = {**asdict(TrainConfig()), **saved["train"]}
    if isinstance(saved.get("loss"), dict):
        saved["loss"] = {**_loss_config(KDLoss()), **saved["loss"]}
    return saved


def _config_differences(saved: dict, current: dict) -> list[str]:
    """The keys whose values differ, one level deep: ``["loss.beta", "train.batch_size"]``."""
    differences = []
    for key in sorted(saved.keys() | current.keys()):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            differences += [f"{key}.{k}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
        else:
            differences.append(key)
    return differences


def _resume(ckpt_path: Path, run_config: dict, student: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler) -> tuple[list[dict], int]:
    """Loads the checkpoint's weights and optimizer/scheduler states into the run; returns
    ``(history, epochs done)``. Refuses a checkpoint written with another run config."""
    payload = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    differences = _config_differences(_with_new_defaults(payload.get("run_config") or {}), run_config)
    if differences:
        raise ValueError(f"{ckpt_path} was written by a run with another configuration "
                         f"(differs in: {', '.join(differences)}); use another out_dir, or "
                         "resume=False to start over")
    student.load_state_dict(payload["state_dict"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    return list(payload["history"]), payload["epoch"]


@contextlib.contextmanager
def _data_parallel(student: nn.Module, world: int, device: torch.device) -> Iterator[nn.Module]:
    """Yields the model to train: the student itself, or with K > 1 ranks the student
    wrapped in DistributedDataParallel, unwrapped again on exit."""
    if world == 1:
        yield student
        return
    model = nn.parallel.DistributedDataParallel(student, device_ids=[device] if device.type == "cuda"
                                                else None)
    try:
        yield model
    finally:
        # DDP's gradient hooks live on the student's parameters and keep its reducer (and the
        # process group) referenced for as long as the caller keeps the student: detach them,
        # or the reducer is torn down at interpreter exit, after the process group, which can
        # abort the process.
        remove_hooks = getattr(model, "_remove_autograd_hooks", None)
        if remove_hooks is not None:
            remove_hooks()
        del model
        gc.collect()  # the wrapper sits in reference cycles: free its reducer now


def _evaluate_epoch(record: dict, student: nn.Module, eval_data: Dataset | None, cfg: TrainConfig,
                    epochs_bar) -> None:
    """Adds the test metrics to the epoch's record every ``eval_every`` epochs and after the
    last; shows the loss (and test errors) on the progress bar."""
    epoch = record["epoch"]
    if eval_data is None or (epoch % cfg.eval_every != 0 and epoch != cfg.epochs):
        epochs_bar.set_postfix(loss=f"{record['train_loss']:.4f}")
        return
    ev = evaluate(student, eval_data)
    record.update(test_errors=ev["errors"], test_n=ev["n"], test_error_rate=ev["error_rate"],
                  test_loss=ev["loss"])
    epochs_bar.set_postfix(loss=f"{record['train_loss']:.4f}", test_err=ev["errors"])


def _save_run(ckpt_path: Path, epochs_done: int, run_config: dict, student: nn.Module,
              optimizer: torch.optim.Optimizer, scheduler, history: list[dict]) -> None:
    """Writes the checkpoint and the metrics log next to it (each atomically)."""
    save_checkpoint(ckpt_path, {
        "format": "kdfast-checkpoint", "version": 1, "epoch": epochs_done,
        "run_config": run_config, "model_spec": run_config["model_spec"],
        "state_dict": student.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "history": history,
    })
    atomic_write_json(ckpt_path.parent / METRICS, {"config": run_config, "epochs": history})


def _train_epoch(student, data, source, loss, cfg, optimizer, scheduler, augment, epoch,
                 steps, device, progress) -> dict:
    """Trains one epoch of ``steps`` optimizer steps; returns its record (epoch, mean train
    loss over every rank's rows, lr, seconds, rows/s)."""
    seed = _epoch_seed(cfg.seed, epoch)
    torch.manual_seed(seed)  # dropout
    order = _epoch_order(data, cfg, epoch, seed)[: steps * cfg.batch_size]
    aug_gen = torch.Generator().manual_seed(seed + 1)
    student.train()
    total, rows, t0 = 0.0, 0, time.perf_counter()
    bar = tqdm(total=len(order), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="row", unit_scale=True,
               leave=False, disable=not progress, dynamic_ncols=True)
    for step, batch in enumerate(_loader(data, order, cfg.batch_size, cfg.num_workers)):
        x, y, idx = _split(batch, device)
        if augment is not None:
            x = augment(x, aug_gen)
        value = _batch_loss(student, x, y, idx, source, loss)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        if cfg.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad_norm)
        optimizer.step()
        if cfg.max_norm is not None:
            _apply_max_norm(student, cfg.max_norm)
        scheduler.step()
        total += float(value.detach()) * len(x)
        rows += len(x)
        bar.update(len(x))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{float(value.detach()):.4f}")
    bar.close()
    if distributed.is_distributed():  # every rank's loss and rows, summed (rank 0 logs them)
        sums = torch.tensor([total, float(rows)], dtype=torch.float64)
        torch.distributed.all_reduce(sums)
        total, rows = sums[0].item(), int(sums[1].item())
    seconds = time.perf_counter() - t0
    return {"epoch": epoch + 1, "train_loss": total / max(rows, 1), "lr": optimizer.param_groups[0]["lr"],
            "seconds": seconds, "rows_per_s": rows / seconds if seconds > 0 else 0.0}


@torch.no_grad()
def _apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Scales every ``nn.Linear`` weight row (one unit's incoming weights) whose L2 norm
    exceeds ``max_norm`` back onto that sphere; rows inside it are left bit-identical."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.renorm_(2, 0, max_norm)


def _epoch_order(data: Dataset, cfg: TrainConfig, epoch: int, seed: int) -> torch.Tensor:
    """The row indices of one epoch, shuffled from the epoch's seed (this rank's
    DistributedSampler share under torch.distributed)."""
    if distributed.is_distributed():
        sampler = DistributedSampler(data, shuffle=True, seed=cfg.seed, drop_last=True)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler), dtype=torch.long)
    return torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))


def _batch_loss(student: nn.Module, x: torch.Tensor, y: torch.Tensor | None, idx: torch.Tensor,
                source: LiveTeacher | CachedTeacher | None, loss: KDLoss | None) -> torch.Tensor:
    """The loss of one batch: cross-entropy on the labels without a teacher, else ``loss``
    against the teacher's rows."""
    out = student(x)
    if source is None:
        if y is None:
            raise ValueError("training without a teacher needs labels: items (input, label)")
        return nn.functional.cross_entropy(out, y)
    soft = source(x, idx)
    classes = soft.shape[-1] if isinstance(soft, torch.Tensor) else source.cache.num_classes
    if classes != out.shape[-1]:
        raise CacheMismatchError(f"teacher rows have C={classes} classes, the student "
                                 f"outputs C={out.shape[-1]}")
    return loss(out, soft, y)
