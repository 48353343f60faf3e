#include "op_common.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "cpu/buffer_pool.h"

namespace kdfast {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

}  // namespace

int32_t parse_kind(c10::string_view kind) {
  if (kind == "kl") return math::KIND_KL;
  if (kind == "reverse_kl") return math::KIND_REVERSE_KL;
  if (kind == "jsd") return math::KIND_JSD;
  TORCH_CHECK_VALUE(false, "kind must be one of 'kl', 'reverse_kl', 'jsd', got '", kind, "'");
}

at::ScalarType loss_dtype(const at::Tensor& student) {
  return student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::ScalarType grad_dtype(const at::Tensor& student) {
  return student.scalar_type() == at::kHalf ? at::kFloat : student.scalar_type();
}

PreparedInputs prepare_inputs(const at::Tensor& student_logits, const at::Tensor& teacher_logits,
                              const c10::optional<at::Tensor>& target, double temperature,
                              double alpha, c10::string_view kind, double beta,
                              int64_t ignore_index, double label_smoothing, bool scale_by_t2,
                              bool inplace) {
  TORCH_CHECK_TYPE(is_supported_float(student_logits.scalar_type()),
                   "student_logits must be float32, bfloat16, float16 or float64, got ",
                   student_logits.scalar_type());
  TORCH_CHECK_TYPE(is_supported_float(teacher_logits.scalar_type()),
                   "teacher_logits must be float32, bfloat16, float16 or float64, got ",
                   teacher_logits.scalar_type());
  TORCH_CHECK_VALUE(student_logits.dim() == 2, "student_logits must be 2-D (N, C), got ",
                    student_logits.dim(), "-D");
  TORCH_CHECK_VALUE(teacher_logits.sizes() == student_logits.sizes(), "teacher_logits shape ",
                    teacher_logits.sizes(), " must equal student_logits shape ",
                    student_logits.sizes(),
                    " (if the vocabularies differ, slice both to the shared classes)");
  TORCH_CHECK_VALUE(student_logits.size(1) >= 1, "student_logits must have at least 1 class");
  TORCH_CHECK_VALUE(teacher_logits.device() == student_logits.device(),
                    "teacher_logits is on ", teacher_logits.device(),
                    " but student_logits is on ", student_logits.device());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(beta > 0.0 && beta < 1.0, "beta must be in (0, 1), got ", beta);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "label_smoothing must be in [0, 1], got ", label_smoothing);
  const int32_t kind_id = parse_kind(kind);

  PreparedInputs out;
  out.n_rows = student_logits.size(0);
  out.n_cols = student_logits.size(1);
  if (target.has_value() && target->defined()) {
    const at::Tensor& y = *target;
    TORCH_CHECK_TYPE(!at::isFloatingType(y.scalar_type()) && !at::isComplexType(y.scalar_type()) &&
                         y.scalar_type() != at::kBool,
                     "target must be an integer tensor of class indices, got ", y.scalar_type());
    TORCH_CHECK_VALUE(y.dim() == 1 && y.size(0) == out.n_rows, "target shape ", y.sizes(),
                      " must be (N,) = (", out.n_rows, ",) to match student_logits");
    TORCH_CHECK_VALUE(y.device() == student_logits.device(), "target is on ", y.device(),
                      " but student_logits is on ", student_logits.device());
    out.target = y.to(at::kLong);
  }

  // Only the class dimension needs unit stride; row strides are passed to the kernels.
  const bool wants_f64 =
      student_logits.scalar_type() == at::kDouble || teacher_logits.scalar_type() == at::kDouble;
  if (inplace) {
    TORCH_CHECK_VALUE(student_logits.scalar_type() != at::kHalf,
                      "inplace=True needs float32, bfloat16 or float64 student_logits: a float16 "
                      "buffer cannot hold the unnormalized gradient without underflow");
    TORCH_CHECK_VALUE(student_logits.stride(1) == 1 || out.n_cols == 1,
                      "inplace=True needs student_logits contiguous along the class dimension");
    TORCH_CHECK_VALUE(!wants_f64 || student_logits.scalar_type() == at::kDouble,
                      "inplace=True with float64 teacher_logits needs float64 student_logits");
    out.student = student_logits;
  } else {
    out.student = wants_f64 ? student_logits.to(at::kDouble) : student_logits;
    if (out.student.stride(1) != 1 && out.n_cols > 1) out.student = out.student.contiguous();
  }
  out.teacher = wants_f64 ? teacher_logits.to(at::kDouble) : teacher_logits;
  if (out.teacher.stride(1) != 1 && out.n_cols > 1) out.teacher = out.teacher.contiguous();

  out.params = math::make_params(kind_id, out.target.defined(), ignore_index, temperature, alpha,
                                 beta, label_smoothing, scale_by_t2);
  return out;
}

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().is_cpu()) return cpu::pooled_empty(sizes, options);
  return at::empty(sizes, options);
}

at::Tensor allocate_grad(const PreparedInputs& in, bool compute_grad) {
  const auto options = in.student.options().dtype(grad_dtype(in.student));
  return compute_grad ? empty_output({in.n_rows, in.n_cols}, options) : at::empty({0}, options);
}

}  // namespace kdfast
