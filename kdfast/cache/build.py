"""`build_cache` / `build_caches`: run the teacher once over a dataset and store its logits
(or sparse targets of them) in checksummed shards, one cache directory per output."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from kdfast import distributed
from kdfast._io import atomic_write_json
from kdfast.cache.ensemble import check_ensemble, teacher_logits
from kdfast.cache.fingerprint import fingerprint_dataset, fingerprint_teachers
from kdfast.cache.format import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    PROGRESS,
    RANK_PROGRESS_GLOB,
    SHARD_PREFIX,
    SPARSE_FORMAT_VERSION,
    BuildLock,
    CacheError,
    CacheMismatchError,
    dtype_name,
    rank_progress_name,
    read_json,
    save_records,
    save_shard,
    sha256_file,
    shard_name,
    shard_ranges,
)
from kdfast.cache.sparse import TARGETS, SparseSpec, encode_rows, make_spec

# Default shard size: the in-memory buffer of one shard stays under this many bytes.
SHARD_BYTES = 256 << 20
# Default shard count to aim for (see build_cache): enough to keep 16 processes busy.
MIN_SHARDS = 16


@dataclass
class BuildResult:
    """What :func:`build_cache` did: ``rows_computed`` rows ran through the teacher in
    ``seconds`` (0 when the cache was already complete), of which ``teacher_seconds`` in the
    teacher's forward (the rest: target extraction, hashing and writing); ``rows_reused`` came
    from the shards of an interrupted build."""

    path: Path
    manifest: dict
    rows_computed: int
    rows_reused: int
    seconds: float
    teacher_seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        """Teacher-to-disk throughput of this call (0.0 if nothing was computed)."""
        return self.rows_computed / self.seconds if self.rows_computed and self.seconds > 0 else 0.0


def _first_input(item):
    return item[0] if isinstance(item, (tuple, list)) else item


def _config_diff(found: dict, wanted: dict) -> list[str]:
    keys = sorted(k for k in wanted if k in found and found[k] != wanted[k])
    return [f"{k}: directory has {found[k]!r}, this build has {wanted[k]!r}" for k in keys]


def _remove_cache_files(out: Path) -> None:
    # Only the files a build writes: never anything else a user keeps in the directory.
    for path in list(out.glob(f"{SHARD_PREFIX}*.npy")) + [out / MANIFEST, out / PROGRESS]:
        path.unlink(missing_ok=True)
    _remove_progress(out)


def _remove_progress(out: Path) -> None:
    for path in [out / PROGRESS, *out.glob(RANK_PROGRESS_GLOB)]:
        path.unlink(missing_ok=True)


def build_cache(
    teacher: nn.Module | Sequence[nn.Module] | Callable,
    dataset: Dataset | torch.Tensor,
    out_dir: str | Path,
    *,
    dtype: str | torch.dtype = "float16",
    batch_size: int = 4096,
    rows_per_shard: int | None = None,
    ensemble: str | None = None,
    temperature: float | None = None,
    targets: str = "dense",
    k: int | None = None,
    samples: int | None = None,
    temperatures: Sequence[float] | None = None,
    seed: int = 0,
    teacher_fingerprint: str | None = None,
    dataset_fingerprint: str | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> BuildResult:
    """Runs ``teacher`` over ``dataset`` once and stores its targets in ``out_dir``.

    The teacher runs in eval mode under ``torch.inference_mode`` at ``batch_size`` rows per
    call. A dense cache (default) stores its raw logits unscaled (temperature is applied at
    training time, so one cache serves every T); a sparse cache stores k or n entries per row
    (see ``targets``). Shards are written atomically and recorded in ``progress.json``;
    calling again after an interruption (same arguments) keeps the finished shards (after
    re-checking their SHA-256) and computes only the rest, giving the same bytes as an
    uninterrupted build. ``manifest.json`` is written last.

    Inside an initialized ``torch.distributed`` process group (e.g. under ``torchrun``) the
    shards are dealt to the ranks round-robin; each rank writes its own shards and records
    them in its own progress file, and rank 0 writes the one manifest. Shards split on batch
    boundaries, so the cache is byte-identical to a single-process build with the same batch
    size and thread count. A second build into the same directory fails (``build.lock``).
    :func:`build_caches` writes several caches (say top-k and sampled) from one teacher pass.

    Token-level caches: when the teacher maps a ``(B, L)`` batch of token ids to ``(B, L, C)``
    logits (a causal LM; an output object with a ``.logits`` attribute works too), the
    dataset's items are 1-D integer sequences of any length and row t of a sequence is the
    teacher's distribution for the token after position t. Sequences are right-padded with
    id 0 within a batch (a causal teacher never looks right); ``batch_size`` and
    ``rows_per_shard`` count sequences, and shards split on sequence boundaries. Token-level
    caches store sparse targets only. Read them with
    :meth:`~kdfast.cache.SoftTargetCache.sparse_targets`.

    Args:
        teacher: an ``nn.Module`` mapping a batch of inputs to ``(B, C)`` logits (or token
            ids to ``(B, L, C)``), a sequence of them (an ensemble), or any callable doing so
            (then pass ``teacher_fingerprint``).
        dataset: map-style dataset whose items are inputs or ``(input, ...)`` tuples (labels
            are ignored), or a tensor of inputs. Row i of the cache is item i.
        out_dir: cache directory (created if missing).
        dtype: stored logit dtype, "float16" (default), "bfloat16" or "float32".
        batch_size: teacher batch size (default 4096).
        rows_per_shard: rows per shard file, a multiple of ``batch_size`` so shards split on
            batch boundaries (a resumed build then runs exactly the same batches). Default:
            about 16 shards (the unit of work of a multi-process build), each under 256 MiB.
        ensemble: for several teachers: "mean_logits" (default; serves every T),
            "mean_probs" (needs ``temperature``; the cache then only serves that T) or
            "members" (stores each member's logits, rows of shape ``(M, C)``). Sparse
            targets take "mean_logits" only (the top-k of the mean logits).
        temperature: the T of ``ensemble="mean_probs"``, or the sampling temperature T_s of
            ``targets="sampled"`` / ``"topk+sampled"`` (default 1.0).
        targets: "dense" (default: all C logits), "topk" (the k largest logits, their ids and
            the tail log-sum-exp at each of ``temperatures``), "sampled" (the distinct ids of
            ``samples`` draws from softmax(z / T_s) and their counts) or "topk+sampled" (the
            top-k head plus ``samples`` draws from the rest). See :mod:`kdfast.cache.sparse`.
        k: ids per row of "topk" / "topk+sampled".
        samples: draws per row of "sampled" / "topk+sampled" (at most 65,535).
        temperatures: the teacher temperatures T_t at which a "topk" cache serves
            ``tail="bucket"`` (default ``(1.0,)``; ``tail="renormalize"`` works at any T).
        seed: seed of the sampled kinds' per-row generator (default 0).
        teacher_fingerprint: identity of the teacher (default :func:`fingerprint_teachers`;
            required for a teacher that is not an ``nn.Module``).
        dataset_fingerprint: identity of the dataset; default :func:`fingerprint_dataset`.
        device: where the teacher runs (default: where its parameters are).
        num_workers: DataLoader workers feeding the teacher.
        progress: show a progress bar.
        overwrite: replace an existing cache (or a partial build) made with other arguments;
            without it such a directory raises :class:`CacheMismatchError`.

    Returns:
        A :class:`BuildResult` (manifest, rows computed and reused, seconds, rows/s).
    """
    target_args = {"targets": targets, "k": k, "samples": samples, "temperature": temperature,
                   "temperatures": temperatures, "seed": seed}
    results = build_caches(teacher, dataset, {out_dir: target_args}, dtype=dtype, batch_size=batch_size,
                           rows_per_shard=rows_per_shard, ensemble=ensemble,
                           teacher_fingerprint=teacher_fingerprint, dataset_fingerprint=dataset_fingerprint,
                           device=device, num_workers=num_workers, progress=progress, overwrite=overwrite)
    return next(iter(results.values()))


# The per-cache arguments of build_caches' ``outputs`` (the rest is one teacher pass's).
OUTPUT_ARGS = ("targets", "k", "samples", "temperature", "temperatures", "seed")


def build_caches(
    teacher: nn.Module | Sequence[nn.Module] | Callable,
    dataset: Dataset | torch.Tensor,
    outputs: Mapping[str | Path, Mapping[str, Any]],
    *,
    dtype: str | torch.dtype = "float16",
    batch_size: int = 4096,
    rows_per_shard: int | None = None,
    ensemble: str | None = None,
    teacher_fingerprint: str | None = None,
    dataset_fingerprint: str | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[Path, BuildResult]:
    """Several caches from **one** teacher pass: ``outputs`` maps each cache directory to its
    target arguments (a dict of :func:`build_cache`'s ``targets``, ``k``, ``samples``,
    ``temperature``, ``temperatures``, ``seed``; missing keys take build_cache's defaults).

    Every directory is a complete cache of its own, byte-identical to what
    :func:`build_cache` writes with the same arguments and the same ``rows_per_shard``; the
    default ``rows_per_shard`` is the smallest of the outputs' defaults, so that all of them
    share one shard layout. Each directory keeps its own progress and lock: an interrupted
    build resumes per directory (a shard finished in every directory is not recomputed), and
    under ``torchrun`` the pass is dealt out as in :func:`build_cache`. The other arguments
    are build_cache's. Returns one :class:`BuildResult` per directory (``seconds`` is the
    whole pass's; ``rows_computed`` counts the rows written into that directory).
    """
    teachers = _as_teachers(teacher, teacher_fingerprint)
    mode = ensemble or ("none" if len(teachers) == 1 else "mean_logits")
    outs, sparse_args, pass_temperature = _check_outputs(outputs, mode, len(teachers))
    dtype = dtype_name(dtype)
    if isinstance(dataset, torch.Tensor):
        dataset = TensorDataset(dataset)
    if len(dataset) == 0:
        raise ValueError("dataset is empty: nothing to cache")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if rows_per_shard is not None and (
        not isinstance(rows_per_shard, int) or rows_per_shard < 1 or rows_per_shard % batch_size
    ):
        raise ValueError(
            f"rows_per_shard must be a positive multiple of batch_size={batch_size} (shards split "
            f"on batch boundaries), got {rows_per_shard!r}"
        )
    if device is None:
        first = next(teachers[0].parameters(), None) if isinstance(teachers[0], nn.Module) else None
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    identity = {"teacher": teacher_fingerprint or fingerprint_teachers(teachers),
                "dataset": dataset_fingerprint}
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as locks:  # held by rank 0 for the whole (possibly multi-process) build
        distributed.run_on_main(lambda: [locks.enter_context(BuildLock(out)) for out in outs] and None)
        results = _build_locked(teachers, dataset, outs, sparse_args, mode=mode, dtype=dtype,
                                batch_size=batch_size, rows_per_shard=rows_per_shard,
                                temperature=pass_temperature, identity=identity, device=device,
                                num_workers=num_workers, progress=progress, overwrite=overwrite)
    return dict(zip(outs, results, strict=True))


def _check_outputs(outputs, mode: str, members: int) -> tuple[list[Path], list[dict | None], float | None]:
    """build_caches' ``outputs``, checked: the directories, each one's sparse arguments (None
    for dense) and the teacher pass's temperature (that of ensemble="mean_probs")."""
    if not isinstance(outputs, Mapping) or not outputs:
        raise ValueError(f"outputs must be a non-empty mapping of cache directory -> target arguments, "
                         f"got {outputs!r}")
    outs, sparse_args, temperatures = [], [], set()
    for out_dir, args in outputs.items():
        unknown = sorted(map(str, set(args) - set(OUTPUT_ARGS))) if isinstance(args, Mapping) else None
        if unknown is None or unknown:
            raise ValueError(f"outputs[{str(out_dir)!r}] must be a dict with keys from {OUTPUT_ARGS}, got "
                             f"{args!r}" + (f" (unknown: {unknown})" if unknown else ""))
        args = {"targets": "dense", "k": None, "samples": None, "temperature": None, "temperatures": None,
                "seed": 0, **args}
        sparse = _sparse_args(args["targets"], mode, args["k"], args["samples"], args["temperature"],
                              args["temperatures"], args["seed"])
        pass_temperature = None if sparse else args["temperature"]
        check_ensemble(mode, members, pass_temperature)
        outs.append(Path(out_dir))
        sparse_args.append(sparse)
        temperatures.add(pass_temperature)
    resolved = [out.resolve() for out in outs]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"outputs: two entries name the same directory ({[str(o) for o in outs]})")
    if len(temperatures) > 1:
        raise ValueError(f"outputs: dense caches of ensemble='mean_probs' at different temperatures "
                         f"({sorted(temperatures, key=str)}) need separate teacher passes")
    return outs, sparse_args, temperatures.pop()


def _as_teachers(teacher, teacher_fingerprint: str | None) -> list:
    teachers = [teacher] if isinstance(teacher, nn.Module) or (
        callable(teacher) and not isinstance(teacher, Sequence)) else list(teacher)
    if not teachers or not all(callable(t) for t in teachers):
        raise ValueError("teacher must be an nn.Module, a callable, or a non-empty sequence of them")
    if teacher_fingerprint is None and not all(isinstance(t, nn.Module) for t in teachers):
        raise ValueError("teacher_fingerprint is required for a teacher that is not an nn.Module "
                         "(a module is fingerprinted from its state_dict; a callable cannot be)")
    if teacher_fingerprint is not None and not isinstance(teacher_fingerprint, str):
        raise ValueError(f"teacher_fingerprint must be a str, got {teacher_fingerprint!r}")
    return teachers


def _sparse_args(targets, mode, k, samples, temperature, temperatures, seed) -> dict | None:
    """build_cache's sparse arguments, checked (None for a dense cache)."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    if targets == "dense":
        if k is not None or samples is not None or temperatures is not None:
            raise ValueError("k, samples and temperatures are arguments of sparse targets: pass "
                             "targets='topk', 'sampled' or 'topk+sampled' (or leave them unset)")
        return None
    if mode not in ("none", "mean_logits"):
        raise ValueError(f"ensemble={mode!r} cannot be combined with targets={targets!r}: sparse "
                         "targets are the top-k / samples of one row of logits; use ensemble='mean_logits'")
    if targets == "topk":
        if temperature is not None:
            raise ValueError("temperature is the sampling temperature of targets='sampled' / "
                             "'topk+sampled'; a 'topk' cache takes temperatures=(T_t, ...)")
        temps = temperatures
    else:
        if temperatures is not None and temperature is not None:
            raise ValueError("give the sampling temperature once: temperature=T_s")
        temps = temperature if temperatures is None else temperatures
    return {"targets": targets, "k": k, "samples": samples, "temperatures": temps, "seed": seed}


def _probe(teachers, dataset, mode, temperature, device) -> torch.Tensor:
    """The teacher's output on item 0: tells C, the member count, and items vs tokens."""
    first = _first_input(dataset[0])
    return teacher_logits(teachers, first.unsqueeze(0).to(device), mode, temperature)


def _build_locked(teachers, dataset, outs: list[Path], sparse_args: list[dict | None], *, mode, dtype,
                  batch_size, rows_per_shard, temperature, identity, device, num_workers, progress,
                  overwrite) -> list[BuildResult]:
    num_rows = len(dataset)
    modes = [getattr(t, "training", None) for t in teachers]
    for t in teachers:
        if isinstance(t, nn.Module):
            t.eval()
    try:
        with torch.inference_mode():
            probe = _probe(teachers, dataset, mode, temperature, device)
            writers = [_make_writer(probe, mode, dtype, args) for args in sparse_args]
            if rows_per_shard is None:
                # At most SHARD_BYTES per shard, and at least MIN_SHARDS shards when there are
                # that many batches: shards are the unit a K-process build deals out, and the
                # layout must not depend on K (a 1- and a K-process build write the same files).
                batches = -(-num_rows // batch_size)
                item_bytes = max(w.item_bytes for w in writers)
                per_shard = min(SHARD_BYTES // (batch_size * item_bytes), -(-batches // MIN_SHARDS))
                rows_per_shard = batch_size * max(1, per_shard)
            dataset_fingerprint = identity["dataset"] or fingerprint_dataset(dataset)
            jobs = []
            for out, writer in zip(outs, writers, strict=True):
                config = {
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "num_rows": num_rows,
                    "num_classes": writer.num_classes,
                    "dtype": dtype,
                    "teacher_fingerprint": identity["teacher"],
                    "dataset_fingerprint": dataset_fingerprint,
                    "ensemble": {"mode": mode, "members": len(teachers),
                                 "temperature": None if writer.sparse else temperature},
                    "batch_size": batch_size,
                    "rows_per_shard": rows_per_shard,
                    **writer.config(),
                }
                done = distributed.run_on_main(_prepare_dir, out, config, overwrite)
                jobs.append(_Job(out, config, writer, done))  # done None: already complete
            pending = [job for job in jobs if job.done is not None]
            reused = {job.out: sum(s["stop"] - s["start"] for s in job.done.values()) for job in pending}
            start_time = time.perf_counter()
            teacher_seconds = _run_pass(teachers, dataset, pending, mode, temperature, device, num_workers,
                                        progress) if pending else 0.0
            seconds = time.perf_counter() - start_time
    finally:
        for t, was_training in zip(teachers, modes, strict=True):
            if isinstance(t, nn.Module):
                t.train(was_training)
    for job in pending:
        shards = [job.done[k] for k in sorted(job.done)]
        job.manifest = {**job.config, **job.writer.totals(shards), "shards": shards}
        if distributed.is_main():
            atomic_write_json(job.out / MANIFEST, job.manifest)
            _remove_progress(job.out)
    distributed.barrier()  # no rank returns before the manifests exist
    return [BuildResult(job.out, job.manifest, num_rows - reused[job.out], reused[job.out], seconds,
                        teacher_seconds)
            if job.done is not None else
            BuildResult(job.out, read_json(job.out / MANIFEST, "manifest"), 0, num_rows, 0.0)
            for job in jobs]


@dataclass
class _Job:
    """One output directory of a teacher pass: its config, writer and finished shards by start
    row (None when the directory already holds the complete cache)."""

    out: Path
    config: dict
    writer: Any
    done: dict[int, dict] | None
    manifest: dict | None = None


def _run_pass(teachers, dataset, jobs: list[_Job], mode, temperature, device, num_workers,
              progress) -> float:
    """Runs the missing shards of ``jobs``; returns this rank's seconds in the teacher forward."""
    try:
        teacher_seconds = _run_shards(teachers, dataset, jobs, mode, temperature, device, num_workers,
                                      progress)
    except OSError as exc:  # disk full, quota, permissions: finished shards are kept
        where = ", ".join(str(job.out) for job in jobs)
        raise CacheError(
            f"writing the cache in {where} failed ({exc}); the finished shards are kept: fix the "
            "cause (e.g. free disk space) and rerun the same build to resume"
        ) from exc
    # Every rank's shards, for the manifest (rank 0) and the result (all ranks).
    for job in jobs:
        for part in distributed.gather_to_all(job.done):
            job.done.update({int(k): v for k, v in part.items()})
    return teacher_seconds


# ------------------------------------------------------------------------ shard writers
class _DenseWriter:
    """Rows of raw logits in the stored dtype: ``(C,)`` or ``(M, C)`` per item."""

    tokens = False
    sparse = False

    def __init__(self, row_shape: tuple[int, ...], dtype: str) -> None:
        self.row_shape, self.dtype = row_shape, dtype
        self.store_dtype = DTYPES[dtype][0]
        self.num_classes = row_shape[-1]
        self.item_bytes = self.store_dtype.itemsize * int(torch.Size(row_shape).numel())
        self._buffer: torch.Tensor | None = None
        self._filled = 0

    def config(self) -> dict:
        return {}  # a dense manifest stays exactly the version-1 format

    def totals(self, shards: list[dict]) -> dict:
        return {}

    def new_shard(self, rows: int) -> None:
        """One preallocated buffer per shard size (reused: a shard is on disk before the next)."""
        if self._buffer is None or len(self._buffer) != rows:
            self._buffer = torch.empty((rows, *self.row_shape), dtype=self.store_dtype)
        self._filled = 0

    def add(self, logits: torch.Tensor, rows: range, lengths) -> None:
        if tuple(logits.shape[1:]) != self.row_shape:
            raise ValueError(f"teacher rows changed shape: {tuple(logits.shape[1:])} after {self.row_shape}")
        stored = logits.to(self.store_dtype).cpu()
        if not torch.isfinite(stored).all() and torch.isfinite(logits).all():
            raise ValueError(
                f"teacher logits (max |z| = {logits.abs().max().item():.3g}) overflow dtype="
                f"{self.dtype!r}; use dtype='bfloat16' or 'float32'"
            )
        self._buffer[self._filled:self._filled + len(stored)] = stored
        self._filled += len(stored)

    def save(self, path: Path) -> tuple[str, dict]:
        return save_shard(path, self._buffer), {}


class _SparseWriter:
    """Packed sparse records (:mod:`kdfast.cache.sparse`), per item or per token."""

    sparse = True

    def __init__(self, spec: SparseSpec, tokens: bool, probe_len: int) -> None:
        self.spec, self.tokens = spec, tokens
        self.num_classes = spec.num_classes
        self.item_bytes = spec.bytes_per_row * max(1, probe_len)
        self._pieces: list[tuple[np.ndarray, torch.Tensor | None]] = []

    def config(self) -> dict:
        return {"format_version": SPARSE_FORMAT_VERSION, "targets": self.spec.to_json(),
                "rows": "tokens" if self.tokens else "items"}

    def totals(self, shards: list[dict]) -> dict:
        return {"num_tokens": sum(s["tokens"] for s in shards)} if self.tokens else {}

    def new_shard(self, rows: int) -> None:
        self._pieces = []

    def add(self, logits: torch.Tensor, rows: range, lengths: torch.Tensor | None) -> None:
        self._pieces.append(self._encode(logits, rows, lengths))

    def _encode(self, logits: torch.Tensor, rows: range, lengths: torch.Tensor | None):
        c = self.num_classes
        if logits.shape[-1] != c or logits.dim() != (3 if self.tokens else 2):
            want = "(B, L, C)" if self.tokens else "(B, C)"
            raise ValueError(f"teacher outputs changed shape: {tuple(logits.shape)}, expected {want} "
                             f"with C = {c}")
        ids = torch.tensor(list(rows), dtype=torch.int64)
        if not self.tokens:
            keys = torch.stack([ids, torch.zeros_like(ids)], dim=1)
            return encode_rows(self.spec, logits, keys), None
        positions = torch.arange(logits.shape[1])
        valid = positions[None, :] < lengths[:, None]  # (B, L): the sequences' real tokens
        keys = torch.stack([ids[:, None].expand_as(valid)[valid], positions.expand_as(valid)[valid]], 1)
        # Packed sequences are all valid: a view, not a masked copy of the (B, L, C) logits
        # (400 MB per batch of 8 x 256 x 49,152 float32).
        rows_kept = logits.flatten(0, 1) if bool(valid.all()) else logits[valid.to(logits.device)]
        return encode_rows(self.spec, rows_kept, keys), lengths

    def save(self, path: Path) -> tuple[str, dict]:
        records = np.concatenate([p[0] for p in self._pieces])
        if not self.tokens:
            return save_records(path, records), {}
        lengths = torch.cat([p[1] for p in self._pieces])
        offsets = np.concatenate([[0], np.cumsum(lengths.numpy())]).astype("<i8")
        return save_records(path, records, offsets), {"tokens": len(records)}


def _make_writer(probe: torch.Tensor, mode: str, dtype: str, sparse_args: dict | None):
    dims = 3 if mode == "members" else 2
    if sparse_args is None:
        if probe.dim() != dims:
            hint = (" (a token-level teacher: token-level caches store sparse targets, pass "
                    "targets='topk')" if probe.dim() == 3 else "")
            raise ValueError(f"teacher must return (batch, classes) logits, got a row of shape "
                             f"{tuple(probe.shape[1:])}{hint}")
        return _DenseWriter(tuple(probe.shape[1:]), dtype)
    if probe.dim() not in (2, 3):
        raise ValueError(f"teacher must return (B, C) logits or (B, L, C) token logits, got shape "
                         f"{tuple(probe.shape)}")
    spec = make_spec(num_classes=probe.shape[-1], logit_dtype=dtype, **sparse_args)
    return _SparseWriter(spec, probe.dim() == 3, probe.shape[1] if probe.dim() == 3 else 1)


def _prepare_dir(out: Path, config: dict, overwrite: bool) -> dict[int, dict] | None:
    """Returns the reusable finished shards by start row, or None if the cache is complete."""
    for leftover in out.glob(f".{SHARD_PREFIX}*.tmp.*"):  # temp files of a killed build
        leftover.unlink(missing_ok=True)
    for name, what in ((MANIFEST, "a complete cache"), (PROGRESS, "an unfinished build")):
        path = out / name
        if not path.exists():
            continue
        found = read_json(path, name)
        found_config = found.get("config", found)
        diff = _config_diff(found_config, config) if found_config.get("format") == FORMAT_NAME else [
            "not a kdfast cache file"]
        if diff and not overwrite:
            raise CacheMismatchError(
                f"{out} holds {what} made with other arguments ({'; '.join(diff)}); pass "
                "overwrite=True (--overwrite) to replace it, or use another directory"
            )
        if diff:
            _remove_cache_files(out)
            break
        if name == MANIFEST:
            return None
        shards = list(found.get("shards", []))
        for rank_file in sorted(out.glob(RANK_PROGRESS_GLOB)):  # a K-process build's ranks
            part = read_json(rank_file, rank_file.name)
            if part.get("config") == found.get("config"):
                shards += part.get("shards", [])
        done = {}
        for shard in shards:
            # A shard listed here was renamed into place before being listed; re-hash anyway
            # so a damaged file is recomputed rather than carried into the manifest.
            if not (isinstance(shard, dict) and isinstance(shard.get("start"), int)
                    and isinstance(shard.get("stop"), int)
                    and shard.get("file") == shard_name(shard["start"], shard["stop"])):
                continue  # not an entry a build wrote: that range is recomputed
            path = out / shard["file"]
            if path.exists() and sha256_file(path) == shard["sha256"]:
                done[shard["start"]] = shard
        return done
    return {}


def _pad_sequences(items) -> tuple[torch.Tensor, torch.Tensor]:
    """Collates 1-D integer sequences into a right-padded ``(B, L)`` batch and their lengths."""
    seqs = [_first_input(item) for item in items]
    for seq in seqs:
        if not isinstance(seq, torch.Tensor) or seq.dim() != 1 or seq.is_floating_point():
            raise ValueError("token-level items must be 1-D integer tensors (token ids), got "
                             f"{type(seq).__name__} {getattr(seq, 'shape', '')}")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    batch = torch.zeros(len(seqs), max(1, int(lengths.max())), dtype=torch.int64)
    for row, seq in zip(batch, seqs, strict=True):
        row[:len(seq)] = seq
    return batch, lengths


def _run_shards(teachers, dataset, jobs: list[_Job], mode, temperature, device, num_workers: int,
                progress: bool) -> float:
    config = jobs[0].config  # every job shares num_rows, batch_size and rows_per_shard
    num_rows, batch_size = config["num_rows"], config["batch_size"]
    rank, world = distributed.rank(), distributed.world_size()
    # Shard j goes to rank j % world: fixed by the shard layout, so a resumed build (with any
    # number of processes) recomputes exactly the missing shards with the same batches. A
    # shard runs through the teacher once, for the directories that lack it.
    todo = [(r, [job for job in jobs if r[0] not in job.done])
            for j, r in enumerate(shard_ranges(num_rows, config["rows_per_shard"])) if j % world == rank]
    todo = [(r, needing) for r, needing in todo if needing]
    if distributed.is_main():
        for job in jobs:
            atomic_write_json(job.out / PROGRESS,
                              {"config": job.config, "shards": [job.done[k] for k in sorted(job.done)]})
    mine: dict[Path, dict[int, dict]] = {job.out: {} for job in jobs}
    if not todo:
        return 0.0
    # Batches start at each shard's first row, so a resumed build runs the very same batches.
    batches = [range(b, min(b + batch_size, stop)) for (start, stop), _ in todo
               for b in range(start, stop, batch_size)]
    tokens = jobs[0].writer.tokens
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        collate_fn=_pad_sequences if tokens else None)
    bar = tqdm(total=sum(b - a for (a, b), _ in todo), unit="row", unit_scale=True,
               desc="teacher -> cache" if world == 1 else f"teacher -> cache (rank {rank}/{world})",
               disable=not progress or rank != 0, dynamic_ncols=True)
    shard_iter = iter(todo)
    (start, stop), needing = next(shard_iter)
    for job in needing:
        job.writer.new_shard(stop - start)
    filled, teacher_seconds = 0, 0.0
    for rows, batch in zip(batches, loader, strict=True):
        inputs, lengths = batch if tokens else (_first_input(batch), None)
        started = time.perf_counter()
        logits = teacher_logits(teachers, inputs.to(device), mode, temperature)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the forward's time, not its launch's
        teacher_seconds += time.perf_counter() - started
        for job in needing:
            job.writer.add(logits, rows, lengths)
        filled += len(rows)
        bar.update(len(rows))
        if filled == stop - start:
            for job in needing:
                _finish_shard(job, start, stop, mine[job.out], world, rank)
            nxt = next(shard_iter, None)
            if nxt is not None:
                (start, stop), needing = nxt
                for job in needing:
                    job.writer.new_shard(stop - start)
            filled = 0
    bar.close()
    return teacher_seconds


def _finish_shard(job: _Job, start: int, stop: int, mine: dict[int, dict], world: int, rank: int) -> None:
    """Saves ``job``'s shard [start, stop) and records it in the directory's progress file."""
    name = shard_name(start, stop)
    sha, extra = job.writer.save(job.out / name)
    job.done[start] = mine[start] = {"file": name, "start": start, "stop": stop, "sha256": sha, **extra}
    recorded = job.done if world == 1 else mine
    progress_file = job.out / (PROGRESS if world == 1 else rank_progress_name(rank))
    shards = [recorded[k] for k in sorted(recorded)]
    atomic_write_json(progress_file, {"config": job.config, "shards": shards})
