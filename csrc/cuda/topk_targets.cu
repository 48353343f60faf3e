// CUDA implementation of kdfast::topk_targets (the sparse-cache builder). Same contract and the
// same per-element math as the CPU op (csrc/cpu/topk_targets.cpp): ranks, tail terms and the
// tail log-sum-exp are kdfast/topk_math.h's.
//
// One block per row (rows grid-stride):
//   1. Radix select on the 32-bit order keys (4 rounds of 8 bits, a shared-memory histogram
//      per round): the key t of the (k+1)-th largest element and how many elements at key t
//      belong to the top k + 1 (the smallest ids among them).
//   2. Collection in id order, tile by tile: elements above t, and the first ones at t (a
//      block-wide ordered count of ties), as ranks into shared memory (k + 1 <= kMaxKeep).
//   3. A bitonic sort of the ranks in shared memory: the top k in order, kth and tail_max.
//   4. The tail sums at each temperature (one float per thread and temperature, reduced in
//      double) and the count of unselected ties, as on the CPU.
// The row is read 6 times (4 histograms, the collection, the tail); a block's row (<= 512 KiB
// at C = 131072 fp32) stays in L2 between the reads while the rows in flight fit there.
// k + 1 > kMaxKeep or more than kMaxTemps temperatures are refused here (kdfast.topk_targets
// routes them to the reference); NaN/+inf rows are refused by the Python wrapper before the
// launch (a device-side check would need a host sync to raise), and stay memory-safe here.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../topk_common.h"
#include "kdfast/topk_math.h"

namespace kdfast {
namespace cuda {
namespace {

using math::bf16_bits;
using math::f16_bits;
using namespace ::kdfast::topk;

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

template <class S> __device__ __forceinline__ float load(const S* row, int64_t j) {
  return math::to_acc<float>(row[j]);
}

template <class V> __device__ __forceinline__ V warp_sum(V v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
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
template <class S> __device__ uint32_t radix_select(const S* row, int64_t C, int keep, Shared& s) {
  uint32_t prefix = 0, mask = 0;
  int remaining = keep;
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int b = threadIdx.x; b < kBins; b += blockDim.x) s.hist[b] = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const uint32_t key = static_cast<uint32_t>(rank_of(load(row, j), 0u) >> 32);
      if ((key & mask) == prefix) atomicAdd(&s.hist[(key >> shift) & (kBins - 1)], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
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
    __syncthreads();
    prefix = s.prefix;
    remaining = s.remaining;
    mask |= static_cast<uint32_t>(kBins - 1) << shift;
    __syncthreads();  // s.prefix / s.remaining are rewritten next round
  }
  return prefix;
}

// Step 2: the ranks of the top `keep` into s.ranks (in no order): every element above the
// threshold key and the first s.remaining at it, counted in id order tile by tile.
template <class S> __device__ void collect(const S* row, int64_t C, uint32_t threshold, Shared& s) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wanted = s.remaining;
  if (threadIdx.x == 0) s.n_ranks = 0;
  __syncthreads();
  int ties_before = 0;  // ties at the threshold in earlier tiles (the same in every thread)
  for (int64_t tile = 0; tile < C; tile += blockDim.x) {
    const int64_t j = tile + threadIdx.x;
    const float z = j < C ? load(row, j) : 0.0f;
    const uint64_t rank = rank_of(z, static_cast<uint32_t>(j));
    const uint32_t key = static_cast<uint32_t>(rank >> 32);
    const bool above = j < C && key > threshold;
    const bool tie = j < C && key == threshold;
    const unsigned ballot = __ballot_sync(0xffffffffu, tie);
    if (lane == 0) s.warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int offset = 0, tile_ties = 0;
    for (int w = 0; w < kWarps; ++w) {
      offset += w < warp ? s.warp_counts[w] : 0;
      tile_ties += s.warp_counts[w];
    }
    const int tie_index = ties_before + offset + __popc(ballot & ((1u << lane) - 1u));
    if (above || (tie && tie_index < wanted)) s.ranks[atomicAdd(&s.n_ranks, 1)] = rank;
    ties_before += tile_ties;
    __syncthreads();  // warp_counts is rewritten by the next tile
  }
}

// Step 3: s.ranks[0, width) in descending order (width a power of two; the slots past keep
// hold 0, below every real rank).
__device__ void sort_ranks(Shared& s, int keep, int width) {
  for (int i = keep + threadIdx.x; i < width; i += blockDim.x) s.ranks[i] = 0;
  __syncthreads();
  for (int size = 2; size <= width; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < width / 2; i += blockDim.x) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool descending = (lo & size) == 0;
        const uint64_t a = s.ranks[lo], b = s.ranks[hi];
        if ((a < b) == descending) {
          s.ranks[lo] = b;
          s.ranks[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

// Step 4: the tail's log-sum-exp at each temperature, written by thread 0.
template <class S>
__device__ void tail_sums(const S* row, const TopkKernelArgs& a, int64_t i, Shared& s) {
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
  for (int64_t j = threadIdx.x; !empty && j < C; j += blockDim.x) {
    const float z = load(row, j);
#pragma unroll
    for (int t = 0; t < kMaxTemps; ++t) {
      if (t < a.n_temps) acc[t] += tail_term(z, kth, tail_max, a.inv_t[t]);
    }
    ties += count_ties && z == kth;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int t = 0; t < kMaxTemps; ++t) {
    const double v = warp_sum(static_cast<double>(acc[t]));
    if (lane == 0) s.sums[warp][t] = v;
  }
  ties = warp_sum(ties);
  if (lane == 0) s.ties[warp] = ties;
  __syncthreads();
  if (threadIdx.x == 0) {
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

template <class S> __global__ void __launch_bounds__(kThreads) topk_rows(const TopkKernelArgs a) {
  __shared__ Shared s;
  const int64_t C = a.n_cols;
  const int keep = static_cast<int>(a.k + 1 < C ? a.k + 1 : C);
  int width = 1;
  while (width < keep) width <<= 1;
  for (int64_t i = blockIdx.x; i < a.n_rows; i += gridDim.x) {
    const S* row = static_cast<const S*>(a.logits) + i * a.row_stride;
    const uint32_t threshold = radix_select(row, C, keep, s);
    collect(row, C, threshold, s);
    sort_ranks(s, keep, width);
    for (int64_t r = threadIdx.x; r < a.k; r += blockDim.x) {
      const uint32_t id = rank_id(s.ranks[r]);
      a.indices[i * a.k + r] = id;
      a.values[i * a.k + r] = load(row, id);
    }
    tail_sums(row, a, i, s);
    __syncthreads();  // s is reused by the next row
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_targets_cuda(const at::Tensor& teacher_logits,
                                                                 int64_t k,
                                                                 at::ArrayRef<double> temperatures) {
  const TopkInputs in = prepare_topk(teacher_logits, k, temperatures);
  TORCH_CHECK_VALUE(std::min<int64_t>(k + 1, in.n_cols) <= kMaxKeep, "k: the CUDA kernel takes k < ",
                    kMaxKeep, " (or k = C <= ", kMaxKeep, "), got ", k,
                    " (kdfast.topk_targets uses the reference for it)");
  TORCH_CHECK_VALUE(static_cast<int>(temperatures.size()) <= kMaxTemps,
                    "temperatures: the CUDA kernel takes at most ", kMaxTemps, ", got ", temperatures.size());
  if (in.n_rows == 0) return {in.indices, in.values, in.tails};
  const c10::cuda::CUDAGuard guard(teacher_logits.device());
  TopkKernelArgs a{};
  a.logits = in.rows.const_data_ptr();
  a.row_stride = in.rows.stride(0);
  a.n_rows = in.n_rows;
  a.n_cols = in.n_cols;
  a.k = k;
  a.n_temps = static_cast<int>(temperatures.size());
  for (int t = 0; t < a.n_temps; ++t) {
    a.temperature[t] = temperatures[t];
    a.inv_t[t] = static_cast<float>(1.0 / temperatures[t]);
  }
  a.indices = in.indices.data_ptr<int64_t>();
  a.values = in.values.data_ptr<float>();
  a.tails = in.tails.data_ptr<float>();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, teacher_logits.get_device()));
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(in.n_rows, int64_t(sms) * 4));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (in.rows.scalar_type()) {
    case at::kFloat: topk_rows<float><<<blocks, kThreads, 0, stream>>>(a); break;
    case at::kBFloat16: topk_rows<bf16_bits><<<blocks, kThreads, 0, stream>>>(a); break;
    default: topk_rows<f16_bits><<<blocks, kThreads, 0, stream>>>(a); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {in.indices, in.values, in.tails};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) { m.impl("topk_targets", &topk_targets_cuda); }

}  // namespace cuda
}  // namespace kdfast
