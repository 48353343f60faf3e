"""Sparse soft targets in a cache: what a row stores, how it is computed, how it is served.

A sparse cache stores per row (a dataset item, or one token of a sequence) a fixed-width
numpy record instead of the C logits of a dense row:

- ``targets="topk"``: ``ids`` (k,) the teacher's k largest logits' class ids, ``logits`` (k,)
  those logits (float16/bfloat16/float32), ``tail_logsumexp`` (n_T,) float32, per declared
  teacher temperature T_j: log sum_{i not in K} exp(z_i / T_j). All from the teacher's
  float32 logits (:func:`kdfast.topk_targets`). Bytes per row 2k + 2k + 4 n_T with uint16
  ids and 16-bit logits (ids are int32 when C > 65,536: 4k + 2k + 4 n_T).
- ``targets="sampled"``: ``ids`` (m,) the distinct ids of n draws from softmax(z / T_s) and
  ``counts`` (m,) uint16 how often each was drawn (count 0 = empty slot), m = min(n, C).
- ``targets="topk+sampled"``: the top-k head (``ids``, ``logits``, ``tail_logsumexp`` at
  T_s) plus ``sample_ids`` / ``counts`` of n draws from the tail distribution (softmax of
  z / T_s over the classes not in K).

Draws are a pure function of (seed, row key, draw number): a splitmix64 hash computed
vectorized in int64 gives each draw a uniform in [0, 1), and the inverse CDF (float64 cumsum
+ searchsorted) turns it into an id. Reruns, resumed builds, other batch sizes and torchrun
builds therefore draw the very same ids.

Why sampled rows serve only T = T_s (random-sampling KD, Anshumann et al., ACL 2025): with
p̂_i = c_i / n the served distribution and q = softmax(s / T), the loss is
L̂ = T² Σ_i p̂_i (log p̂_i − log q_i) with gradient ∂L̂/∂s_j = T (q_j − p̂_j). E[p̂] = p =
softmax(z / T_s), so E[∇L̂] = T (q − p) = ∇ T² KL(p ‖ q), the full-KL gradient, exactly when
T = T_s. The loss value is biased: E[L̂] − T² KL(p ‖ q) = T² (H(p) − E[H(p̂)]) ≥ 0. The same
holds for "topk+sampled", whose served p̃ is the exact head p_i plus P_R c_i / n on the tail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kdfast._ext import HAS_EXTENSION
from kdfast._sparse_checks import SparseTargets
from kdfast.cache.format import DTYPES, CacheMismatchError
from kdfast.topk import topk_targets

TARGETS = ("dense", "topk", "sampled", "topk+sampled")
SPARSE_TARGETS = TARGETS[1:]
# uint16 ids hold class ids 0..65,535.
MAX_UINT16_CLASSES = 1 << 16
MAX_COUNT = (1 << 16) - 1
# Rows of at most this many entries are sampled at a time: their float32 weights (16 MiB, plus
# the float64 CDF off the CPU) stay small enough to be reused by the allocator rather than
# mapped afresh (4x fewer entries per chunk ran 25 % faster than 1 << 24; NOTES 23).
SAMPLING_CHUNK = 1 << 22


@dataclass(frozen=True)
class SparseSpec:
    """What a sparse cache stores per row (recorded in the manifest as ``"targets"``).

    ``temperatures`` are the declared teacher temperatures of ``"topk"`` (tail log-sum-exps
    stored for each) and ``(T_s,)`` for the sampled kinds.
    """

    kind: str
    num_classes: int
    k: int = 0
    samples: int = 0
    temperatures: tuple[float, ...] = (1.0,)
    seed: int = 0
    logit_dtype: str = "float16"

    @property
    def id_dtype(self) -> np.dtype:
        return np.dtype("<u2") if self.num_classes <= MAX_UINT16_CLASSES else np.dtype("<i4")

    @property
    def sample_slots(self) -> int:
        """Distinct sampled ids a row can hold: n draws, at most the classes available."""
        return min(self.samples, self.num_classes - self.k) if self.samples else 0

    def record_dtype(self) -> np.dtype:
        """The packed numpy record of one row (field order = byte order on disk)."""
        fields = []
        if self.k:
            fields += [("ids", self.id_dtype, (self.k,)),
                       ("logits", DTYPES[self.logit_dtype][1], (self.k,)),
                       ("tail_logsumexp", np.dtype("<f4"), (len(self.temperatures),))]
        if self.samples:
            fields += [("sample_ids", self.id_dtype, (self.sample_slots,)),
                       ("counts", np.dtype("<u2"), (self.sample_slots,))]
        return np.dtype(fields)

    @property
    def bytes_per_row(self) -> int:
        return self.record_dtype().itemsize

    def to_json(self) -> dict:
        return {"kind": self.kind, "k": self.k, "samples": self.samples,
                "temperatures": list(self.temperatures), "seed": self.seed}

    @classmethod
    def from_manifest(cls, manifest: dict) -> SparseSpec:
        """The spec of a manifest's ``"targets"`` entry; ValueError if malformed."""
        t = manifest["targets"]
        if not isinstance(t, dict) or t.get("kind") not in SPARSE_TARGETS:
            raise ValueError(f"bad targets {t!r}")
        temps = t.get("temperatures")
        if not isinstance(temps, list) or not temps or not all(_is_temperature(x) for x in temps):
            raise ValueError(f"bad targets temperatures {temps!r}")
        for key in ("k", "samples", "seed"):
            if not isinstance(t.get(key), int) or isinstance(t.get(key), bool) or t[key] < 0:
                raise ValueError(f"bad targets {key} {t.get(key)!r}")
        spec = cls(t["kind"], manifest["num_classes"], t["k"], t["samples"], tuple(temps), t["seed"],
                   manifest["dtype"])
        spec.check()
        return spec

    def check(self) -> None:
        """ValueError naming the argument when the combination is not a valid cache spec."""
        c = self.num_classes
        if not 1 <= c < 1 << 31:  # int32 ids
            raise ValueError(f"num_classes must be in [1, 2**31), got {c}")
        needs_k, needs_n = self.kind != "sampled", self.kind != "topk"
        if needs_k != (self.k > 0) or (needs_k and not 1 <= self.k <= c):
            raise ValueError(f"k: targets={self.kind!r} needs " + (
                f"an int in [1, C = {c}]" if needs_k else "k unset") + f", got {self.k!r}")
        if needs_n != (self.samples > 0) or self.samples > MAX_COUNT:
            raise ValueError(f"samples: targets={self.kind!r} needs " + (
                f"an int in [1, {MAX_COUNT}]" if needs_n else "samples unset") + f", got {self.samples!r}")
        if self.kind == "topk+sampled" and self.k >= c:
            raise ValueError(f"k: targets='topk+sampled' samples the classes outside the top k, so "
                             f"k must be < C = {c}, got {self.k}")
        if needs_n and len(self.temperatures) != 1:
            raise ValueError(f"temperature: targets={self.kind!r} draws at one temperature T_s, got "
                             f"{list(self.temperatures)}")


def _is_temperature(t: object) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < math.inf


def make_spec(targets: str, num_classes: int, *, k: int | None, samples: int | None,
              temperatures: Sequence[float] | float | None, seed: int, logit_dtype: str) -> SparseSpec:
    """Validates build_cache's sparse arguments (each error names the argument)."""
    if targets not in SPARSE_TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    for name, value in (("k", k), ("samples", samples)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    temps = (temperatures,) if isinstance(temperatures, (int, float)) else tuple(temperatures or (1.0,))
    if not temps or not all(_is_temperature(t) for t in temps):
        raise ValueError(f"temperatures must be finite numbers > 0, got {temperatures!r}")
    if len(set(temps)) != len(temps):
        raise ValueError(f"temperatures must be distinct, got {list(temps)}")
    spec = SparseSpec(targets, num_classes, k or 0, samples or 0, tuple(float(t) for t in temps), seed,
                      logit_dtype)
    spec.check()
    return spec


# ----------------------------------------------------------------------------- sampling
_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GAMMA, _MUL1, _MUL2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 (Steele et al. 2014) of int64 tensors, wrapping like uint64."""
    z = x + _GAMMA
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def uniforms(seed: int, keys: torch.Tensor, draws: int) -> torch.Tensor:
    """``(R, draws)`` float64 uniforms in [0, 1): draw d of the row with key ``keys[r]``
    (an ``(R, 2)`` int64 pair: item or sequence id, position) is a hash of (seed, key, d)."""
    h = splitmix64(torch.full((len(keys), 1), seed, dtype=torch.int64, device=keys.device))
    h = splitmix64(h + keys[:, :1])
    h = splitmix64(h + keys[:, 1:2])
    h = splitmix64(h + torch.arange(draws, dtype=torch.int64, device=keys.device))
    return _shr(h, 11).to(torch.float64) * 2.0 ** -53


def draw_ids(log_weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: ``(R, n)`` ids from the distributions ∝ exp(log_weights), the
    weights' cumsum taken in float64 and searched for u · total. Only classes with a positive
    weight are drawn (x < total, so the found entry raised the cumsum); rows without mass
    give an arbitrary id (their draws are discarded).

    On the CPU the compiled ``kdfast::inverse_cdf_draws`` gives the same ids without the
    ``(R, C)`` float64 cumsum (its running sum is the same left-to-right float64 sum); else
    :func:`draw_ids_composite`."""
    return _draw(log_weights, log_weights.amax(-1, keepdim=True), u)


def draw_ids_composite(log_weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """:func:`draw_ids` from torch operations alone (the compiled op's oracle, and the path on
    other devices)."""
    return _search_cdf(_weights(log_weights, log_weights.amax(-1, keepdim=True)), u)


def _draw(log_weights: torch.Tensor, row_max: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """:func:`draw_ids` given the rows' max (the sampler needs it too: one pass, not two)."""
    w = _weights(log_weights, row_max)
    if w.is_cpu and _has_draws_op():
        return torch.ops.kdfast.inverse_cdf_draws(w, u.to(torch.float64))
    return _search_cdf(w, u)


def _weights(log_weights: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
    """exp(log_weights - row max) in float32; a row of -inf only gives zeros."""
    # In place on the difference: a second fresh (R, C) buffer costs more in page faults than the exp.
    return (log_weights - row_max.clamp(min=-3e38)).exp_()


def _search_cdf(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    cdf = torch.cumsum(w, dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    # u < 1, but u * total may round up to total: keep x strictly below it.
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).clamp(max=w.shape[-1] - 1)


def _has_draws_op() -> bool:
    return HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("kdfast::inverse_cdf_draws",
                                                                            "CPU")


if HAS_EXTENSION:

    @torch.library.register_fake("kdfast::inverse_cdf_draws")
    def _inverse_cdf_draws_fake(weights, uniforms):
        return uniforms.new_empty(uniforms.shape, dtype=torch.int64)


def count_distinct(ids: torch.Tensor, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, n)`` draws -> ``(R, slots)`` distinct ids (ascending) and their counts (0 = empty)."""
    ids = torch.sort(ids, dim=-1).values
    new = torch.ones_like(ids, dtype=torch.bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    slot = torch.cumsum(new.to(torch.int64), dim=-1) - 1
    counts = torch.zeros(len(ids), max(slots, ids.shape[1]), dtype=torch.int64, device=ids.device)
    counts.scatter_add_(1, slot, torch.ones_like(ids))
    distinct = torch.zeros_like(counts).scatter_(1, slot, ids)
    return distinct[:, :slots], counts[:, :slots]


def _sample(spec: SparseSpec, log_w: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws ``spec.samples`` ids per row from softmax(log_w) in row chunks of bounded memory."""
    chunk = max(1, SAMPLING_CHUNK // log_w.shape[-1])
    ids, counts = [], []
    for lo in range(0, len(log_w), chunk):
        part = log_w[lo:lo + chunk]
        row_max = part.amax(-1, keepdim=True)
        u = uniforms(spec.seed, keys[lo:lo + chunk], spec.samples)
        d, c = count_distinct(_draw(part, row_max, u), spec.sample_slots)
        empty = row_max == -math.inf  # a tail without mass
        ids.append(d.masked_fill(empty, 0))
        counts.append(c.masked_fill(empty, 0))
    return torch.cat(ids), torch.cat(counts)


# ----------------------------------------------------------------------------- encoding
def _store_logits(values: torch.Tensor, dtype: str) -> np.ndarray:
    stored = values.to(DTYPES[dtype][0]).cpu()
    if not torch.isfinite(stored).all() and torch.isfinite(values).all():
        raise ValueError(f"teacher logits (max |z| = {values.abs().max().item():.3g}) overflow dtype="
                         f"{dtype!r}; use dtype='bfloat16' or 'float32'")
    return stored.view(torch.uint16).numpy() if stored.dtype == torch.bfloat16 else stored.numpy()


def encode_rows(spec: SparseSpec, logits: torch.Tensor, keys: torch.Tensor) -> np.ndarray:
    """The records of ``(R, C)`` teacher logits (read in float32); ``keys`` ``(R, 2)`` int64
    name each row for the sampler (see :func:`uniforms`). Computed on the logits' device;
    only the k (n) entries per row come back to the CPU. (The same device and build give
    the same bytes; a float32 exp on another device may, rarely, move a draw.)"""
    z = logits.detach().float()
    records = np.zeros(len(z), dtype=spec.record_dtype())
    if spec.k:
        head = topk_targets(z, spec.k, spec.temperatures)
        records["ids"] = head.indices.cpu().numpy().astype(spec.id_dtype)
        records["logits"] = _store_logits(head.logits, spec.logit_dtype)
        records["tail_logsumexp"] = head.tail_logsumexp.cpu().numpy()
    if spec.samples:
        t_s = spec.temperatures[0]
        scaled = z if t_s == 1.0 else z / t_s  # z / 1 is z: spare the (R, C) copy
        if spec.k:  # the tail distribution: the head's classes get no mass
            scaled = scaled.scatter(-1, head.indices, -math.inf)
        ids, counts = _sample(spec, scaled, keys.to(z.device))
        records["sample_ids"] = ids.cpu().numpy().astype(spec.id_dtype)
        records["counts"] = counts.cpu().numpy().astype("<u2")
    return records


# ------------------------------------------------------------------------------ serving
def served_temperature_error(spec: SparseSpec, temperature: float, tail: str,
                             teacher_temperature: float | None = None) -> str | None:
    """Why ``spec``'s rows cannot be served to a loss at student ``temperature``, teacher
    temperature ``teacher_temperature`` (None = T) and ``tail`` (None: they can)."""
    if tail not in ("renormalize", "bucket"):
        return f"tail must be 'renormalize' or 'bucket', got {tail!r}"
    if spec.kind != "topk":
        t_s = spec.temperatures[0]
        if not math.isclose(temperature, t_s, rel_tol=1e-9):
            return (f"its ids were sampled at T_s={t_s}: the sampled-KD gradient is an unbiased "
                    f"estimate of the full-KL gradient only at the student temperature T = T_s, not "
                    f"T={temperature} (rebuild with --temperature {temperature})")
        if tail != "renormalize":
            return f"targets={spec.kind!r} serve tail='renormalize' only, not tail={tail!r}"
        if teacher_temperature not in (None, 1.0):
            return (f"targets={spec.kind!r} are served as log-probabilities at T_s, to be used with "
                    f"teacher_temperature=1.0, not {teacher_temperature}")
        return None
    t_t = temperature if teacher_temperature is None else teacher_temperature
    if tail == "bucket" and _declared(spec, t_t) is None:
        return (f"tail='bucket' needs the tail log-sum-exp at T_t={t_t}, stored only at the "
                f"declared temperatures {list(spec.temperatures)}; use one of them or "
                "tail='renormalize' (any T)")
    return None


def _declared(spec: SparseSpec, temperature: float) -> int | None:
    for j, t in enumerate(spec.temperatures):
        if math.isclose(temperature, t, rel_tol=1e-9):
            return j
    return None


def _ids(records: np.ndarray, field: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(records[field]).astype(np.int64))


def _head_logits(spec: SparseSpec, records: np.ndarray) -> torch.Tensor:
    raw = torch.from_numpy(np.ascontiguousarray(records["logits"]))
    return (raw.view(torch.bfloat16) if spec.logit_dtype == "bfloat16" else raw).float()


def decode_rows(spec: SparseSpec, records: np.ndarray, temperature: float,
                teacher_temperature: float | None = None) -> SparseTargets:
    """``(R,)`` records -> SparseTargets ``(R, slots)`` served at student ``temperature``.

    ``"topk"``: the raw logits (use ``teacher_temperature`` T_t as usual; None = T) and, when
    T_t is declared, its tail log-sum-exp (else None). ``"sampled"``: ``(ids, log count, None)``;
    ``"topk+sampled"``: head log p_i and tail log(P_R c_i / n), both at T_s: serve them with
    ``teacher_temperature=1``. Empty slots have id -1.
    """
    if spec.kind == "topk":
        j = _declared(spec, temperature if teacher_temperature is None else teacher_temperature)
        tails = torch.from_numpy(np.ascontiguousarray(records["tail_logsumexp"]))
        return SparseTargets(_ids(records, "ids"), _head_logits(spec, records),
                             None if j is None else tails[:, j].clone())
    counts = torch.from_numpy(records["counts"].astype(np.int64))
    sample_ids = _ids(records, "sample_ids").masked_fill(counts == 0, -1)
    log_counts = torch.log(counts.double().clamp(min=1)).float().masked_fill(counts == 0, 0.0)
    if spec.kind == "sampled":
        return SparseTargets(sample_ids, log_counts, None)
    t_s = spec.temperatures[0]
    z = _head_logits(spec, records).double() / t_s
    tail = torch.from_numpy(np.ascontiguousarray(records["tail_logsumexp"][:, 0])).double()
    log_total = torch.logaddexp(torch.logsumexp(z, dim=-1), tail)
    head = z - log_total[:, None]
    log_tail_mass = (tail - log_total)[:, None]
    log_samples = log_tail_mass + log_counts.double() - math.log(spec.samples)
    logits = torch.cat([head, log_samples.masked_fill(counts == 0, 0.0)], dim=-1).float()
    return SparseTargets(torch.cat([_ids(records, "ids"), sample_ids], dim=-1), logits, None)


def served_teacher_temperature(spec: SparseSpec) -> float | None:
    """The ``teacher_temperature`` to pass to the sparse loss with these targets: None (= T)
    for top-k logits, 1.0 for the sampled kinds (they are served as log-probabilities)."""
    return None if spec.kind == "topk" else 1.0


def refuse(spec: SparseSpec, temperature: float, tail: str, teacher_temperature: float | None,
           where: str) -> None:
    """Raises CacheMismatchError when ``spec`` cannot serve these loss settings."""
    problem = served_temperature_error(spec, temperature, tail, teacher_temperature)
    if problem:
        raise CacheMismatchError(f"cache {where} cannot serve this loss: {problem}")


__all__ = ["SPARSE_TARGETS", "TARGETS", "SparseSpec", "decode_rows", "encode_rows",
           "make_spec", "served_teacher_temperature", "splitmix64", "uniforms"]
