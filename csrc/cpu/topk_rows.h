// CPU row loops of kdfast::topk_targets (the sparse-cache builder), over raw pointers.
//
// Compiled once per instruction set like rows.h (csrc/cpu/isa/topk_*.cpp set `#pragma GCC
// target` and KDFAST_ISA first), so nothing here may have external linkage outside the ISA
// namespace: the std algorithms are instantiated with a comparator from this file's anonymous
// namespace, which gives their instantiations internal linkage (one ISA's copy can never be
// linked into another's path). The per-element math is kdfast/topk_math.h's.
//
// Per row (topk_math.h has the formulas):
//   pass 1 (selection), after a vectorized NaN/+inf check of the row: the first k + 1
//     elements enter a candidate buffer; then, block by block, a vectorized maximum is
//     compared with the buffer's threshold, and only in blocks holding a larger element are
//     the elements of each 16-lane compare mask offered. A full buffer is compacted to its
//     k + 1 best (nth_element), which raises the threshold.
//   pass 2 (tail): the row, still in L2, once per chunk of kRowChunk: its tail terms at each
//     temperature (vectorized exps) and, when the (k+1)-th value equals the k-th, the count of
//     elements at that value. Meanwhile the next row is prefetched into L2, so pass 1 of the
//     next row does not wait on memory while the exps leave the memory bus idle.
#pragma once

#include "kdfast/topk_math.h"
#include "kdfast/topk_rows_api.h"

#include <algorithm>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kdfast {
namespace cpu {
namespace KDFAST_ISA {
namespace {

using ::kdfast::math::bf16_bits;
using ::kdfast::math::f16_bits;
using ::kdfast::math::kd_max;
using ::kdfast::math::to_acc;
using namespace ::kdfast::topk;

// Ranks sort in descending order: the best candidate first.
struct RankBefore {
  bool operator()(uint64_t a, uint64_t b) const { return a > b; }
};

// Elements per block of pass 1's vectorized maximum. Past the first blocks of a row hardly any
// block holds a newcomer (about (k + 1) ln(C / (k + 1)) elements enter a random row in all),
// and in a block that does, only the elements of its 16-lane masks are visited.
constexpr int64_t kScanBlock = 256;
constexpr int64_t kMaskLanes = 16;

// Bit j set when z[j] beats the threshold (beats_threshold: z > threshold, ordered), for 16
// elements: one compare per vector instead of 16 scalar compares and branches.
inline uint32_t beats_mask16(const float* z, float threshold) {
#if defined(__AVX512F__)
  return _mm512_cmp_ps_mask(_mm512_loadu_ps(z), _mm512_set1_ps(threshold), _CMP_GT_OQ);
#elif defined(__AVX__)
  const __m256 t = _mm256_set1_ps(threshold);
  const uint32_t lo = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(z), t, _CMP_GT_OQ)));
  const uint32_t hi = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(z + 8), t, _CMP_GT_OQ)));
  return lo | (hi << 8);
#elif defined(__SSE2__)
  const __m128 t = _mm_set1_ps(threshold);
  uint32_t m = 0;
  for (int q = 0; q < 4; ++q) {
    m |= static_cast<uint32_t>(_mm_movemask_ps(_mm_cmpgt_ps(_mm_loadu_ps(z + 4 * q), t))) << (4 * q);
  }
  return m;
#else
  uint32_t m = 0;
  for (int j = 0; j < 16; ++j) m |= static_cast<uint32_t>(beats_threshold(z[j], threshold)) << j;
  return m;
#endif
}

// The row in float32: in place for float rows, else widened into buf (the row then stays in
// L2 for pass 2).
template <class S>
const float* row_as_float(const S* src, float* buf, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) buf[k] = to_acc<float>(src[k]);
  return buf;
}
inline const float* row_as_float(const float* src, float*, int64_t) { return src; }

// The candidate buffer of pass 1: ranks (topk_math.h) of the elements that may still be among
// the row's `keep` = min(k + 1, C) best.
struct Selection {
  uint64_t* ranks;
  int64_t size;
  int64_t keep;
  int64_t capacity;
  float threshold;  // the value of the keep-th best so far: only larger elements can enter
};

// Keeps the `keep` best candidates (in no order) and raises the threshold to the last of them.
inline void compact(Selection& s) {
  std::nth_element(s.ranks, s.ranks + s.keep - 1, s.ranks + s.size, RankBefore{});
  s.size = s.keep;
  s.threshold = rank_value(s.ranks[s.keep - 1]);
}

// Offers element j to the selection (it beat the threshold when its block was looked at; a
// compaction since may have raised the threshold).
inline void offer(const float* z, int64_t j, Selection& s) {
  if (!beats_threshold(z[j], s.threshold)) return;
  s.ranks[s.size++] = rank_of(z[j], static_cast<uint32_t>(j));
  if (s.size == s.capacity) compact(s);
}

// The elements of [b, e) that beat the threshold, 16 lanes' mask at a time.
inline void scan_block(const float* z, int64_t b, int64_t e, Selection& s) {
  int64_t g = b;
  for (; g + kMaskLanes <= e; g += kMaskLanes) {
    for (uint32_t m = beats_mask16(z + g, s.threshold); m != 0; m &= m - 1) {
      offer(z, g + __builtin_ctz(m), s);
    }
  }
  for (; g < e; ++g) offer(z, g, s);
}

// Whether the row holds a NaN or +inf: one vectorized pass (it also brings the row into cache
// for the scan).
inline bool has_invalid(const float* z, int64_t n) {
  int invalid = 0;
#pragma omp simd reduction(| : invalid)
  for (int64_t j = 0; j < n; ++j) invalid |= invalid_logit(z[j]);
  return invalid != 0;
}

// Pass 1: after it, ranks[0, keep) holds the row's keep best in order. With a NaN or +inf in
// the row the selection is unspecified, but every access stays in bounds (the ranks are a
// total order); the caller refuses such rows.
inline void select_row(const float* z, int64_t n_cols, Selection& s) {
  const int64_t keep = s.keep;
#pragma omp simd
  for (int64_t j = 0; j < keep; ++j) s.ranks[j] = rank_of(z[j], static_cast<uint32_t>(j));
  s.size = keep;
  if (keep < n_cols) compact(s);
  for (int64_t b = keep; b < n_cols; b += kScanBlock) {
    const int64_t e = b + kScanBlock < n_cols ? b + kScanBlock : n_cols;
    float block_max = -static_cast<float>(INFINITY);
#pragma omp simd reduction(max : block_max)
    for (int64_t j = b; j < e; ++j) block_max = kd_max(block_max, z[j]);
    if (beats_threshold(block_max, s.threshold)) scan_block(z, b, e, s);
  }
  if (s.size > keep) compact(s);
  std::sort(s.ranks, s.ranks + keep, RankBefore{});
}

// Prefetches bytes [b0, b1) of a row into L2 (locality 2), one line at a time. Written in
// line: GCC drops __builtin_prefetch calls from a function it deems pure (rows.h, NOTES 13).
#define KDFAST_TOPK_PREFETCH(base, b0, b1)                                  \
  for (int64_t x_ = (b0); x_ < (b1); x_ += 64) __builtin_prefetch((base) + x_, 0, 2)

// Pass 2 and the outputs of row i (ranks sorted by select_row).
template <class S>
void finish_row(const TopkArgs& g, int64_t i, const float* z, const uint64_t* ranks, double* sums,
                const float* inv_t) {
  const int64_t C = g.n_cols, k = g.k, n_t = g.n_temps;
  const float kth = z[rank_id(ranks[k - 1])];
  const bool has_tail = k < C;
  const float tail_max = has_tail ? z[rank_id(ranks[k])] : -static_cast<float>(INFINITY);
  const bool empty = tail_is_empty(has_tail, tail_max);
  // Unselected elements equal to kth exist only when the (k+1)-th value is kth itself.
  const bool count_ties = !empty && tail_max == kth;
  for (int64_t j = 0; j < n_t; ++j) sums[j] = 0.0;
  int64_t ties_in_row = 0, ties_selected = 0;
  const char* next_row = nullptr;
  if (g.prefetch_next_row && i + 1 < g.n_rows) {
    next_row = reinterpret_cast<const char*>(static_cast<const S*>(g.logits) + (i + 1) * g.row_stride);
  }
  for (int64_t k0 = 0; !empty && k0 < C; k0 += kRowChunk) {
    const int64_t k1 = k0 + kRowChunk < C ? k0 + kRowChunk : C;
    if (next_row) KDFAST_TOPK_PREFETCH(next_row, k0 * int64_t(sizeof(S)), k1 * int64_t(sizeof(S)));
    for (int64_t j = 0; j < n_t; ++j) {
      const float inv = inv_t[j];
      float part = 0.0f;
#pragma omp simd reduction(+ : part)
      for (int64_t c = k0; c < k1; ++c) part += tail_term(z[c], kth, tail_max, inv);
      sums[j] += part;  // per-chunk float sums, added in double: no long float accumulation
    }
    if (count_ties) {
      int64_t ties = 0;
#pragma omp simd reduction(+ : ties)
      for (int64_t c = k0; c < k1; ++c) ties += z[c] == kth;
      ties_in_row += ties;
    }
  }
  if (count_ties) {
    for (int64_t r = k - 1; r >= 0 && z[rank_id(ranks[r])] == kth; --r) ++ties_selected;
  }
  int64_t* out_ids = g.indices + i * k;
  float* out_values = g.values + i * k;
  for (int64_t r = 0; r < k; ++r) {
    const uint32_t id = rank_id(ranks[r]);
    out_ids[r] = id;
    out_values[r] = z[id];
  }
  float* out_tails = g.tails + i * n_t;
  for (int64_t j = 0; j < n_t; ++j) {
    const double sum = tail_sum_with_ties(sums[j], ties_in_row, ties_selected);
    out_tails[j] = tail_logsumexp(empty, tail_max, g.temperatures[j], sum);
  }
}

inline char* align64(char* p) {
  return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

template <class S>
int64_t run_topk_typed(const TopkArgs& g, int64_t begin, int64_t end, char* scratch) {
  const int64_t C = g.n_cols;
  const int64_t capacity = topk_capacity(C, g.k);
  char* p = align64(scratch);
  Selection s{reinterpret_cast<uint64_t*>(p), 0, g.k + 1 < C ? g.k + 1 : C, capacity, 0.0f};
  p = align64(p + capacity * int64_t(sizeof(uint64_t)));
  float* row_buf = reinterpret_cast<float*>(p);
  p = align64(p + C * int64_t(sizeof(float)));
  double* sums = reinterpret_cast<double*>(p);
  float* inv_t = reinterpret_cast<float*>(sums + g.n_temps);
  for (int64_t j = 0; j < g.n_temps; ++j) inv_t[j] = static_cast<float>(1.0 / g.temperatures[j]);
  for (int64_t i = begin; i < end; ++i) {
    const S* src = static_cast<const S*>(g.logits) + i * g.row_stride;
    const float* z = row_as_float(src, row_buf, C);
    if (has_invalid(z, C)) return i;
    select_row(z, C, s);
    finish_row<S>(g, i, z, s.ranks, sums, inv_t);
  }
  return -1;
}

}  // namespace

int64_t run_topk_rows(const TopkArgs& g, int64_t begin, int64_t end, void* scratch) {
  char* w = static_cast<char*>(scratch);
  if (g.dtype == DT_F32) return run_topk_typed<float>(g, begin, end, w);
  if (g.dtype == DT_BF16) return run_topk_typed<bf16_bits>(g, begin, end, w);
  if (g.dtype == DT_F16) return run_topk_typed<f16_bits>(g, begin, end, w);
  return -2;
}

}  // namespace KDFAST_ISA
}  // namespace cpu
}  // namespace kdfast
