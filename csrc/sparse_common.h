// Host-side argument checks and input preparation of the sparse op, shared by its backends.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include "kdfast/kd_math.h"

namespace kdfast {

struct SparseInputs {
  at::Tensor student;         // (N, C), unit stride along C (float64 when any input is)
  at::Tensor ids;             // (N, k) int32/int64, contiguous, values not yet checked
  at::Tensor teacher_logits;  // (N, k) contiguous, in the accumulation dtype
  at::Tensor tail;            // (N,) contiguous, in the accumulation dtype, or undefined
  at::Tensor target;          // (N,) int64, or undefined
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  int64_t k = 0;
  math::Params params{};
  double inv_teacher_temperature = 1.0;
};

// Validates every argument but the ids' and targets' values (errors name the argument and
// the expected value), widens to float64 when any float input is float64, and converts the
// teacher's floats to the accumulation dtype (k per row: cheap). `inplace`: the student will
// receive the gradient, so it must be contiguous along C, of a dtype that holds the gradient,
// and share no memory with the other inputs.
SparseInputs prepare_sparse_inputs(const at::Tensor& student_logits, const at::Tensor& teacher_ids,
                                   const at::Tensor& teacher_logits,
                                   const c10::optional<at::Tensor>& tail_logsumexp,
                                   const c10::optional<at::Tensor>& target, double temperature,
                                   double teacher_temperature, double alpha, c10::string_view kind,
                                   double beta, int64_t ignore_index, double label_smoothing,
                                   bool scale_by_t2, bool inplace);

}  // namespace kdfast
