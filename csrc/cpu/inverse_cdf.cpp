// CPU implementation of kdfast::inverse_cdf_draws (the sampled caches' draws): per row, the
// draws torch.searchsorted(cumsum(w, float64), min(u * total, nextafter(total, 0)), right=True)
// would give, clamped to C - 1, without the (R, C) float64 cumsum: one pass for the total and
// one merge of the row's sorted targets into the running sum. The running sum is the same
// left-to-right float64 sum as ATen's CPU cumsum, so the ids are the same bit for bit
// (tests/test_cache_sparse.py checks it against that composition). The Python wrapper is
// kdfast.cache.sparse.draw_ids.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace kdfast {
namespace cpu {
namespace {

// Row r: ids[j] = the first i with sum(w[0..i]) > x_j (C - 1 if none), x_j = min(u_j * total,
// nextafter(total, 0)). order is scratch of n entries.
void draw_row(const float* w, int64_t C, const double* u, int64_t n, int64_t* ids,
              std::vector<int64_t>& order, std::vector<double>& x) {
  double total = 0.0;
  for (int64_t i = 0; i < C; ++i) total += static_cast<double>(w[i]);
  const double below_total = std::nextafter(total, 0.0);
  for (int64_t j = 0; j < n; ++j) x[j] = std::min(u[j] * total, below_total);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return x[a] < x[b]; });
  int64_t i = 0;
  double running = static_cast<double>(w[0]);
  for (const int64_t j : order) {
    while (i < C - 1 && !(running > x[j])) running += static_cast<double>(w[++i]);
    ids[j] = i;  // the first running sum above x_j, or the clamp to C - 1
  }
}

at::Tensor inverse_cdf_draws_cpu(const at::Tensor& weights, const at::Tensor& uniforms) {
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.scalar_type() == at::kFloat,
                    "weights: expected a (R, C) float32 tensor, got ", weights.scalar_type(), " of shape ",
                    weights.sizes());
  TORCH_CHECK_VALUE(uniforms.dim() == 2 && uniforms.scalar_type() == at::kDouble &&
                        uniforms.size(0) == weights.size(0),
                    "uniforms: expected a (R, n) float64 tensor with R = ", weights.size(0), ", got ",
                    uniforms.scalar_type(), " of shape ", uniforms.sizes());
  TORCH_CHECK_VALUE(weights.size(1) > 0, "weights: expected C >= 1 columns, got 0");
  const at::Tensor w = weights.contiguous();
  const at::Tensor u = uniforms.contiguous();
  const int64_t R = w.size(0), C = w.size(1), n = u.size(1);
  at::Tensor ids = at::empty({R, n}, w.options().dtype(at::kLong));
  if (R == 0 || n == 0) return ids;
  const float* wp = w.const_data_ptr<float>();
  const double* up = u.const_data_ptr<double>();
  int64_t* out = ids.data_ptr<int64_t>();
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), R));
#pragma omp parallel num_threads(static_cast<int>(workers))
  {
    std::vector<int64_t> order(static_cast<size_t>(n));
    std::vector<double> x(static_cast<size_t>(n));
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < R; ++r) draw_row(wp + r * C, C, up + r * n, n, out + r * n, order, x);
  }
  return ids;
}

}  // namespace

TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("inverse_cdf_draws", &inverse_cdf_draws_cpu); }

}  // namespace cpu
}  // namespace kdfast
