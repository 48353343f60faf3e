// CUDA implementation of kdfast::topk_targets (the sparse-cache builder). Same contract and the
// same per-element math as the CPU op (csrc/cpu/topk_targets.cpp): ranks, tail terms and the
// tail log-sum-exp are kdfast/topk_math.h's. The row code is topk_rows.cuh (written against a
// thread group, so tests/topk_host_sim.cpp runs it on host threads in every test run); this
// file has the block group, the kernel, the launch and the torch op.
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
#include "topk_rows.cuh"

namespace kdfast {
namespace cuda {
namespace {

using namespace topk_rows;

// The block as topk_rows.cuh's thread group.
struct BlockGroup {
  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return blockDim.x; }
  __device__ void barrier() const { __syncthreads(); }
  __device__ unsigned ballot(bool pred) const { return __ballot_sync(0xffffffffu, pred); }
  template <class V> __device__ V shfl_xor(V v, int offset) const { return __shfl_xor_sync(0xffffffffu, v, offset); }
  template <class V> __device__ V atomic_add(V* p, V v) const { return atomicAdd(p, v); }
};

template <class S> __global__ void __launch_bounds__(kThreads) topk_rows_kernel(const TopkKernelArgs a) {
  __shared__ Shared s;
  const BlockGroup g;
  for (int64_t i = blockIdx.x; i < a.n_rows; i += gridDim.x) topk_row<BlockGroup, S>(g, a, i, s);
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
    case at::kFloat: topk_rows_kernel<float><<<blocks, kThreads, 0, stream>>>(a); break;
    case at::kBFloat16: topk_rows_kernel<bf16_bits><<<blocks, kThreads, 0, stream>>>(a); break;
    default: topk_rows_kernel<f16_bits><<<blocks, kThreads, 0, stream>>>(a); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {in.indices, in.values, in.tails};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) { m.impl("topk_targets", &topk_targets_cuda); }

}  // namespace cuda
}  // namespace kdfast
