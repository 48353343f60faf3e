// CPU implementation of kdfast::distill_fwd / distill_fwd_inplace: argument preparation,
// instruction-set dispatch and threading over rows. The row math lives in csrc/cpu/rows.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../op_common.h"
#include "cpu_isa.h"
#include "kdfast/cpu_rows_api.h"

namespace kdfast {
namespace cpu {
namespace {

using RunRows = int64_t (*)(const RowsArgs&, int64_t, int64_t, void*);

RunRows rows_fn(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return avx512::run_rows;
    case Isa::kAvx2: return avx2::run_rows;
    default: return baseline::run_rows;
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

// KDFAST_CPU_LANES_MAX_C overrides kLanesMaxCols (0 turns the lane loops off): read per call,
// so tests can compare both loops on the same rows.
int64_t lanes_max_cols() {
  const char* env = std::getenv("KDFAST_CPU_LANES_MAX_C");
  if (env == nullptr || env[0] == '\0') return kLanesMaxCols;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && v >= 0, "KDFAST_CPU_LANES_MAX_C must be an integer >= 0, got '",
                    env, "'");
  return static_cast<int64_t>(v);
}

// Validates every target and returns how many rows count (target != ignore_index).
int64_t check_targets(const PreparedInputs& in) {
  const int64_t* y = in.target.data_ptr<int64_t>();
  const int64_t stride = in.target.stride(0);
  const int64_t ignore = in.params.ignore_index;
  int64_t counted = 0;
  for (int64_t i = 0; i < in.n_rows; ++i) {
    const int64_t v = y[i * stride];
    TORCH_CHECK_VALUE(v == ignore || (v >= 0 && v < in.n_cols), "target[", i, "] = ", v,
                      " is out of range: expected a class index in [0, ", in.n_cols,
                      ") or ignore_index=", ignore);
    counted += v != ignore;
  }
  return counted;
}

// Runs the rows across threads. `grad` may be undefined (no gradient wanted).
at::Tensor run(const PreparedInputs& in, const at::Tensor& grad, bool average_rows) {
  at::Tensor loss_rows = at::empty({in.n_rows}, in.student.options().dtype(loss_dtype(in.student)));
  if (in.n_rows == 0) return loss_rows;

  RowsArgs args{};
  args.student = in.student.data_ptr();
  args.student_row_stride = in.student.stride(0);
  args.teacher = in.teacher.data_ptr();
  args.teacher_row_stride = in.teacher.stride(0);
  args.target = in.target.defined() ? in.target.data_ptr<int64_t>() : nullptr;
  args.target_stride = in.target.defined() ? in.target.stride(0) : 0;
  args.loss_rows = loss_rows.data_ptr();
  args.grad = grad.defined() ? grad.data_ptr() : nullptr;
  args.grad_row_stride = grad.defined() ? grad.stride(0) : 0;
  args.n_rows = in.n_rows;
  args.n_cols = in.n_cols;
  args.student_dtype = dtype_code(in.student.scalar_type());
  args.teacher_dtype = dtype_code(in.teacher.scalar_type());
  args.params = in.params;
  args.lanes_max_cols = lanes_max_cols();

  // Validate every target before any row is written: in-place mode overwrites the student,
  // so a bad label found mid-way must not leave it half-replaced by gradients.
  const int64_t counted = in.target.defined() ? check_targets(in) : in.n_rows;
  if (average_rows) {
    math::scale_params(args.params, 1.0 / static_cast<double>(std::max<int64_t>(counted, 1)));
  }
  const RunRows fn = rows_fn(selected_isa());
  const size_t elem = in.student.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
  const int64_t scratch_bytes = scratch_elems(in.n_cols, args.lanes_max_cols) * static_cast<int64_t>(elem);
  // Rows are handed out in blocks from a shared counter, not split into one fixed range per
  // thread: on a shared host one core is often slower for a while, and a static split waits
  // for it (NOTES.md, entry 15). Threads are used when each gets at least 32 K elements
  // (MNIST's C = 10 rows take nanoseconds each); blocks are ~1/8 of a thread's rows, at most
  // 256 K elements (an imbalance of under a millisecond at the end), whole lane groups for
  // the lane loops.
  const int64_t C = in.n_cols;
  const int64_t min_rows = std::max<int64_t>(1, 32768 / C);
  const int64_t workers = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (in.n_rows + min_rows - 1) / min_rows));
  int64_t block_rows = std::min<int64_t>((in.n_rows + 8 * workers - 1) / (8 * workers),
                                         std::max<int64_t>(1, (int64_t(1) << 18) / C));
  block_rows = std::max<int64_t>(1, block_rows);
  if (C <= args.lanes_max_cols) block_rows = (block_rows + kLanes - 1) / kLanes * kLanes;
  const int64_t n_blocks = (in.n_rows + block_rows - 1) / block_rows;
  std::atomic<int64_t> next_block{0};
  std::atomic<int64_t> first_bad{in.n_rows};
  std::atomic<int> unsupported{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<char> scratch(static_cast<size_t>(scratch_bytes) + 64);
    void* aligned = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
    // Not nested in another parallel region, each worker is one thread; nested (run inline),
    // the first worker drains every block.
    for (int64_t b = next_block++; b < n_blocks; b = next_block++) {
      const int64_t begin = b * block_rows, end = std::min(in.n_rows, begin + block_rows);
      const int64_t bad = fn(args, begin, end, aligned);
      if (bad == -2) unsupported = 1;
      int64_t seen = first_bad.load();
      while (bad >= 0 && bad < seen && !first_bad.compare_exchange_weak(seen, bad)) {
      }
    }
  });
  TORCH_CHECK(!unsupported, "kdfast: unsupported dtype pair ", in.student.scalar_type(), "/",
              in.teacher.scalar_type());
  const int64_t bad = first_bad.load();
  TORCH_CHECK_VALUE(bad == in.n_rows, "target[", bad, "] = ", in.target[bad].item<int64_t>(),
                    " is out of range: expected a class index in [0, ", in.n_cols,
                    ") or ignore_index=", in.params.ignore_index);
  return loss_rows;
}

std::tuple<at::Tensor, at::Tensor> distill_fwd_cpu(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const c10::optional<at::Tensor>& target, double temperature, double alpha,
    c10::string_view kind, double beta, int64_t ignore_index, double label_smoothing,
    bool scale_by_t2, bool compute_grad, bool average_rows) {
  const PreparedInputs in = prepare_inputs(student_logits, teacher_logits, target, temperature,
                                           alpha, kind, beta, ignore_index, label_smoothing,
                                           scale_by_t2, /*inplace=*/false);
  at::Tensor grad = allocate_grad(in, compute_grad);
  at::Tensor loss_rows = run(in, compute_grad ? grad : at::Tensor(), average_rows);
  return {loss_rows, grad};
}

at::Tensor distill_fwd_inplace_cpu(
    at::Tensor& student_logits, const at::Tensor& teacher_logits,
    const c10::optional<at::Tensor>& target, double temperature, double alpha,
    c10::string_view kind, double beta, int64_t ignore_index, double label_smoothing,
    bool scale_by_t2, bool average_rows) {
  const PreparedInputs in = prepare_inputs(student_logits, teacher_logits, target, temperature,
                                           alpha, kind, beta, ignore_index, label_smoothing,
                                           scale_by_t2, /*inplace=*/true);
  return run(in, student_logits, average_rows);
}

}  // namespace

double exp_rate(double seconds) {
  using ExpProbe = float (*)(float*, int64_t, int64_t);
  const Isa isa = selected_isa();
  const ExpProbe probe = isa == Isa::kAvx512 ? avx512::exp_probe
                         : isa == Isa::kAvx2 ? avx2::exp_probe
                                             : baseline::exp_probe;
  constexpr int64_t kElems = 16384;  // 64 KiB per thread: in L1/L2
  constexpr int64_t kReps = 64;
  const int threads = at::get_num_threads();
  std::atomic<int64_t> total{0};
  const auto start = std::chrono::steady_clock::now();
  double elapsed = 0.0;
  while (elapsed < seconds) {
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        std::vector<float> buf(kElems, 0.5f);
        volatile float sink = probe(buf.data(), kElems, kReps);
        (void)sink;
        total += kElems * kReps;
      }
    });
    elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  return static_cast<double>(total.load()) / elapsed;
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("distill_fwd", &distill_fwd_cpu);
  m.impl("distill_fwd_inplace", &distill_fwd_inplace_cpu);
}

}  // namespace cpu
}  // namespace kdfast
