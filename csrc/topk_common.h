// Host-side argument checks and output allocation of kdfast::topk_targets, shared by the CPU
// (cpu/topk_targets.cpp) and CUDA (cuda/topk_targets.cu) kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace kdfast {

struct TopkInputs {
  at::Tensor rows;         // (N, C), unit stride along C (a view where the layout allows)
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  at::Tensor indices;      // (..., k) int64
  at::Tensor values;       // (..., k) float32
  at::Tensor tails;        // (..., n_temps) float32
};

// Validates every argument (errors name the argument and the expected value: C >= 1 and below
// 2^32 - 1, 1 <= k <= C, finite temperatures > 0, float32/bfloat16/float16 logits) and
// allocates the outputs on the logits' device.
TopkInputs prepare_topk(const at::Tensor& teacher_logits, int64_t k, at::ArrayRef<double> temperatures);

}  // namespace kdfast
