// The CUDA row code of kdfast::topk_targets, written against a thread group so that
// tests/topk_host_sim.cpp runs the same code on host threads (no GPU needed); the kernel and
// the op are csrc/cuda/topk_targets.cu, the formulas kdfast/topk_math.h.
//
// A group G provides rank(), size() (a multiple of 32, at most kThreads), barrier() (the
// block's __syncthreads), ballot(pred) and shfl_xor(v, offset) within the caller's warp of 32,
// and atomic_add(p, v) on shared memory.
#pragma once

#include <stdint.h>

#include "kdfast/topk_math.h"

#if defined(__CUDACC__)
#define TOPK_DEV __device__ __forceinline__
#else
#define TOPK_DEV inline
#endif

namespace kdfast {
namespace cuda {
namespace topk_rows {

using math::bf16_bits;
using math::f16_bits;
using namespace ::kdfast::topk;

TOPK_DEV int popcount32(unsigned v) {
#if defined(__CUDA_ARCH__)
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxKeep = 2048;  // a power of two: the bitonic sort's width
constexpr int kMaxTemps = 8;
constexpr int kRadixBits = 8;
constexpr int kBins = 1 << kRadixBits;

struct TopkKernelArgs {
  const void* logits;
  int64_t row_stride;
  int64_t n_rows, n_cols, k;
  int n_temps;
  float inv_t[kMaxTemps];
  double temperature[kMaxTemps];
  int64_t* indices;
  float* values;
  float* tails;
};

template <class S> TOPK_DEV float load(const S* row, int64_t j) { return math::to_acc<float>(row[j]); }

template <class G, class V> TOPK_DEV V warp_sum(const G& g, V v) {
  for (int o = 16; o > 0; o >>= 1) v += g.shfl_xor(v, o);
  return v;
}

// Shared memory of one block.
struct Shared {
  uint64_t ranks[kMaxKeep];
  unsigned hist[kBins];
  double sums[kWarps][kMaxTemps];
  long long ties[kWarps];
  int warp_counts[kWarps];
  uint32_t prefix;
  int remaining;
  int n_ranks;
};

// Step 1: the key of the keep-th largest element; s.remaining = how many elements at that key
// are in the top `keep` (the smallest ids among them).
template <class G, class S> TOPK_DEV uint32_t radix_select(const G& g, const S* row, int64_t C, int keep, Shared& s) {
  uint32_t prefix = 0, mask = 0;
  int remaining = keep;
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int b = g.rank(); b < kBins; b += g.size()) s.hist[b] = 0;
    g.barrier();
    for (int64_t j = g.rank(); j < C; j += g.size()) {
      const uint32_t key = static_cast<uint32_t>(rank_of(load(row, j), 0u) >> 32);
      if ((key & mask) == prefix) g.atomic_add(&s.hist[(key >> shift) & (kBins - 1)], 1u);
    }
    g.barrier();
    if (g.rank() == 0) {
      int above = 0;
      for (int d = kBins - 1; d >= 0; --d) {
        const int h = static_cast<int>(s.hist[d]);
        if (above + h >= remaining) {
          s.prefix = prefix | (static_cast<uint32_t>(d) << shift);
          s.remaining = remaining - above;
          break;
        }
        above += h;
      }
    }
    g.barrier();
    prefix = s.prefix;
    remaining = s.remaining;
    mask |= static_cast<uint32_t>(kBins - 1) << shift;
    g.barrier();  // s.prefix / s.remaining are rewritten next round
  }
  return prefix;
}

// Step 2: the ranks of the top `keep` into s.ranks (in no order): every element above the
// threshold key and the first s.remaining at it, counted in id order tile by tile.
template <class G, class S> TOPK_DEV void collect(const G& g, const S* row, int64_t C, uint32_t threshold, Shared& s) {
  const int warp = g.rank() / 32, lane = g.rank() % 32;
  const int wanted = s.remaining;
  if (g.rank() == 0) s.n_ranks = 0;
  g.barrier();
  int ties_before = 0;  // ties at the threshold in earlier tiles (the same in every thread)
  for (int64_t tile = 0; tile < C; tile += g.size()) {
    const int64_t j = tile + g.rank();
    const float z = j < C ? load(row, j) : 0.0f;
    const uint64_t rank = rank_of(z, static_cast<uint32_t>(j));
    const uint32_t key = static_cast<uint32_t>(rank >> 32);
    const bool above = j < C && key > threshold;
    const bool tie = j < C && key == threshold;
    const unsigned ballot = g.ballot(tie);
    if (lane == 0) s.warp_counts[warp] = popcount32(ballot);
    g.barrier();
    int offset = 0, tile_ties = 0;
    for (int w = 0; w < kWarps; ++w) {
      offset += w < warp ? s.warp_counts[w] : 0;
      tile_ties += s.warp_counts[w];
    }
    const int tie_index = ties_before + offset + popcount32(ballot & ((1u << lane) - 1u));
    if (above || (tie && tie_index < wanted)) s.ranks[g.atomic_add(&s.n_ranks, 1)] = rank;
    ties_before += tile_ties;
    g.barrier();  // warp_counts is rewritten by the next tile
  }
}

// Step 3: s.ranks[0, width) in descending order (width a power of two; the slots past keep
// hold 0, below every real rank).
template <class G> TOPK_DEV void sort_ranks(const G& g, Shared& s, int keep, int width) {
  for (int i = keep + g.rank(); i < width; i += g.size()) s.ranks[i] = 0;
  g.barrier();
  for (int size = 2; size <= width; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int i = g.rank(); i < width / 2; i += g.size()) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool descending = (lo & size) == 0;
        const uint64_t a = s.ranks[lo], b = s.ranks[hi];
        if ((a < b) == descending) {
          s.ranks[lo] = b;
          s.ranks[hi] = a;
        }
      }
      g.barrier();
    }
  }
}

// Step 4: the tail's log-sum-exp at each temperature, written by thread 0.
template <class G, class S>
TOPK_DEV void tail_sums(const G& g, const S* row, const TopkKernelArgs& a, int64_t i, Shared& s) {
  const int64_t C = a.n_cols, k = a.k;
  const float kth = load(row, rank_id(s.ranks[k - 1]));
  const bool has_tail = k < C;
  const float tail_max = has_tail ? load(row, rank_id(s.ranks[k])) : -static_cast<float>(INFINITY);
  const bool empty = tail_is_empty(has_tail, tail_max);
  const bool count_ties = !empty && tail_max == kth;
  float acc[kMaxTemps];
#pragma unroll
  for (int t = 0; t < kMaxTemps; ++t) acc[t] = 0.0f;
  long long ties = 0;
  for (int64_t j = g.rank(); !empty && j < C; j += g.size()) {
    const float z = load(row, j);
#pragma unroll
    for (int t = 0; t < kMaxTemps; ++t) {
      if (t < a.n_temps) acc[t] += tail_term(z, kth, tail_max, a.inv_t[t]);
    }
    ties += count_ties && z == kth;
  }
  const int warp = g.rank() / 32, lane = g.rank() % 32;
#pragma unroll
  for (int t = 0; t < kMaxTemps; ++t) {
    const double v = warp_sum(g, static_cast<double>(acc[t]));
    if (lane == 0) s.sums[warp][t] = v;
  }
  ties = warp_sum(g, ties);
  if (lane == 0) s.ties[warp] = ties;
  g.barrier();
  if (g.rank() == 0) {
    long long ties_in_row = 0, ties_selected = 0;
    for (int w = 0; w < kWarps; ++w) ties_in_row += s.ties[w];
    for (int64_t r = k - 1; count_ties && r >= 0 && load(row, rank_id(s.ranks[r])) == kth; --r) ++ties_selected;
    for (int t = 0; t < a.n_temps; ++t) {
      double sum = 0.0;
      for (int w = 0; w < kWarps; ++w) sum += s.sums[w][t];
      sum = tail_sum_with_ties(sum, ties_in_row, ties_selected);
      a.tails[i * a.n_temps + t] = tail_logsumexp(empty, tail_max, a.temperature[t], sum);
    }
  }
}

// One row with the group g (a CUDA block; host threads in the simulation).
template <class G, class S> TOPK_DEV void topk_row(const G& g, const TopkKernelArgs& a, int64_t i, Shared& s) {
  const int64_t C = a.n_cols;
  const int keep = static_cast<int>(a.k + 1 < C ? a.k + 1 : C);
  int width = 1;
  while (width < keep) width <<= 1;
  const S* row = static_cast<const S*>(a.logits) + i * a.row_stride;
  const uint32_t threshold = radix_select(g, row, C, keep, s);
  collect(g, row, C, threshold, s);
  sort_ranks(g, s, keep, width);
  for (int64_t r = g.rank(); r < a.k; r += g.size()) {
    const uint32_t id = rank_id(s.ranks[r]);
    a.indices[i * a.k + r] = id;
    a.values[i * a.k + r] = load(row, id);
  }
  tail_sums(g, row, a, i, s);
  g.barrier();  // s is reused by the next row
}

}  // namespace topk_rows
}  // namespace cuda
}  // namespace kdfast
