// CUDA implementation of kdfast::distill_fwd / distill_fwd_inplace.
//
// Same contract and the same per-row steps as the CPU op (csrc/cpu/distill.cpp, csrc/cpu/rows.h):
// every formula is a kd_math.h function. The per-row passes are in distill_rows.cuh (written
// against a thread group, so tests/cuda_host_sim.cpp runs them on host threads in every test run);
// this file has the thread groups, the kernels, the launch choice and the torch op.
//
// Work split. A row is processed by a group of threads that cooperates through reductions:
//   * C <= 1024 (kSubWarpMaxCols): a sub-warp of 4..32 lanes per row (shuffle reductions with the
//     group's lane mask), many rows per 256-thread block. MNIST's C = 10 takes 4 lanes, so one
//     warp serves 8 rows instead of leaving 22 of 32 lanes idle.
//   * C > 1024: one block (128..512 threads) per row, warp shuffles + shared memory between warps;
//     or several blocks per row when there are too few rows for the SMs (see below).
// Both loop over rows grid-stride, so any N fits the grid.
//
// Passes over the row (distill_rows.cuh; the steps are kd_math.h's, as on the CPU): 1. each
// thread's maxima, exp sums and cross sum with online rescaling, merged across the group;
// kl / reverse_kl have their soft loss from it; 2. jsd only: the sum of its log-mixture terms;
// last: the gradient, exps recomputed relative to the row maxima (logit_mse: with its sum of
// centred squares, reduced after it). The CPU stashes its exps; a
// GPU row of 32k-128k classes cannot stay in shared memory, and the kernel is memory-bound with
// arithmetic headroom, so each pass re-reads s and t: kl and reverse_kl read a row twice (20
// bytes of HBM traffic per fp32 element with the gradient), jsd three times (28 bytes).
// Exps per element: pass 1 2-3 (+ about one per vector of rescaling while a thread's maxima
// still rise); jsd's pass 2: 2 + 1 exp/1 log; the gradient pass: as pass 1 (+ jsd's mixture).
// Large C with too few rows for the SMs (N < 2 x SMs): each row is split across up to 64 blocks
// (segments of >= 4096 classes) in three stream-ordered kernels (statistics, jsd's or logit_mse's
// soft sums, gradient) that exchange 11 values per block through a small (N, splits) workspace;
// the row's reads stay two (kl, reverse_kl) or three (jsd, logit_mse).
//
// Loads are vectorized (16 bytes of the wider input per step: 4 x f32, 8 x 16-bit, 2 x f64) when
// the student and teacher rows share their misalignment, after a scalar head that reaches
// alignment, so any C (10, 50257, ...) and any row stride vectorize when the tensors are
// contiguous; otherwise the row falls back to coalesced scalar accesses. Gradient stores are
// vectorized when the gradient row is aligned like the student row (always for fresh or in-place
// gradients of contiguous inputs). The element -> thread map depends on s and t only, so the
// row sums (and the losses) are bitwise the same with or without a gradient, in place or not.
//
// In place, the gradient is written over the student row: every pass maps elements to threads
// the same way, so each element is read and then written by one thread, and the label logit s[y]
// is read by rank 0 before the first reduction (a barrier) so no gradient store can precede it.
//
// A target outside [0, C) and != ignore_index trips a device-side assert (no host sync), as
// torch's own cross-entropy does; in place, an asynchronous check of every target is queued
// before the kernel (assert_targets_in_range_async), so the student is never half overwritten.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../op_common.h"
#include "distill_rows.cuh"
#include "kdfast/kd_math.h"

namespace kdfast {
namespace cuda {
namespace {

using math::bf16_bits;
using math::f16_bits;

constexpr int kSubWarpMaxCols = 1024;   // above: one block per row
constexpr int kSubWarpBlockThreads = 256;
constexpr int kMinRowBlockThreads = 128;
constexpr int kMaxRowBlockThreads = 512;

// `width` consecutive lanes of one warp (4..32, a power of two) own one row.
struct SubWarp {
  unsigned mask;
  int width;
  int rank;
  int lanes;  // == width: the whole group is one warp's lanes, reduced by shuffles alone

  template <class A>
  __device__ __forceinline__ A shfl_xor(A v, int offset) const { return __shfl_xor_sync(mask, v, offset); }
  __device__ __forceinline__ void barrier() const {}
  template <class A> __device__ __forceinline__ void smem_store(int, A) const {}
  template <class A = float> __device__ __forceinline__ A smem_load(int) const { return A(0); }
  // Orders rank 0's read of the label logit before the group's gradient stores (in place).
  __device__ __forceinline__ void sync() const { __syncwarp(mask); }
};

// The whole block owns one row; group_allreduce goes through `red` (kSmemValues) between warps.
template <class A>
struct BlockGroup {
  A* red;
  int width;
  int rank;
  int lanes;  // 32

  __device__ __forceinline__ A shfl_xor(A v, int offset) const { return __shfl_xor_sync(0xffffffffu, v, offset); }
  __device__ __forceinline__ void barrier() const { __syncthreads(); }
  __device__ __forceinline__ void smem_store(int i, A v) const { red[i] = v; }
  __device__ __forceinline__ A smem_load(int i) const { return red[i]; }
  // The reduction's __syncthreads already orders the label read before any store.
  __device__ __forceinline__ void sync() const {}
};

// Small C: `group` lanes (4..32) per row, kSubWarpBlockThreads / group rows per block.
template <class S, class T, class Gd, class A, int V>
__global__ void __launch_bounds__(kSubWarpBlockThreads) distill_rows_subwarp(const KernelArgs a, int group) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const unsigned mask = group == 32 ? 0xffffffffu : (((1u << group) - 1u) << (lane & ~(group - 1)));
  const SubWarp grp{mask, group, lane & (group - 1), group};
  const int rows_per_block = static_cast<int>(blockDim.x) / group;
  const int64_t step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  int parity = 0;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / group;
       row < a.n_rows; row += step) {
    rows::process_row<S, T, Gd, A, V>(a, row, grp, parity);
  }
}

// Large C: one block per row (the row-uniform branches keep __syncthreads block-uniform).
// __launch_bounds__(512, 1): with the thread bound alone ptxas held these kernels to 64
// registers and spilled (16-28 bytes); with one block per SM allowed 128 it spills none (the
// CI build fails on a stack frame).
template <class S, class T, class Gd, class A, int V>
__global__ void __launch_bounds__(kMaxRowBlockThreads, 1) distill_rows_block(const KernelArgs a) {
  __shared__ A red[rows::kSmemValues];
  const BlockGroup<A> grp{red, static_cast<int>(blockDim.x), static_cast<int>(threadIdx.x), 32};
  int parity = 0;
  for (int64_t row = blockIdx.x; row < a.n_rows; row += gridDim.x) {
    rows::process_row<S, T, Gd, A, V>(a, row, grp, parity);
  }
}

// Small N, large C: a.splits blocks per row, three stages (distill_rows.cuh, rows split across
// groups); Stage picks the step.
enum class Stage { kStats, kSoft, kFinish };
template <Stage kStage, class S, class T, class Gd, class A, int V>
__global__ void __launch_bounds__(kMaxRowBlockThreads, 1) distill_split_rows(const KernelArgs a) {
  __shared__ A red[rows::kSmemValues];
  const BlockGroup<A> grp{red, static_cast<int>(blockDim.x), static_cast<int>(threadIdx.x), 32};
  int parity = 0;
  const int64_t units = a.n_rows * a.splits;
  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    if constexpr (kStage == Stage::kStats) {
      rows::split_stats<S, T, Gd, A, V>(a, unit, grp, parity);
    } else if constexpr (kStage == Stage::kSoft) {
      rows::split_soft<S, T, Gd, A, V>(a, unit, grp, parity);
    } else {
      rows::split_finish<S, T, Gd, A, V>(a, unit, grp);
    }
  }
}

// Blocks per row for rows of more than kSubWarpMaxCols classes: enough units for two blocks per
// SM, each segment at least kMinSplitCols classes, at most kMaxSplits per row.
constexpr int64_t kMinSplitCols = 4096;
constexpr int64_t kMaxSplits = 64;
int split_count(int64_t n_rows, int64_t n_cols, int sms) {
  const int64_t wanted = (2 * static_cast<int64_t>(sms) + n_rows - 1) / n_rows;
  return static_cast<int>(std::max<int64_t>(1, std::min({wanted, n_cols / kMinSplitCols, kMaxSplits})));
}

int next_pow2(int64_t x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

template <class S, class T, class Gd, class A>
void launch_typed(const KernelArgs& a, cudaStream_t stream) {
  // 16 bytes of the wider input per vector step.
  constexpr int V = 16 / static_cast<int>(sizeof(S) > sizeof(T) ? sizeof(S) : sizeof(T));
  const int64_t max_grid = INT_MAX;
  if (a.n_cols <= kSubWarpMaxCols) {
    // About 4 vectors per lane and pass: C = 10 -> 4 lanes, C = 1024 (f32) -> 32 lanes.
    int group = next_pow2((a.n_cols + 4 * V - 1) / (4 * V));
    group = group < 4 ? 4 : (group > 32 ? 32 : group);
    const int rows_per_block = kSubWarpBlockThreads / group;
    const int64_t blocks = std::min<int64_t>((a.n_rows + rows_per_block - 1) / rows_per_block, max_grid);
    distill_rows_subwarp<S, T, Gd, A, V>
        <<<static_cast<unsigned>(blocks), kSubWarpBlockThreads, 0, stream>>>(a, group);
  } else {
    // About 8 vectors per thread and pass, 128..512 threads.
    int threads = next_pow2((static_cast<int64_t>(a.n_cols) + 8 * V - 1) / (8 * V));
    threads = threads < kMinRowBlockThreads ? kMinRowBlockThreads
                                            : (threads > kMaxRowBlockThreads ? kMaxRowBlockThreads : threads);
    if (a.splits > 1) {
      const int64_t blocks = std::min<int64_t>(a.n_rows * a.splits, max_grid);
      const unsigned grid = static_cast<unsigned>(blocks);
      distill_split_rows<Stage::kStats, S, T, Gd, A, V><<<grid, threads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (a.params.kind == math::KIND_JSD || a.params.kind == math::KIND_LOGIT_MSE) {
        distill_split_rows<Stage::kSoft, S, T, Gd, A, V><<<grid, threads, 0, stream>>>(a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      distill_split_rows<Stage::kFinish, S, T, Gd, A, V><<<grid, threads, 0, stream>>>(a);
    } else {
      const int64_t blocks = std::min<int64_t>(a.n_rows, max_grid);
      distill_rows_block<S, T, Gd, A, V><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(a);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class S>
void launch_student(const KernelArgs& a, at::ScalarType teacher, cudaStream_t stream) {
  using Gd = math::grad_storage_t<S>;  // the gradient-dtype rule (kd_math.h)
  switch (teacher) {
    case at::kFloat: return launch_typed<S, float, Gd, float>(a, stream);
    case at::kBFloat16: return launch_typed<S, bf16_bits, Gd, float>(a, stream);
    case at::kHalf: return launch_typed<S, f16_bits, Gd, float>(a, stream);
    default: TORCH_CHECK(false, "kdfast: unsupported teacher dtype ", teacher);
  }
}

void check_cuda(const PreparedInputs& in) {
  // prepare_inputs already checked that student, teacher and target share one device.
  TORCH_CHECK(in.student.is_cuda(), "kdfast: the CUDA kernel got student_logits on ", in.student.device());
}

// Launches the rows on the current stream. `grad` may be undefined (no gradient wanted).
at::Tensor run(const PreparedInputs& in, const at::Tensor& grad, bool average_rows) {
  at::Tensor loss_rows = at::empty({in.n_rows}, in.student.options().dtype(loss_dtype(in.student)));
  if (in.n_rows == 0) return loss_rows;
  TORCH_CHECK_VALUE(in.n_cols <= INT_MAX, "kdfast: at most ", INT_MAX, " classes, got ", in.n_cols);

  KernelArgs a{};
  a.student = in.student.data_ptr();
  a.student_row_stride = in.student.stride(0);
  a.teacher = in.teacher.data_ptr();
  a.teacher_row_stride = in.teacher.stride(0);
  a.target = in.target.defined() ? in.target.data_ptr<int64_t>() : nullptr;
  a.target_stride = in.target.defined() ? in.target.stride(0) : 0;
  a.loss_rows = loss_rows.data_ptr();
  a.grad = grad.defined() ? grad.data_ptr() : nullptr;
  a.grad_row_stride = grad.defined() ? grad.stride(0) : 0;
  a.n_rows = in.n_rows;
  a.n_cols = static_cast<int32_t>(in.n_cols);
  a.params = in.params;
  at::Tensor row_weight;  // kept alive until the launch is queued
  if (average_rows && in.target.defined()) {
    // 1 / max(counted rows, 1), computed on the device: no host sync.
    row_weight = in.target.ne(in.params.ignore_index).sum().clamp_min(1).to(at::kDouble).reciprocal();
    a.row_weight = row_weight.data_ptr<double>();
  } else if (average_rows) {
    math::scale_params(a.params, 1.0 / static_cast<double>(in.n_rows));
  }

  // Small N with large C: split each row across blocks so the GPU has work for every SM.
  a.splits = 1;
  a.split_cols = a.n_cols;
  at::Tensor records;  // freed in stream order after the launches
  if (in.n_cols > kSubWarpMaxCols) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, in.student.get_device()));
    const int splits = split_count(in.n_rows, in.n_cols, sms);
    if (splits > 1) {
      // Segments of a multiple of 16 classes: aligned rows keep aligned vector loads.
      a.split_cols = static_cast<int32_t>((in.n_cols + splits - 1) / splits + 15) / 16 * 16;
      a.splits = static_cast<int32_t>((in.n_cols + a.split_cols - 1) / a.split_cols);
      records = at::empty({in.n_rows * a.splits * rows::kRecordValues},
                          in.student.options().dtype(loss_dtype(in.student)));
      a.records = records.data_ptr();
    }
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType st = in.student.scalar_type();
  const at::ScalarType tt = in.teacher.scalar_type();
  if (st == at::kDouble || tt == at::kDouble) {
    TORCH_CHECK(st == at::kDouble && tt == at::kDouble, "kdfast: unsupported dtype pair ", st, "/", tt);
    launch_typed<double, double, double, double>(a, stream);
  } else if (st == at::kFloat) {
    launch_student<float>(a, tt, stream);
  } else if (st == at::kBFloat16) {
    launch_student<bf16_bits>(a, tt, stream);
  } else if (st == at::kHalf) {
    launch_student<f16_bits>(a, tt, stream);
  } else {
    TORCH_CHECK(false, "kdfast: unsupported student dtype ", st);
  }
  return loss_rows;
}

std::tuple<at::Tensor, at::Tensor> distill_fwd_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const c10::optional<at::Tensor>& target, double temperature, double alpha,
    c10::string_view kind, double beta, int64_t ignore_index, double label_smoothing,
    bool scale_by_t2, bool compute_grad, bool average_rows) {
  // prepare_inputs' tensor ops guard their own device; it also checks that all inputs share one.
  const PreparedInputs in = prepare_inputs(student_logits, teacher_logits, target, temperature,
                                           alpha, kind, beta, ignore_index, label_smoothing,
                                           scale_by_t2, /*inplace=*/false);
  check_cuda(in);
  const c10::cuda::CUDAGuard guard(in.student.device());
  at::Tensor grad = allocate_grad(in, compute_grad);
  at::Tensor loss_rows = run(in, compute_grad ? grad : at::Tensor(), average_rows);
  return {loss_rows, grad};
}

at::Tensor distill_fwd_inplace_cuda(
    at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const c10::optional<at::Tensor>& target, double temperature, double alpha,
    c10::string_view kind, double beta, int64_t ignore_index, double label_smoothing,
    bool scale_by_t2, bool average_rows) {
  const PreparedInputs in = prepare_inputs(student_logits, teacher_logits, target, temperature,
                                           alpha, kind, beta, ignore_index, label_smoothing,
                                           scale_by_t2, /*inplace=*/true);
  check_cuda(in);
  const c10::cuda::CUDAGuard guard(in.student.device());
  // A bad target must stop the stream before the kernel writes any gradient over the student.
  assert_targets_in_range_async(in);
  return run(in, student_logits, average_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("distill_fwd", &distill_fwd_cuda);
  m.impl("distill_fwd_inplace", &distill_fwd_inplace_cuda);
}

}  // namespace cuda
}  // namespace kdfast
