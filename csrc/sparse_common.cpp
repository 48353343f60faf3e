#include "sparse_common.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "op_common.h"

namespace kdfast {
namespace {

void check_teacher_float(const char* name, const at::Tensor& t, at::IntArrayRef shape,
                         const at::Tensor& student) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), name,
                   " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " shape ", t.sizes(), " must be ", shape,
                    " (from teacher_ids)");
  TORCH_CHECK_VALUE(t.device() == student.device(), name, " is on ", t.device(),
                    " but student_logits is on ", student.device());
}

void check_inplace_sparse(const SparseInputs& in, const at::Tensor& student, bool wants_f64) {
  TORCH_CHECK_VALUE(student.scalar_type() != at::kHalf,
                    "inplace=True needs float32, bfloat16 or float64 student_logits: a float16 "
                    "buffer cannot hold the unnormalized gradient without underflow");
  TORCH_CHECK_VALUE(student.stride(1) == 1 || in.n_cols == 1,
                    "inplace=True needs student_logits contiguous along the class dimension");
  const int64_t row_elems = in.n_cols == 1 ? 1 : in.n_cols;
  TORCH_CHECK_VALUE(student.size(0) <= 1 || student.stride(0) >= row_elems,
                    "inplace=True needs student_logits whose rows do not overlap in memory, got "
                    "strides ", student.strides(), " for shape ", student.sizes(),
                    ": every row's gradient would be written to the same memory");
  TORCH_CHECK_VALUE(!wants_f64 || student.scalar_type() == at::kDouble,
                    "inplace=True with float64 teacher tensors needs float64 student_logits");
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"teacher.indices", &in.ids}, {"teacher.logits", &in.teacher_logits},
      {"teacher.tail_logsumexp", &in.tail}, {"target", &in.target}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK_VALUE(!t->defined() || !tensors_share_memory(student, *t),
                      "inplace=True writes the gradient over student_logits, but ", name,
                      " shares memory with it: expected separate buffers. Pass ", name,
                      ".clone() or use inplace=False");
  }
}

}  // namespace

SparseInputs prepare_sparse_inputs(const at::Tensor& student_logits, const at::Tensor& teacher_ids,
                                   const at::Tensor& teacher_logits,
                                   const c10::optional<at::Tensor>& tail_logsumexp,
                                   const c10::optional<at::Tensor>& target, double temperature,
                                   double teacher_temperature, double alpha, c10::string_view kind,
                                   double beta, int64_t ignore_index, double label_smoothing,
                                   bool scale_by_t2, bool inplace) {
  TORCH_CHECK_TYPE(is_supported_float(student_logits.scalar_type()),
                   "student_logits must be float32, bfloat16, float16 or float64, got ",
                   student_logits.scalar_type());
  TORCH_CHECK_VALUE(student_logits.dim() == 2, "student_logits must be 2-D (N, C), got ",
                    student_logits.dim(), "-D");
  TORCH_CHECK_VALUE(student_logits.size(1) >= 1, "student_logits must have at least 1 class");
  TORCH_CHECK_TYPE(teacher_ids.scalar_type() == at::kInt || teacher_ids.scalar_type() == at::kLong,
                   "teacher.indices must be an int32 or int64 tensor of class ids, got ",
                   teacher_ids.scalar_type());
  TORCH_CHECK_VALUE(teacher_ids.dim() == 2 && teacher_ids.size(0) == student_logits.size(0) &&
                        teacher_ids.size(1) >= 1,
                    "teacher.indices shape ", teacher_ids.sizes(), " must be (N, k) with N = ",
                    student_logits.size(0), " (student_logits' rows) and k >= 1");
  TORCH_CHECK_VALUE(teacher_ids.device() == student_logits.device(), "teacher.indices is on ",
                    teacher_ids.device(), " but student_logits is on ", student_logits.device());
  check_teacher_float("teacher.logits", teacher_logits, teacher_ids.sizes(), student_logits);
  const bool has_tail = tail_logsumexp.has_value() && tail_logsumexp->defined();
  if (has_tail) {
    check_teacher_float("teacher.tail_logsumexp", *tail_logsumexp, {student_logits.size(0)},
                        student_logits);
  }
  check_scalar_args(temperature, alpha, beta, label_smoothing);
  TORCH_CHECK_VALUE(std::isfinite(teacher_temperature) && teacher_temperature > 0.0,
                    "teacher_temperature must be finite and > 0, got ", teacher_temperature);
  const int32_t kind_id = parse_kind(kind);
  TORCH_CHECK_VALUE(kind_id != math::KIND_LOGIT_MSE,
                    "kind='logit_mse' is not supported by the sparse loss: the teacher's logits must be "
                    "centred over all C classes, and sparse targets hold k of them. Use "
                    "distillation_loss with dense teacher_logits");

  SparseInputs in;
  in.n_rows = student_logits.size(0);
  in.n_cols = student_logits.size(1);
  in.k = teacher_ids.size(1);
  in.target = prepare_target(target, student_logits);
  const bool wants_f64 = student_logits.scalar_type() == at::kDouble ||
                         teacher_logits.scalar_type() == at::kDouble ||
                         (has_tail && tail_logsumexp->scalar_type() == at::kDouble);
  const at::ScalarType acc = wants_f64 ? at::kDouble : at::kFloat;
  in.ids = teacher_ids.contiguous();
  in.teacher_logits = teacher_logits.to(acc).contiguous();
  if (has_tail) in.tail = tail_logsumexp->to(acc).contiguous();
  if (inplace) {
    check_inplace_sparse(in, student_logits, wants_f64);
    in.student = student_logits;
  } else {
    in.student = wants_f64 ? student_logits.to(at::kDouble) : student_logits;
    if (in.student.stride(1) != 1 && in.n_cols > 1) in.student = in.student.contiguous();
  }
  in.params = math::make_params(kind_id, in.target.defined(), ignore_index, temperature, alpha,
                                beta, label_smoothing, scale_by_t2);
  in.inv_teacher_temperature = 1.0 / teacher_temperature;
  return in;
}

}  // namespace kdfast
