"""Soft-target cache: run the teacher once, store its logits, train students from the store.

- :func:`build_cache` runs a teacher (or an ensemble) over a dataset at a large batch size
  and writes raw logits (float16 / bfloat16 / float32) to checksummed, memory-mappable
  ``.npy`` shards plus a JSON manifest; an interrupted build resumes.
- :class:`SoftTargetCache` / :func:`open_cache` read rows by index (zero-copy where the rows
  are contiguous), check fingerprints, and verify shards lazily; :func:`verify_cache` checks
  them all.
- :class:`CachedDataset` pairs a dataset with its cached teacher rows for a DataLoader.
- Sparse caches (``build_cache(..., targets="topk" | "sampled" | "topk+sampled")``) store a
  few entries per item or per token of a causal LM and serve :class:`kdfast.SparseTargets`
  through :meth:`SoftTargetCache.sparse_targets` (see :mod:`kdfast.cache.sparse`).

See :mod:`kdfast.cache.format` for the directory layout.
"""

from kdfast.cache.build import BuildResult, build_cache, build_caches
from kdfast.cache.ensemble import combine_members
from kdfast.cache.fingerprint import fingerprint_dataset, fingerprint_module, fingerprint_teachers
from kdfast.cache.format import CacheCorruptError, CacheError, CacheMismatchError, load_manifest
from kdfast.cache.reader import CachedDataset, SoftTargetCache, open_cache, verify_cache

__all__ = [
    "BuildResult",
    "CacheCorruptError",
    "CacheError",
    "CacheMismatchError",
    "CachedDataset",
    "SoftTargetCache",
    "build_cache",
    "build_caches",
    "combine_members",
    "fingerprint_dataset",
    "fingerprint_module",
    "fingerprint_teachers",
    "load_manifest",
    "open_cache",
    "verify_cache",
]
