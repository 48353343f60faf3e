// CUDA implementation of kdfast::sparse_distill_fwd / sparse_distill_fwd_inplace (the sparse
// teacher: its logits at k ids per row, the rest as one bucket or renormalized away).
//
// Same contract and the same per-row steps as the CPU op (csrc/cpu/sparse_distill.cpp,
// csrc/cpu/sparse_rows.h): every formula is a sparse_math.h / kd_math.h step. The row code is
// sparse_rows.cuh (written against a thread group, so tests/sparse_host_sim.cpp runs it on host
// threads in every test run); this file has the block group, the kernel, the launch and the op.
//
// One block per row (rows grid-stride), 32..512 threads by C; the row's classes of K are marked
// in a bitmap of C bits in dynamic shared memory (16 KiB at C = 131072), so the rest's
// statistics need no sorted ids (the CPU sorts them in its validation pass) and no N x C
// scratch. HBM traffic per element of the row, with a gradient: the student read twice (pass 1:
// the rest's statistics with online rescaling; pass 2: the gradient) and the gradient written
// once: fp32 2 x 4 + 4 = 12 bytes (bf16 student: 2 x 2 + 2 = 6; fp16: 2 x 2 + 4 (fp32
// gradient) = 8; fp64: 24); without a gradient one read (4 bytes fp32). Per row, on top: the
// k ids, teacher logits (and the tail) once, about 16 bytes per slot (the slot passes re-read
// them, and the k gathered student logits, from L1/L2). Exps per element: 1 (softmax(s) shares
// them, or T = 2 / 4) or 2 (another T with a hard term) in each pass.
//
// Bad input the CPU op rejects before writing: a target outside [0, C) (not ignore_index) and an
// id outside [-1, C) trip a device-side assert (no host sync; such ids are skipped, so nothing
// outside the row is touched); in place, an asynchronous check of every target and id is queued
// before the kernel, so a bad one stops the stream before the student is half overwritten.
// Duplicate ids in a row are not detected here (documented: the CPU checks them).
#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "../op_common.h"
#include "../sparse_common.h"
#include "kdfast/kd_math.h"
#include "sparse_rows.cuh"

namespace kdfast {
namespace cuda {
namespace {

using math::bf16_bits;
using math::f16_bits;

constexpr int kMinThreads = 32;
constexpr int kMaxThreads = 512;

// The block as sparse_rows.cuh's thread group: group_allreduce's values in `red`, the row's
// bitmap of K in `bits` (dynamic shared memory).
template <class A>
struct SparseBlockGroup {
  A* red;
  unsigned* bits;
  int width;
  int rank;
  int lanes;  // 32

  __device__ __forceinline__ A shfl_xor(A v, int offset) const { return __shfl_xor_sync(0xffffffffu, v, offset); }
  __device__ __forceinline__ void barrier() const { __syncthreads(); }
  __device__ __forceinline__ void smem_store(int i, A v) const { red[i] = v; }
  __device__ __forceinline__ A smem_load(int i) const { return red[i]; }
  __device__ __forceinline__ void bits_clear(int w) const { bits[w] = 0u; }
  __device__ __forceinline__ void bits_or(int w, unsigned m) const { atomicOr(bits + w, m); }
  __device__ __forceinline__ unsigned bits_load(int w) const { return bits[w]; }
};

// One block per row. Expected HBM traffic per element of a row with a gradient: the student read
// twice and the gradient written once, 3 x 4 = 12 bytes for fp32 (bf16 6, fp16 8 with its fp32
// gradient, fp64 24); plus about 16 bytes per teacher slot. No N x C scratch.
// __launch_bounds__(512, 1) as distill.cu's block kernels: room for the row code's registers
// (ptxas -v, sm_80 / sm_90: 77-121 registers, no spills).
template <class S, class I, class Gd, class A, int V>
__global__ void __launch_bounds__(kMaxThreads, 1) sparse_rows_kernel(const SparseKernelArgs a) {
  __shared__ A red[rows::kSmemValues];
  extern __shared__ unsigned bits[];
  const SparseBlockGroup<A> g{red, bits, static_cast<int>(blockDim.x), static_cast<int>(threadIdx.x), 32};
  int parity = 0;
  for (int64_t row = blockIdx.x; row < a.n_rows; row += gridDim.x) {
    sparse_rows::process_sparse_row<S, I, Gd, A, V>(a, row, g, parity);
  }
}

int next_pow2(int64_t x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

template <class S, class I>
void launch_typed(const SparseKernelArgs& a, int device, cudaStream_t stream) {
  using Gd = math::grad_storage_t<S>;  // the gradient-dtype rule (kd_math.h)
  using A = std::conditional_t<std::is_same_v<S, double>, double, float>;
  constexpr int V = 16 / static_cast<int>(sizeof(S));
  auto kernel = sparse_rows_kernel<S, I, Gd, A, V>;
  // About 8 vectors per thread and pass.
  const int threads = std::clamp(next_pow2((static_cast<int64_t>(a.n_cols) + 8 * V - 1) / (8 * V)), kMinThreads,
                                 kMaxThreads);
  const size_t bitmap_bytes = static_cast<size_t>((a.n_cols + 31) / 32) * sizeof(unsigned);
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const size_t static_bytes = sizeof(A) * rows::kSmemValues;
  TORCH_CHECK_VALUE(bitmap_bytes + static_bytes <= static_cast<size_t>(optin),
                    "student_logits: the CUDA sparse kernel keeps a bitmap of the C classes in shared "
                    "memory and takes at most ", (static_cast<size_t>(optin) - static_bytes) * 8,
                    " classes on this device, got C = ", a.n_cols);
  if (bitmap_bytes > 48 * 1024 - static_bytes) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bitmap_bytes)));
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // Grid-stride over rows: enough blocks to fill every SM several times.
  const int64_t blocks = std::min<int64_t>(a.n_rows, static_cast<int64_t>(sms) * 32);
  kernel<<<static_cast<unsigned>(blocks), threads, bitmap_bytes, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class S>
void launch_student(const SparseKernelArgs& a, at::ScalarType id_type, int device, cudaStream_t stream) {
  if (id_type == at::kInt) return launch_typed<S, int32_t>(a, device, stream);
  return launch_typed<S, int64_t>(a, device, stream);
}

// In place: every target and id checked on the device before the kernel (no host sync), so a
// bad one stops the stream before any gradient overwrites the student.
void assert_inputs_in_range_async(const SparseInputs& in) {
  const at::Tensor& ids = in.ids;
  const at::Tensor ids_ok = ids.ge(-1).logical_and_(ids.lt(in.n_cols)).all();
  at::_assert_async(ids_ok, c10::str("kdfast: teacher.indices out of range: expected class ids in [0, ",
                                     in.n_cols, ") or -1 (an empty slot)"));
  if (!in.target.defined()) return;
  const at::Tensor& y = in.target;
  const at::Tensor y_ok = y.ge(0).logical_and_(y.lt(in.n_cols)).logical_or_(y.eq(in.params.ignore_index)).all();
  at::_assert_async(y_ok, c10::str("kdfast: target is out of range: expected class indices in [0, ", in.n_cols,
                                   ") or ignore_index=", in.params.ignore_index));
}

// Launches the rows on the current stream. `grad` may be undefined (no gradient wanted).
at::Tensor run(const SparseInputs& in, const at::Tensor& grad, bool average_rows) {
  TORCH_CHECK(in.student.is_cuda(), "kdfast: the CUDA kernel got student_logits on ", in.student.device());
  at::Tensor loss_rows = at::empty({in.n_rows}, in.student.options().dtype(loss_dtype(in.student)));
  if (in.n_rows == 0) return loss_rows;
  TORCH_CHECK_VALUE(in.n_cols <= INT_MAX, "kdfast: at most ", INT_MAX, " classes, got ", in.n_cols);

  SparseKernelArgs a{};
  a.student = in.student.data_ptr();
  a.student_row_stride = in.student.stride(0);
  a.ids = in.ids.data_ptr();
  a.k = in.k;
  a.teacher_logits = in.teacher_logits.data_ptr();
  a.tail = in.tail.defined() ? in.tail.data_ptr() : nullptr;
  a.target = in.target.defined() ? in.target.data_ptr<int64_t>() : nullptr;
  a.target_stride = in.target.defined() ? in.target.stride(0) : 0;
  a.loss_rows = loss_rows.data_ptr();
  a.grad = grad.defined() ? grad.data_ptr() : nullptr;
  a.grad_row_stride = grad.defined() ? grad.stride(0) : 0;
  a.n_rows = in.n_rows;
  a.n_cols = static_cast<int32_t>(in.n_cols);
  a.params = in.params;
  a.inv_teacher_temperature = in.inv_teacher_temperature;
  at::Tensor row_weight;  // kept alive until the launch is queued
  if (average_rows) {
    // 1 / max(counted rows, 1), computed on the device: no host sync. A row counts when its
    // target is not ignore_index or, without target, when it has a valid id.
    const at::Tensor counted = in.target.defined() ? in.target.ne(in.params.ignore_index).sum()
                                                   : in.ids.ge(0).any(1).sum();
    row_weight = counted.clamp_min(1).to(at::kDouble).reciprocal();
    a.row_weight = row_weight.data_ptr<double>();
  }

  const int device = in.student.get_device();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::ScalarType id_type = in.ids.scalar_type();
  switch (in.student.scalar_type()) {
    case at::kFloat: launch_student<float>(a, id_type, device, stream); break;
    case at::kBFloat16: launch_student<bf16_bits>(a, id_type, device, stream); break;
    case at::kHalf: launch_student<f16_bits>(a, id_type, device, stream); break;
    case at::kDouble: launch_student<double>(a, id_type, device, stream); break;
    default: TORCH_CHECK(false, "kdfast: unsupported student dtype ", in.student.scalar_type());
  }
  return loss_rows;
}

std::tuple<at::Tensor, at::Tensor> sparse_distill_fwd_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_ids, const at::Tensor& teacher_logits,
    const c10::optional<at::Tensor>& tail_logsumexp, const c10::optional<at::Tensor>& target,
    double temperature, double teacher_temperature, double alpha, c10::string_view kind, double beta,
    int64_t ignore_index, double label_smoothing, bool scale_by_t2, bool compute_grad,
    bool average_rows) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const SparseInputs in = prepare_sparse_inputs(
      student_logits, teacher_ids, teacher_logits, tail_logsumexp, target, temperature,
      teacher_temperature, alpha, kind, beta, ignore_index, label_smoothing, scale_by_t2,
      /*inplace=*/false);
  const auto options = in.student.options().dtype(grad_dtype(in.student));
  at::Tensor grad = compute_grad ? at::empty({in.n_rows, in.n_cols}, options) : at::empty({0}, options);
  at::Tensor loss_rows = run(in, compute_grad ? grad : at::Tensor(), average_rows);
  return {loss_rows, grad};
}

at::Tensor sparse_distill_fwd_inplace_cuda(
    at::Tensor& student_logits, const at::Tensor& teacher_ids, const at::Tensor& teacher_logits,
    const c10::optional<at::Tensor>& tail_logsumexp, const c10::optional<at::Tensor>& target,
    double temperature, double teacher_temperature, double alpha, c10::string_view kind, double beta,
    int64_t ignore_index, double label_smoothing, bool scale_by_t2, bool average_rows) {
  const c10::cuda::CUDAGuard guard(student_logits.device());
  const SparseInputs in = prepare_sparse_inputs(
      student_logits, teacher_ids, teacher_logits, tail_logsumexp, target, temperature,
      teacher_temperature, alpha, kind, beta, ignore_index, label_smoothing, scale_by_t2,
      /*inplace=*/true);
  if (in.n_rows > 0) assert_inputs_in_range_async(in);
  return run(in, student_logits, average_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CUDA, m) {
  m.impl("sparse_distill_fwd", &sparse_distill_fwd_cuda);
  m.impl("sparse_distill_fwd_inplace", &sparse_distill_fwd_inplace_cuda);
}

}  // namespace cuda
}  // namespace kdfast
