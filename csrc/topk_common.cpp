#include "topk_common.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace kdfast {

TopkInputs prepare_topk(const at::Tensor& teacher_logits, int64_t k, at::ArrayRef<double> temperatures) {
  TORCH_CHECK_VALUE(teacher_logits.dim() >= 1 && teacher_logits.size(-1) >= 1,
                    "teacher_logits: expected shape (..., C) with C >= 1, got ", teacher_logits.sizes());
  const at::ScalarType dtype = teacher_logits.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "teacher_logits: expected float32, bfloat16 or float16 (float64 takes the "
                    "reference path of kdfast.topk_targets), got ", dtype);
  const int64_t n_cols = teacher_logits.size(-1);
  // Ids travel in 32-bit ranks (kdfast/topk_math.h).
  TORCH_CHECK_VALUE(n_cols < int64_t(0xffffffff), "teacher_logits: C must be below 2^32 - 1, got ",
                    n_cols);
  TORCH_CHECK_VALUE(k >= 1 && k <= n_cols, "k: expected an int in [1, C = ", n_cols, "], got ", k);
  TORCH_CHECK_VALUE(!temperatures.empty(), "temperatures: expected one or more finite numbers > 0, got none");
  for (double t : temperatures) {
    TORCH_CHECK_VALUE(std::isfinite(t) && t > 0.0,
                      "temperatures: expected one or more finite numbers > 0, got ", temperatures);
  }
  TopkInputs in;
  in.rows = teacher_logits.reshape({-1, n_cols});
  if (in.rows.stride(1) != 1 && n_cols > 1) in.rows = in.rows.contiguous();
  in.n_rows = in.rows.size(0);
  in.n_cols = n_cols;
  const auto lead = teacher_logits.sizes().slice(0, teacher_logits.dim() - 1);
  auto shape = [&](int64_t last) {
    std::vector<int64_t> s(lead.begin(), lead.end());
    s.push_back(last);
    return s;
  };
  const auto opts = teacher_logits.options();
  in.indices = at::empty(shape(k), opts.dtype(at::kLong));
  in.values = at::empty(shape(k), opts.dtype(at::kFloat));
  in.tails = at::empty(shape(static_cast<int64_t>(temperatures.size())), opts.dtype(at::kFloat));
  return in;
}

}  // namespace kdfast
