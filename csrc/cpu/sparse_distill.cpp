// CPU implementation of kdfast::sparse_distill_fwd / sparse_distill_fwd_inplace: the ids'
// validation (which also sorts each row's valid ids for the rows), instruction-set dispatch
// and threading over rows. The row loops live in csrc/cpu/sparse_rows.h, their math in
// csrc/include/kdfast/sparse_math.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "../op_common.h"
#include "../sparse_common.h"
#include "cpu_isa.h"
#include "kdfast/cpu_rows_api.h"

namespace kdfast {
namespace cpu {
namespace {

using RunSparseRows = int64_t (*)(const SparseRowsArgs&, int64_t, int64_t, void*);

RunSparseRows sparse_rows_fn(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return avx512::run_sparse_rows;
    case Isa::kAvx2: return avx2::run_sparse_rows;
    default: return baseline::run_sparse_rows;
  }
}

int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DT_F32;
    case at::kBFloat16: return DT_BF16;
    case at::kHalf: return DT_F16;
    default: return DT_F64;
  }
}

// Runs body(begin, end) over [0, n) in blocks handed out from a shared counter (a slow core
// does not hold the others up, NOTES.md entry 15), on up to at::get_num_threads() OpenMP
// threads, each at least min_per_thread items.
template <class F>
void parallel_blocks(int64_t n, int64_t min_per_thread, int64_t block, const F& body) {
  const int64_t workers = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (n + min_per_thread - 1) / min_per_thread));
  const int64_t n_blocks = (n + block - 1) / block;
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(static_cast<int>(workers))
  {
    for (int64_t b = next++; b < n_blocks; b = next++) body(b * block, std::min(n, (b + 1) * block));
  }
}

// What the validation found wrong with the first bad row (row -1: nothing).
struct IdError {
  int64_t row = -1;
  int64_t slot = 0;
  int64_t value = 0;
  bool duplicate = false;
};

// Row i's valid ids, sorted, into keys (sparse_key: id and slot), and its number of them; or
// the row's first id out of [-1, C), or its smallest id present twice.
template <class I>
IdError sort_row_ids(const I* ids, int64_t i, int64_t k, int64_t C, int64_t* keys, int32_t* n_valid) {
  int64_t nk = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t id = static_cast<int64_t>(ids[i * k + j]);
    if (id < -1 || id >= C) return IdError{i, j, id, false};
    if (id >= 0) keys[i * k + nk++] = sparse_key(id, j);
  }
  std::sort(keys + i * k, keys + i * k + nk);
  for (int64_t j = 1; j < nk; ++j) {
    const int64_t id = sparse_key_id(keys[i * k + j]);
    if (id == sparse_key_id(keys[i * k + j - 1])) return IdError{i, sparse_key_slot(keys[i * k + j]), id, true};
  }
  n_valid[i] = static_cast<int32_t>(nk);
  return IdError{};
}

// Checks every row's ids and targets before any row is computed (in-place mode overwrites
// the student: nothing may be half written on bad input), sorting the valid ids for the rows.
// Returns the number of rows that count (README: a target != ignore_index, or without
// target at least one valid id).
int64_t validate_rows(const SparseInputs& in, at::Tensor& keys, at::Tensor& n_valid) {
  const int64_t N = in.n_rows, k = in.k, C = in.n_cols;
  int64_t* key_ptr = keys.data_ptr<int64_t>();
  int32_t* nv_ptr = n_valid.data_ptr<int32_t>();
  std::atomic<int64_t> first_bad{N};
  parallel_blocks(N, std::max<int64_t>(1, 16384 / k), 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const IdError e = in.ids.scalar_type() == at::kInt
                            ? sort_row_ids(in.ids.data_ptr<int32_t>(), i, k, C, key_ptr, nv_ptr)
                            : sort_row_ids(in.ids.data_ptr<int64_t>(), i, k, C, key_ptr, nv_ptr);
      if (e.row < 0) continue;
      int64_t seen = first_bad.load();
      while (i < seen && !first_bad.compare_exchange_weak(seen, i)) {
      }
      break;  // later rows of this block cannot be the first bad one
    }
  });
  const int64_t bad = first_bad.load();
  if (bad < N) {
    const IdError e = in.ids.scalar_type() == at::kInt
                          ? sort_row_ids(in.ids.data_ptr<int32_t>(), bad, k, C, key_ptr, nv_ptr)
                          : sort_row_ids(in.ids.data_ptr<int64_t>(), bad, k, C, key_ptr, nv_ptr);
    TORCH_CHECK_VALUE(!e.duplicate, "teacher.indices[", bad, "] holds class id ", e.value,
                      " more than once: expected distinct ids per row (-1 marks an empty slot)");
    TORCH_CHECK_VALUE(false, "teacher.indices[", bad, ", ", e.slot, "] = ", e.value,
                      " is out of range: expected a class id in [0, ", C,
                      ") or -1 (an empty slot)");
  }
  if (!in.target.defined()) {
    int64_t counted = 0;
    for (int64_t i = 0; i < N; ++i) counted += nv_ptr[i] > 0;
    return counted;
  }
  const int64_t* y = in.target.data_ptr<int64_t>();
  const int64_t stride = in.target.stride(0), ignore = in.params.ignore_index;
  int64_t counted = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t v = y[i * stride];
    TORCH_CHECK_VALUE(v == ignore || (v >= 0 && v < C), "target[", i, "] = ", v,
                      " is out of range: expected a class index in [0, ", C, ") or ignore_index=",
                      ignore);
    counted += v != ignore;
  }
  return counted;
}

// Validates, then runs the rows across threads. `grad` may be undefined (no gradient).
at::Tensor run_sparse(const SparseInputs& in, const at::Tensor& grad, bool average_rows) {
  at::Tensor loss_rows = at::empty({in.n_rows}, in.student.options().dtype(loss_dtype(in.student)));
  if (in.n_rows == 0) return loss_rows;
  at::Tensor keys = at::empty({in.n_rows, in.k}, in.ids.options().dtype(at::kLong));
  at::Tensor n_valid = at::empty({in.n_rows}, in.ids.options().dtype(at::kInt));
  const int64_t counted = validate_rows(in, keys, n_valid);

  SparseRowsArgs args{};
  args.student = in.student.data_ptr();
  args.student_row_stride = in.student.stride(0);
  args.keys = keys.data_ptr<int64_t>();
  args.n_valid = n_valid.data_ptr<int32_t>();
  args.k = in.k;
  args.teacher_logits = in.teacher_logits.data_ptr();
  args.tail = in.tail.defined() ? in.tail.data_ptr() : nullptr;
  args.target = in.target.defined() ? in.target.data_ptr<int64_t>() : nullptr;
  args.target_stride = in.target.defined() ? in.target.stride(0) : 0;
  args.loss_rows = loss_rows.data_ptr();
  args.grad = grad.defined() ? grad.data_ptr() : nullptr;
  args.grad_row_stride = grad.defined() ? grad.stride(0) : 0;
  args.n_rows = in.n_rows;
  args.n_cols = in.n_cols;
  args.student_dtype = dtype_code(in.student.scalar_type());
  args.params = in.params;
  args.inv_teacher_temperature = in.inv_teacher_temperature;
  if (average_rows) {
    math::scale_params(args.params, 1.0 / static_cast<double>(std::max<int64_t>(counted, 1)));
  }

  const RunSparseRows fn = sparse_rows_fn(selected_isa());
  const size_t elem = in.student.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t scratch_bytes = static_cast<size_t>(sparse_scratch_elems(in.n_cols, in.k)) * elem + 64;
  const int64_t C = in.n_cols;
  // As the dense op: threads when each gets at least 32 K elements, blocks of at most 256 K.
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>((int64_t(1) << 18) / C, 64));
  std::atomic<int> unsupported{0};
  parallel_blocks(in.n_rows, std::max<int64_t>(1, 32768 / C), block, [&](int64_t begin, int64_t end) {
    thread_local std::vector<char> scratch;
    if (scratch.size() < scratch_bytes) scratch.resize(scratch_bytes);
    void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    if (fn(args, begin, end, aligned) == -2) unsupported = 1;
  });
  TORCH_CHECK(!unsupported, "kdfast: unsupported student dtype ", in.student.scalar_type());
  return loss_rows;
}

std::tuple<at::Tensor, at::Tensor> sparse_distill_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_ids, const at::Tensor& teacher_logits,
    const c10::optional<at::Tensor>& tail_logsumexp, const c10::optional<at::Tensor>& target,
    double temperature, double teacher_temperature, double alpha, c10::string_view kind, double beta,
    int64_t ignore_index, double label_smoothing, bool scale_by_t2, bool compute_grad,
    bool average_rows) {
  const SparseInputs in = prepare_sparse_inputs(
      student_logits, teacher_ids, teacher_logits, tail_logsumexp, target, temperature,
      teacher_temperature, alpha, kind, beta, ignore_index, label_smoothing, scale_by_t2,
      /*inplace=*/false);
  const auto options = in.student.options().dtype(grad_dtype(in.student));
  at::Tensor grad = compute_grad ? empty_output({in.n_rows, in.n_cols}, options) : at::empty({0}, options);
  at::Tensor loss_rows = run_sparse(in, compute_grad ? grad : at::Tensor(), average_rows);
  return {loss_rows, grad};
}

at::Tensor sparse_distill_fwd_inplace_cpu(
    at::Tensor& student_logits, const at::Tensor& teacher_ids, const at::Tensor& teacher_logits,
    const c10::optional<at::Tensor>& tail_logsumexp, const c10::optional<at::Tensor>& target,
    double temperature, double teacher_temperature, double alpha, c10::string_view kind, double beta,
    int64_t ignore_index, double label_smoothing, bool scale_by_t2, bool average_rows) {
  const SparseInputs in = prepare_sparse_inputs(
      student_logits, teacher_ids, teacher_logits, tail_logsumexp, target, temperature,
      teacher_temperature, alpha, kind, beta, ignore_index, label_smoothing, scale_by_t2,
      /*inplace=*/true);
  return run_sparse(in, student_logits, average_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("sparse_distill_fwd", &sparse_distill_fwd_cpu);
  m.impl("sparse_distill_fwd_inplace", &sparse_distill_fwd_inplace_cpu);
}

}  // namespace cpu
}  // namespace kdfast
