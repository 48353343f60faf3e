"""`build_cache`: run the teacher once over a dataset and store its raw logits in shards."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
    BuildLock,
    CacheError,
    CacheMismatchError,
    dtype_name,
    rank_progress_name,
    read_json,
    save_shard,
    sha256_file,
    shard_name,
    shard_ranges,
)

# Default shard size: the in-memory buffer of one shard stays under this many bytes.
SHARD_BYTES = 256 << 20
# Default shard count to aim for (see build_cache): enough to keep 16 processes busy.
MIN_SHARDS = 16


@dataclass
class BuildResult:
    """What :func:`build_cache` did: ``rows_computed`` rows ran through the teacher in
    ``seconds`` (0 when the cache was already complete); ``rows_reused`` came from the shards
    of an interrupted build."""

    path: Path
    manifest: dict
    rows_computed: int
    rows_reused: int
    seconds: float

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
    teacher: nn.Module | Sequence[nn.Module],
    dataset: Dataset | torch.Tensor,
    out_dir: str | Path,
    *,
    dtype: str | torch.dtype = "float16",
    batch_size: int = 4096,
    rows_per_shard: int | None = None,
    ensemble: str | None = None,
    temperature: float | None = None,
    dataset_fingerprint: str | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> BuildResult:
    """Runs ``teacher`` over ``dataset`` once and stores its raw logits in ``out_dir``.

    The teacher runs in eval mode under ``torch.inference_mode`` at ``batch_size`` rows per
    call; its logits are stored unscaled (temperature is applied at training time, so one
    cache serves every T). Shards are written atomically and recorded in ``progress.json``;
    calling again after an interruption (same arguments) keeps the finished shards (after
    re-checking their SHA-256) and computes only the rest, giving the same bytes as an
    uninterrupted build. ``manifest.json`` is written last.

    Inside an initialized ``torch.distributed`` process group (e.g. under ``torchrun``) the
    shards are dealt to the ranks round-robin; each rank writes its own shards and records
    them in its own progress file, and rank 0 writes the one manifest. Shards split on batch
    boundaries, so the cache is byte-identical to a single-process build with the same batch
    size and thread count. A second build into the same directory fails (``build.lock``).

    Args:
        teacher: an ``nn.Module`` mapping a batch of inputs to ``(B, C)`` logits, or a
            sequence of them (an ensemble).
        dataset: map-style dataset whose items are inputs or ``(input, ...)`` tuples (labels
            are ignored), or a tensor of inputs. Row i of the cache is item i.
        out_dir: cache directory (created if missing).
        dtype: stored dtype, "float16" (default), "bfloat16" or "float32".
        batch_size: teacher batch size (default 4096).
        rows_per_shard: rows per shard file, a multiple of ``batch_size`` so shards split on
            batch boundaries (a resumed build then runs exactly the same batches). Default:
            about 16 shards (the unit of work of a multi-process build), each under 256 MiB.
        ensemble: for several teachers: "mean_logits" (default; serves every T),
            "mean_probs" (needs ``temperature``; the cache then only serves that T) or
            "members" (stores each member's logits, rows of shape ``(M, C)``).
        temperature: the T of ``ensemble="mean_probs"``.
        dataset_fingerprint: identity of the dataset; default :func:`fingerprint_dataset`.
        device: where the teacher runs (default: where its parameters are).
        num_workers: DataLoader workers feeding the teacher.
        progress: show a progress bar.
        overwrite: replace an existing cache (or a partial build) made with other arguments;
            without it such a directory raises :class:`CacheMismatchError`.

    Returns:
        A :class:`BuildResult` (manifest, rows computed and reused, seconds, rows/s).
    """
    teachers = [teacher] if isinstance(teacher, nn.Module) else list(teacher)
    if not teachers or not all(isinstance(t, nn.Module) for t in teachers):
        raise ValueError("teacher must be an nn.Module or a non-empty sequence of nn.Module")
    mode = ensemble or ("none" if len(teachers) == 1 else "mean_logits")
    check_ensemble(mode, len(teachers), temperature)
    dtype = dtype_name(dtype)
    if isinstance(dataset, torch.Tensor):
        dataset = TensorDataset(dataset)
    num_rows = len(dataset)
    if num_rows == 0:
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
        first = next(teachers[0].parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = BuildLock(out)  # held by rank 0 for the whole (possibly multi-process) build
    distributed.run_on_main(lambda: lock.__enter__() and None)
    try:
        result = _build_locked(teachers, dataset, out, mode=mode, dtype=dtype, batch_size=batch_size,
                               rows_per_shard=rows_per_shard, temperature=temperature,
                               dataset_fingerprint=dataset_fingerprint, device=device,
                               num_workers=num_workers, progress=progress, overwrite=overwrite)
    except BaseException as exc:
        if distributed.is_main():
            lock.__exit__(type(exc), exc, None)
        raise
    if distributed.is_main():
        lock.__exit__(None, None, None)
    return result


def _build_locked(teachers, dataset, out: Path, *, mode, dtype, batch_size, rows_per_shard,
                  temperature, dataset_fingerprint, device, num_workers, progress,
                  overwrite) -> BuildResult:
    num_rows = len(dataset)
    store_dtype = DTYPES[dtype][0]
    modes = [t.training for t in teachers]
    for t in teachers:
        t.eval()
    try:
        with torch.inference_mode():
            # One row tells C (and the member count) before any shard is sized.
            probe = _first_input(dataset[0]).unsqueeze(0).to(device)
            row_shape = tuple(teacher_logits(teachers, probe, mode, temperature).shape[1:])
            if len(row_shape) != (2 if mode == "members" else 1):
                raise ValueError(
                    f"teacher must return (batch, classes) logits, got a row of shape {row_shape}"
                )
            row_bytes = store_dtype.itemsize * int(torch.Size(row_shape).numel())
            if rows_per_shard is None:
                # At most SHARD_BYTES per shard, and at least MIN_SHARDS shards when there are
                # that many batches: shards are the unit a K-process build deals out, and the
                # layout must not depend on K (a 1- and a K-process build write the same files).
                batches = -(-num_rows // batch_size)
                per_shard = min(SHARD_BYTES // (batch_size * row_bytes), -(-batches // MIN_SHARDS))
                rows_per_shard = batch_size * max(1, per_shard)
            config = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "num_rows": num_rows,
                "num_classes": row_shape[-1],
                "dtype": dtype,
                "teacher_fingerprint": fingerprint_teachers(teachers),
                "dataset_fingerprint": dataset_fingerprint or fingerprint_dataset(dataset),
                "ensemble": {"mode": mode, "members": len(teachers), "temperature": temperature},
                "batch_size": batch_size,
                "rows_per_shard": rows_per_shard,
            }
            done = distributed.run_on_main(_prepare_dir, out, config, overwrite)
            if done is None:  # already complete
                manifest = read_json(out / MANIFEST, "manifest")
                return BuildResult(out, manifest, 0, num_rows, 0.0)
            reused = sum(s["stop"] - s["start"] for s in done.values())
            start_time = time.perf_counter()
            try:
                _run_shards(teachers, dataset, out, config, done, row_shape, store_dtype, device,
                            num_workers, progress)
            except OSError as exc:  # disk full, quota, permissions: finished shards are kept
                raise CacheError(
                    f"writing the cache in {out} failed ({exc}); the finished shards are kept: fix "
                    "the cause (e.g. free disk space) and rerun the same build to resume"
                ) from exc
            # Every rank's shards, for the manifest (rank 0) and the result (all ranks).
            for part in distributed.gather_to_all(done):
                done.update({int(k): v for k, v in part.items()})
            seconds = time.perf_counter() - start_time
    finally:
        for t, was_training in zip(teachers, modes, strict=True):
            t.train(was_training)

    manifest = {**config, "shards": [done[k] for k in sorted(done)]}
    if distributed.is_main():
        atomic_write_json(out / MANIFEST, manifest)
        _remove_progress(out)
    distributed.barrier()  # no rank returns before the manifest exists
    return BuildResult(out, manifest, num_rows - reused, reused, seconds)


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


def _run_shards(teachers, dataset, out: Path, config: dict, done: dict[int, dict], row_shape,
                store_dtype, device, num_workers: int, progress: bool) -> None:
    num_rows, batch_size = config["num_rows"], config["batch_size"]
    rank, world = distributed.rank(), distributed.world_size()
    # Shard j goes to rank j % world: fixed by the shard layout, so a resumed build (with any
    # number of processes) recomputes exactly the missing shards with the same batches.
    todo = [r for j, r in enumerate(shard_ranges(num_rows, config["rows_per_shard"]))
            if j % world == rank and r[0] not in done]
    if distributed.is_main():
        atomic_write_json(out / PROGRESS, {"config": config, "shards": [done[k] for k in sorted(done)]})
    progress_file = out / (PROGRESS if world == 1 else rank_progress_name(rank))
    mine: dict[int, dict] = {}
    if not todo:
        return
    # Batches start at each shard's first row, so a resumed build runs the very same batches.
    batches = [range(b, min(b + batch_size, stop)) for start, stop in todo
               for b in range(start, stop, batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    mode, temperature = config["ensemble"]["mode"], config["ensemble"]["temperature"]
    bar = tqdm(total=sum(b - a for a, b in todo), unit="row", unit_scale=True,
               desc="teacher -> cache" if world == 1 else f"teacher -> cache (rank {rank}/{world})",
               disable=not progress or rank != 0, dynamic_ncols=True)
    shard_iter = iter(todo)
    start, stop = next(shard_iter)
    buffer = torch.empty((stop - start, *row_shape), dtype=store_dtype)
    filled = 0
    for batch in loader:
        logits = teacher_logits(teachers, _first_input(batch).to(device), mode, temperature)
        if tuple(logits.shape[1:]) != row_shape:
            raise ValueError(f"teacher rows changed shape: {tuple(logits.shape[1:])} after {row_shape}")
        stored = logits.to(store_dtype).cpu()
        if not torch.isfinite(stored).all() and torch.isfinite(logits).all():
            raise ValueError(
                f"teacher logits (max |z| = {logits.abs().max().item():.3g}) overflow dtype="
                f"{config['dtype']!r}; use dtype='bfloat16' or 'float32'"
            )
        buffer[filled:filled + len(stored)] = stored
        filled += len(stored)
        bar.update(len(stored))
        if filled == stop - start:
            name = shard_name(start, stop)
            sha = save_shard(out / name, buffer)
            done[start] = mine[start] = {"file": name, "start": start, "stop": stop, "sha256": sha}
            recorded = done if world == 1 else mine
            atomic_write_json(progress_file,
                              {"config": config, "shards": [recorded[k] for k in sorted(recorded)]})
            nxt = next(shard_iter, None)
            if nxt is not None:
                start, stop = nxt
                if stop - start != len(buffer):
                    buffer = torch.empty((stop - start, *row_shape), dtype=store_dtype)
                filled = 0
    bar.close()
