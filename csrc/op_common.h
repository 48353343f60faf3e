// Host-side argument checks and input preparation shared by the CPU and CUDA ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include "kdfast/kd_math.h"

namespace kdfast {

struct PreparedInputs {
  at::Tensor student;  // (N, C), unit stride along C
  at::Tensor teacher;  // (N, C), unit stride along C, dtype paired with the student's
  at::Tensor target;   // (N,) int64, or undefined
  int64_t n_rows = 0;
  int64_t n_cols = 0;
  math::Params params{};
};

int32_t parse_kind(c10::string_view kind);
// kind="logit_mse" takes temperature 1 only (the error names the argument).
void check_kind_temperature(int32_t kind, double temperature);

bool is_supported_float(at::ScalarType t);
// Whether two 1-D or 2-D tensors share any byte: exact for rows with unit stride (a student
// written in place always has them), conservative otherwise.
bool tensors_share_memory(const at::Tensor& a, const at::Tensor& b);
// temperature, alpha, beta and label_smoothing in range (errors name the argument).
void check_scalar_args(double temperature, double alpha, double beta, double label_smoothing);
// The target checked against the (N, C) student (integer, (N,), same device) and converted
// to int64; undefined when absent. Its values are checked by the backends.
at::Tensor prepare_target(const c10::optional<at::Tensor>& target, const at::Tensor& student);

// Validates every argument (errors name the argument and the expected value), makes the
// class dimension contiguous where it is not, pairs float64 with float64, and converts the
// target to int64. `inplace`: the student buffer will receive the gradient, so it must
// already be contiguous along C and of a dtype that can hold the gradient.
PreparedInputs prepare_inputs(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                              const c10::optional<at::Tensor>& target, double temperature,
                              double alpha, c10::string_view kind, double beta,
                              int64_t ignore_index, double label_smoothing, bool scale_by_t2,
                              bool inplace);

// For CUDA in-place calls: call it in csrc/cuda/distill.cu after prepare_inputs and before
// the kernel launch. Queues on the current stream a device-side assert that every target is
// in [0, C) or ignore_index (no host sync), so a bad target stops the stream before any
// gradient overwrites the student, instead of tripping the kernel's own assert after other
// rows were written. Does nothing without a target. Device-generic: on the CPU it raises at
// once (the CPU op validates its targets itself before writing, so it need not call this).
void assert_targets_in_range_async(const PreparedInputs& in);

// float32 per-row losses, or float64 when the inputs are float64.
at::ScalarType loss_dtype(const at::Tensor& student);
// The student's dtype, except float16 -> float32: the unnormalized per-row gradient (entries
// near 1/C) would underflow into float16's subnormals.
at::ScalarType grad_dtype(const at::Tensor& student);

// at::empty for a large output buffer. On the CPU, large buffers come from cpu/buffer_pool.h:
// huge pages requested (a fresh N x C gradient otherwise costs one page fault per 4 KiB,
// longer than the kernel at (1024, 32000) float32) and reused across steps, already mapped.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// distill_fwd's gradient output: (N, C) from empty_output, or an empty (0,) tensor of the
// same dtype when no gradient is wanted.
at::Tensor allocate_grad(const PreparedInputs& in, bool compute_grad);

}  // namespace kdfast
