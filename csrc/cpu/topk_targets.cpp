// CPU implementation of kdfast::topk_targets (the sparse-cache builder): argument checks,
// instruction-set dispatch and OpenMP threading over rows. The row loops are
// csrc/cpu/topk_rows.h, their math kdfast/topk_math.h; the Python wrapper (kdfast/topk.py)
// documents the op.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <tuple>
#include <vector>

#include "../topk_common.h"
#include "cpu_isa.h"
#include "kdfast/topk_rows_api.h"

namespace kdfast {
namespace cpu {
namespace {

using RunTopkRows = int64_t (*)(const TopkArgs&, int64_t, int64_t, void*);

RunTopkRows topk_rows_fn(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return avx512::run_topk_rows;
    case Isa::kAvx2: return avx2::run_topk_rows;
    default: return baseline::run_topk_rows;
  }
}

int32_t topk_dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DT_F32;
    case at::kBFloat16: return DT_BF16;
    case at::kHalf: return DT_F16;
    default: return -1;
  }
}

// KDFAST_TOPK_PREFETCH=0 turns pass 2's prefetch of the next row off (benchmarks compare
// both); read per call.
bool prefetch_next_row() {
  const char* env = std::getenv("KDFAST_TOPK_PREFETCH");
  return env == nullptr || env[0] != '0';
}

// Runs rows [0, N) across OpenMP threads in blocks from a shared counter (as distill.cpp:
// a slow core on a shared host does not hold up a static split). Returns -1 or the first row
// (of those seen) holding a NaN or +inf.
int64_t run_rows_parallel(const TopkArgs& args) {
  const int64_t n = args.n_rows, C = args.n_cols;
  const RunTopkRows fn = topk_rows_fn(selected_isa());
  const int64_t scratch_bytes = topk_scratch_bytes(C, args.k, args.n_temps);
  const int64_t min_rows = std::max<int64_t>(1, 32768 / C);
  const int64_t workers = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), (n + min_rows - 1) / min_rows));
  const int64_t block_rows = std::max<int64_t>(
      1, std::min<int64_t>((n + 8 * workers - 1) / (8 * workers), std::max<int64_t>(1, (int64_t(1) << 18) / C)));
  const int64_t n_blocks = (n + block_rows - 1) / block_rows;
  std::atomic<int64_t> next_block{0};
  std::atomic<int64_t> first_invalid{n};
  std::atomic<bool> stop{false};
#pragma omp parallel num_threads(static_cast<int>(workers))
  {
    std::vector<char> scratch(static_cast<size_t>(scratch_bytes));
    for (int64_t b = next_block++; b < n_blocks && !stop; b = next_block++) {
      const int64_t begin = b * block_rows, end = std::min(n, begin + block_rows);
      const int64_t bad = fn(args, begin, end, scratch.data());
      if (bad < 0) continue;
      stop = true;  // the call raises: the other rows need not finish
      int64_t seen = first_invalid.load();
      while (bad < seen && !first_invalid.compare_exchange_weak(seen, bad)) {
      }
    }
  }
  const int64_t bad = first_invalid.load();
  return bad == n ? -1 : bad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_targets_cpu(const at::Tensor& teacher_logits,
                                                                int64_t k,
                                                                at::ArrayRef<double> temperatures) {
  const TopkInputs in = prepare_topk(teacher_logits, k, temperatures);
  if (in.n_rows == 0) return {in.indices, in.values, in.tails};
  TopkArgs args{};
  args.logits = in.rows.const_data_ptr();
  args.row_stride = in.rows.stride(0);
  args.dtype = topk_dtype_code(in.rows.scalar_type());
  args.n_rows = in.n_rows;
  args.n_cols = in.n_cols;
  args.k = k;
  args.temperatures = temperatures.data();
  args.n_temps = static_cast<int64_t>(temperatures.size());
  args.indices = in.indices.data_ptr<int64_t>();
  args.values = in.values.data_ptr<float>();
  args.tails = in.tails.data_ptr<float>();
  args.prefetch_next_row = prefetch_next_row() ? 1 : 0;
  const int64_t bad = run_rows_parallel(args);
  TORCH_CHECK_VALUE(bad < 0, "teacher_logits: NaN or +inf entries (a sparse target of such a row is "
                    "undefined; row ", bad, " of the flattened (N, C) rows)");
  return {in.indices, in.values, in.tails};
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("topk_targets", &topk_targets_cpu); }

}  // namespace cpu
}  // namespace kdfast
