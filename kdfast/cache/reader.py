"""Reading a soft-target cache: memory-mapped shards, random row access, verification."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from kdfast._sparse_checks import SparseTargets
from kdfast.cache.fingerprint import fingerprint_dataset, fingerprint_teachers
from kdfast.cache.format import (
    DTYPES,
    SPARSE_FORMAT_VERSION,
    CacheCorruptError,
    CacheMismatchError,
    load_manifest,
    open_records,
    open_shard,
    row_shape,
    sha256_file,
)
from kdfast.cache.sparse import (
    SparseSpec,
    decode_rows,
    refuse,
    served_teacher_temperature,
    served_temperature_error,
)


def _short(fp: str) -> str:
    return fp if len(fp) <= 24 else fp[:24] + "..."


class SoftTargetCache:
    """Read access to a cache directory written by :func:`kdfast.cache.build_cache`.

    ``cache[i]`` (one row), ``cache[a:b]`` (a zero-copy view when the rows lie in one
    shard) and ``cache[indices]`` (a tensor/array/list of row indices in any order, gathered
    with one copy into a new tensor) return torch tensors in the stored dtype, shaped
    ``(..., C)`` (``(..., M, C)`` for an ensemble stored per member).

    Shards are memory-mapped on first use. With ``verify_on_open=True`` (default) a process
    checks a shard's SHA-256 the first time it opens it: one sequential read of the shard
    (about 1 GB/s per core), once per shard per process, so a DataLoader with W workers reads
    each shard it touches at most W + 1 times. ``verify_on_open=False`` skips it;
    :meth:`verify` re-checks every shard.

    The object pickles without its maps, so it can be handed to DataLoader workers
    (fork or spawn); each worker re-opens (and re-checks) what it reads.

    A sparse cache (``targets`` is "topk", "sampled" or "topk+sampled") is read with
    :meth:`sparse_targets` instead of indexing; its ``len`` counts items, or sequences for a
    token-level cache.
    """

    def __init__(self, path: str | Path, *, verify_on_open: bool = True) -> None:
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        self.verify_on_open = verify_on_open
        self._shards = self.manifest["shards"]
        self._starts = np.array([s["start"] for s in self._shards], dtype=np.int64)
        sparse = self.manifest["format_version"] == SPARSE_FORMAT_VERSION
        self.sparse_spec: SparseSpec | None = SparseSpec.from_manifest(self.manifest) if sparse else None
        self.token_level = sparse and self.manifest["rows"] == "tokens"
        self._row_shape = row_shape(self.manifest)
        # Shard k: a tensor of rows (dense), or (offsets or None, records) of a sparse cache.
        self._tensors: dict[int, torch.Tensor | tuple[np.ndarray | None, np.ndarray]] = {}
        self._pid = os.getpid()

    # ----------------------------------------------------------------------------- metadata
    def __len__(self) -> int:
        return int(self.manifest["num_rows"])

    @property
    def num_classes(self) -> int:
        """C, the number of classes (logits per row)."""
        return int(self.manifest["num_classes"])

    @property
    def dtype(self) -> torch.dtype:
        """The stored dtype (float16, bfloat16 or float32)."""
        return DTYPES[self.manifest["dtype"]][0]

    @property
    def targets(self) -> str:
        """"dense", "topk", "sampled" or "topk+sampled"."""
        return "dense" if self.sparse_spec is None else self.sparse_spec.kind

    @property
    def bytes_per_row(self) -> int:
        """Payload bytes of one stored row (one token for a token-level cache)."""
        if self.sparse_spec is not None:
            return self.sparse_spec.bytes_per_row
        return self.dtype.itemsize * int(np.prod(self._row_shape))

    @property
    def teacher_temperature(self) -> float | None:
        """The ``teacher_temperature`` to give the sparse loss with :meth:`sparse_targets`:
        None (= T) for top-k logits, 1.0 for the sampled kinds (served as log-probabilities)."""
        return served_teacher_temperature(self._require_sparse())

    @property
    def ensemble(self) -> dict:
        """``{"mode", "members", "temperature"}`` from the manifest."""
        return dict(self.manifest["ensemble"])

    def check_compatible(
        self,
        *,
        teacher: nn.Module | Sequence[nn.Module] | str | None = None,
        dataset: Dataset | torch.Tensor | str | None = None,
        num_classes: int | None = None,
        temperature: float | None = None,
    ) -> None:
        """Raises :class:`CacheMismatchError` unless the cache was built for this teacher (a
        module, an ensemble or a fingerprint string), this dataset (or fingerprint), this
        class count, and, for an ``ensemble="mean_probs"`` or a sampled cache, this
        temperature."""
        problems = []
        if teacher is not None:
            want = teacher if isinstance(teacher, str) else fingerprint_teachers(teacher)
            have = self.manifest["teacher_fingerprint"]
            if want != have:
                problems.append(f"it was built from teacher {_short(have)}, not the given teacher "
                                f"{_short(want)}")
        if dataset is not None:
            want = dataset if isinstance(dataset, str) else fingerprint_dataset(dataset)
            have = self.manifest["dataset_fingerprint"]
            if want != have:
                problems.append(f"it was built on dataset {_short(have)}, not the given dataset "
                                f"{_short(want)}")
            elif not isinstance(dataset, str) and len(dataset) != len(self):
                problems.append(f"it has {len(self)} rows, the dataset has {len(dataset)}")
        if num_classes is not None and num_classes != self.num_classes:
            problems.append(f"it has C={self.num_classes} classes, expected num_classes={num_classes}")
        if temperature is not None and self.sparse_spec is not None:
            problem = served_temperature_error(self.sparse_spec, temperature, "renormalize")
            if problem:
                problems.append(problem)
        if temperature is not None and self.ensemble["mode"] == "mean_probs":
            cached_t = self.ensemble["temperature"]
            if not math.isclose(temperature, cached_t, rel_tol=1e-9):
                problems.append(
                    f"it averages ensemble probabilities at T={cached_t}, so it only serves that "
                    f"temperature, not T={temperature} (rebuild with ensemble='mean_logits' or "
                    "'members' to serve every T)"
                )
        if problems:
            raise CacheMismatchError(f"cache {self.path} does not fit: " + "; ".join(problems))

    # ------------------------------------------------------------------------------ access
    def _shard(self, k: int) -> torch.Tensor:
        if self._pid != os.getpid():  # forked: maps are shared, but check again per process
            self._tensors, self._pid = {}, os.getpid()
        tensor = self._tensors.get(k)
        if tensor is None:
            shard = self._shards[k]
            path = self._verified_path(shard)
            rows = shard["stop"] - shard["start"]
            if self.sparse_spec is None:
                tensor = open_shard(path, self.manifest["dtype"], (rows, *self._row_shape))
            elif self.token_level:
                tensor = open_records(path, self.sparse_spec.record_dtype(), shard["tokens"], rows)
            else:
                tensor = open_records(path, self.sparse_spec.record_dtype(), rows)
            self._tensors[k] = tensor
        return tensor

    def _verified_path(self, shard: dict) -> Path:
        path = self.path / shard["file"]
        if self.verify_on_open:
            try:
                actual = sha256_file(path)
            except FileNotFoundError:
                raise CacheCorruptError(f"shard {path} is missing; rebuild the cache") from None
            if actual != shard["sha256"]:
                raise CacheCorruptError(
                    f"shard {path} is corrupt: SHA-256 {actual[:16]}... != manifest "
                    f"{shard['sha256'][:16]}...; rebuild the cache (kdfast cache build --overwrite)"
                )
        return path

    def _index(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for a cache of {len(self)} rows")
        return i + len(self) if i < 0 else i

    def __getitem__(self, index) -> torch.Tensor:
        if self.sparse_spec is not None:
            raise CacheMismatchError(f"cache {self.path} stores sparse targets ({self.targets}): read "
                                     "them with cache.sparse_targets(index, temperature)")
        if isinstance(index, (int, np.integer)):
            i = self._index(int(index))
            k = int(np.searchsorted(self._starts, i, side="right")) - 1
            return self._shard(k)[i - self._shards[k]["start"]]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1:
                return self._rows_range(start, stop)
            index = torch.arange(start, stop, step)
        return self._gather(index)

    def _rows_range(self, start: int, stop: int) -> torch.Tensor:
        if stop <= start:
            return torch.empty((0, *self._row_shape), dtype=self.dtype)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        last = int(np.searchsorted(self._starts, stop - 1, side="right")) - 1
        parts = []
        for k in range(first, last + 1):
            s = self._shards[k]
            lo, hi = max(start, s["start"]) - s["start"], min(stop, s["stop"]) - s["start"]
            parts.append(self._shard(k)[lo:hi])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _row_indices(self, index) -> torch.Tensor:
        """Any integer index form -> a 1-D int64 tensor of rows in [0, len)."""
        if isinstance(index, slice):
            return torch.arange(*index.indices(len(self)))
        idx = index.cpu() if isinstance(index, torch.Tensor) else torch.as_tensor(np.asarray(index))
        if idx.numel() == 0:
            idx = idx.to(torch.int64)  # np.asarray([]) is float64
        if idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
            raise TypeError(f"row indices must be integers, got dtype {idx.dtype}")
        idx = idx.to(torch.int64).reshape(-1)
        n = len(self)
        if idx.numel() and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"row indices must lie in [-{n}, {n}), got min {idx.min()} max {idx.max()}")
        return torch.where(idx < 0, idx + n, idx)

    def _gather(self, index) -> torch.Tensor:
        idx = self._row_indices(index)
        shard_of = torch.from_numpy(np.searchsorted(self._starts, idx.numpy(), side="right") - 1)
        out = torch.empty((idx.numel(), *self._row_shape), dtype=self.dtype)
        for k in torch.unique(shard_of).tolist():
            rows = (shard_of == k).nonzero().squeeze(1)
            local = idx[rows] - self._shards[k]["start"]
            out[rows] = self._shard(k).index_select(0, local)
        return out

    # ------------------------------------------------------------------------ sparse access
    def _require_sparse(self) -> SparseSpec:
        if self.sparse_spec is None:
            raise CacheMismatchError(f"cache {self.path} stores dense logits: index it (cache[rows])")
        return self.sparse_spec

    def sparse_targets(self, index, temperature: float = 1.0, tail: str = "renormalize",
                       teacher_temperature: float | None = None) -> SparseTargets:
        """The sparse teacher of rows ``index`` (an int, a slice, or integer indices), for a
        loss at student temperature ``temperature``, teacher temperature
        ``teacher_temperature`` (None = T) and ``tail``.

        Item caches give ``(B, k)`` tensors (``(k,)`` for an int); token-level caches take
        sequence ids and give ``(B, L, k)`` with L the longest of them, ready for ``(B, L, C)``
        student logits: padding positions have only empty slots (-1), so they count in no
        term. Give the loss ``teacher_temperature=cache.teacher_temperature``.

        - ``"topk"``: the stored logits (any T with ``tail="renormalize"``), and the tail
          log-sum-exp when T_t is a declared temperature (``tail="bucket"`` needs one; the
          error lists them).
        - ``"sampled"``: ``SparseTargets(ids, log(count), None)``; ``"topk+sampled"``: head
          log p_i and sampled-tail log(P_R c_i / n). Both only at T = T_s, ``renormalize``.

        Raises:
            CacheMismatchError: this cache cannot serve ``temperature`` / ``tail``.
        """
        spec = self._require_sparse()
        refuse(spec, temperature, tail, teacher_temperature, str(self.path))
        scalar = isinstance(index, (int, np.integer))
        idx = self._row_indices([int(index)] if scalar else index)
        if self.token_level:
            out = self._padded_sequences(spec, idx, temperature, teacher_temperature)
        else:
            out = decode_rows(spec, self._records(idx), temperature, teacher_temperature)
        return SparseTargets(*(None if t is None else t[0] if scalar else t for t in out))

    def _records(self, idx: torch.Tensor) -> np.ndarray:
        """The records of item rows ``idx`` (one copy)."""
        shard_of = np.searchsorted(self._starts, idx.numpy(), side="right") - 1
        out = np.empty(len(idx), dtype=self.sparse_spec.record_dtype())
        for k in np.unique(shard_of):
            rows = np.nonzero(shard_of == k)[0]
            out[rows] = self._shard(int(k))[1][idx.numpy()[rows] - self._shards[k]["start"]]
        return out

    def _sequence(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        offsets, records = self._shard(k)
        j = i - self._shards[k]["start"]
        return records[offsets[j]:offsets[j + 1]]

    def _padded_sequences(self, spec: SparseSpec, idx: torch.Tensor, temperature: float,
                          teacher_temperature: float | None) -> SparseTargets:
        seqs = [self._sequence(int(i)) for i in idx]
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
        flat = decode_rows(spec, np.concatenate(seqs) if seqs else np.zeros(0, spec.record_dtype()),
                           temperature, teacher_temperature)
        width = int(lengths.max()) if len(seqs) else 0
        valid = torch.arange(width)[None, :] < lengths[:, None]  # (B, L)

        def pad(values: torch.Tensor | None, fill: float) -> torch.Tensor | None:
            if values is None:
                return None
            out = torch.full((*valid.shape, *values.shape[1:]), fill, dtype=values.dtype)
            out[valid] = values
            return out

        return SparseTargets(pad(flat.indices, -1), pad(flat.logits, 0.0), pad(flat.tail_logsumexp, 0.0))

    # ----------------------------------------------------------------------- housekeeping
    def verify(self) -> list[str]:
        """Re-hashes every shard; returns the files whose SHA-256 differs from the manifest
        (missing files count as bad). Empty list: the cache is intact."""
        bad = []
        for shard in self._shards:
            path = self.path / shard["file"]
            if not path.exists() or sha256_file(path) != shard["sha256"]:
                bad.append(shard["file"])
        return bad

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_tensors"] = {}  # maps are per process
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def __repr__(self) -> str:
        m = self.manifest
        rows = f"sequences={m['num_rows']}, tokens={m['num_tokens']}" if self.token_level else \
            f"rows={m['num_rows']}"
        return (f"SoftTargetCache({str(self.path)!r}, {rows}, C={m['num_classes']}, "
                f"targets={self.targets}, dtype={m['dtype']}, ensemble={m['ensemble']['mode']}, "
                f"shards={len(self._shards)})")


def open_cache(
    path: str | Path,
    *,
    teacher: nn.Module | Sequence[nn.Module] | str | None = None,
    dataset: Dataset | torch.Tensor | str | None = None,
    num_classes: int | None = None,
    temperature: float | None = None,
    verify_on_open: bool = True,
) -> SoftTargetCache:
    """Opens a cache and checks it against whatever of teacher / dataset / num_classes /
    temperature is given (see :meth:`SoftTargetCache.check_compatible`)."""
    cache = SoftTargetCache(path, verify_on_open=verify_on_open)
    cache.check_compatible(teacher=teacher, dataset=dataset, num_classes=num_classes,
                           temperature=temperature)
    return cache


def verify_cache(path: str | Path) -> None:
    """Re-checks every shard's SHA-256; raises :class:`CacheCorruptError` naming bad shards."""
    bad = SoftTargetCache(path, verify_on_open=False).verify()
    if bad:
        raise CacheCorruptError(
            f"{len(bad)} corrupt or missing shard(s) in {path}: {', '.join(bad)}; rebuild the cache "
            "(kdfast cache build --overwrite)"
        )


@dataclass
class CachedDataset(Dataset):
    """``dataset`` with the cached teacher row appended to each item:
    ``(*dataset[i], cache[i])`` (a zero-copy view of the row). Works with a shuffled
    DataLoader and any number of workers. Checks that the cache was built on ``dataset``
    unless ``check=False`` (e.g. when the fingerprint is costly and already checked)."""

    dataset: Dataset
    cache: SoftTargetCache
    check: bool = field(default=True, repr=False)

    def __post_init__(self) -> None:
        if self.check:
            self.cache.check_compatible(dataset=self.dataset)
        elif len(self.dataset) != len(self.cache):
            raise CacheMismatchError(f"dataset has {len(self.dataset)} rows, cache has {len(self.cache)}")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        item = tuple(item) if isinstance(item, (tuple, list)) else (item,)
        return (*item, self.cache[i])
