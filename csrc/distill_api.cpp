// The C++ entry point kdfast::distillation_loss (csrc/include/kdfast/distill.h): flattens the
// inputs, calls kdfast::distill_fwd through the dispatcher (so CPU and CUDA tensors both work)
// and applies the reduction to the loss and the gradient, mirroring kdfast/functional.py.
// Needs only ATen headers: it is compiled into the Python module as well as the CMake library.
#define KDFAST_BUILDING_LIBRARY
#include "kdfast/distill.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <tuple>
#include <vector>

namespace kdfast {
namespace {

using DistillFwdSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, double, double,
    c10::string_view, double, int64_t, double, bool, bool, bool);

const c10::TypedOperatorHandle<DistillFwdSig>& distill_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("kdfast::distill_fwd", "")
                             .typed<DistillFwdSig>();
  return op;
}

using LinearDistillFwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
    const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, double, double, double,
    c10::string_view, double, int64_t, double, bool, int64_t, bool,
    const c10::optional<at::Tensor>&);

const c10::TypedOperatorHandle<LinearDistillFwdSig>& linear_distill_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("kdfast::linear_distill_fwd", "")
                             .typed<LinearDistillFwdSig>();
  return op;
}

c10::optional<at::Tensor> rows_of(const at::Tensor& t) {
  if (!t.defined()) return c10::nullopt;
  return t.detach().reshape({-1, t.size(-1)});
}

c10::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? c10::optional<at::Tensor>(t.detach()) : c10::nullopt;
}

enum class Reduction { kMean, kSum, kNone };

Reduction parse_reduction(const std::string& reduction) {
  if (reduction == "mean" || reduction == "batchmean") return Reduction::kMean;
  if (reduction == "sum") return Reduction::kSum;
  if (reduction == "none") return Reduction::kNone;
  TORCH_CHECK_VALUE(false, "reduction must be one of 'mean', 'batchmean', 'sum', 'none', got '",
                    reduction, "'");
}

}  // namespace

DistillResult distillation_loss(const at::Tensor& student_logits,
                                const at::Tensor& teacher_logits,
                                const c10::optional<at::Tensor>& target,
                                const DistillOptions& options) {
  const Reduction reduction = parse_reduction(options.reduction);
  TORCH_CHECK_VALUE(student_logits.defined(), "student_logits is an undefined tensor");
  TORCH_CHECK_VALUE(teacher_logits.defined(), "teacher_logits is an undefined tensor");
  TORCH_CHECK_VALUE(student_logits.dim() >= 1,
                    "student_logits must have a class dimension (..., C), got a 0-d tensor");
  TORCH_CHECK_VALUE(teacher_logits.sizes() == student_logits.sizes(), "teacher_logits shape ",
                    teacher_logits.sizes(), " must equal student_logits shape ",
                    student_logits.sizes(),
                    "; if the vocabularies differ, slice both to the shared classes explicitly "
                    "(kdfast never pads)");
  const int64_t n_cols = student_logits.size(-1);
  TORCH_CHECK_VALUE(n_cols >= 1, "student_logits must have at least 1 class (C >= 1)");
  const auto batch_shape = student_logits.sizes().slice(0, student_logits.dim() - 1);
  const bool has_target = target.has_value() && target->defined();
  if (has_target) {
    TORCH_CHECK_VALUE(target->sizes() == batch_shape, "target shape ", target->sizes(),
                      " must equal student_logits.shape[:-1] = ", batch_shape);
  }

  // Values in, values out: nothing here is recorded by autograd.
  at::NoGradGuard no_grad;
  const at::Tensor student = student_logits.detach().reshape({-1, n_cols});
  const at::Tensor teacher = teacher_logits.detach().reshape({-1, n_cols});
  c10::optional<at::Tensor> flat_target;
  if (has_target) flat_target = target->detach().reshape({-1});

  // "mean": the op divides loss_i and its gradient by the number of counted rows itself
  // (on the device, no host sync), so the gradient needs no second pass.
  const bool mean = reduction == Reduction::kMean;
  auto [loss_rows, grad] = distill_fwd_op().call(
      student, teacher, flat_target, options.temperature, options.alpha, options.kind,
      options.beta, options.ignore_index, options.label_smoothing, options.scale_by_t2,
      /*compute_grad=*/true, /*average_rows=*/mean);

  DistillResult out;
  out.loss = reduction == Reduction::kNone ? loss_rows.reshape(batch_shape) : loss_rows.sum();
  // grad is the student's dtype, except float32 for float16 students (see op_common.h) and
  // float64 when either input is float64: cast only then.
  grad = grad.to(student_logits.scalar_type());
  out.grad_student = grad.reshape(student_logits.sizes());
  return out;
}

LinearDistillResult linear_distillation_loss(const at::Tensor& student_hidden,
                                             const at::Tensor& student_weight,
                                             const c10::optional<at::Tensor>& student_bias,
                                             const LinearTeacher& teacher,
                                             const c10::optional<at::Tensor>& target,
                                             const DistillOptions& options, int64_t chunk_rows) {
  const Reduction reduction = parse_reduction(options.reduction);
  TORCH_CHECK_VALUE(student_hidden.defined() && student_hidden.dim() >= 1,
                    "student_hidden must be a (..., H) tensor");
  const auto batch_shape = student_hidden.sizes().slice(0, student_hidden.dim() - 1);
  const bool has_target = target.has_value() && target->defined();
  if (has_target) {
    TORCH_CHECK_VALUE(target->sizes() == batch_shape, "target shape ", target->sizes(),
                      " must equal student_hidden.shape[:-1] = ", batch_shape);
  }
  at::NoGradGuard no_grad;
  const at::Tensor hidden = student_hidden.detach().reshape({-1, student_hidden.size(-1)});
  c10::optional<at::Tensor> flat_target;
  if (has_target) flat_target = target->detach().reshape({-1});
  // The mean's divisor on the device (no host sync): counted rows, at least 1.
  at::Tensor scale;
  if (reduction == Reduction::kMean) {
    const auto wide = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor counted =
        has_target ? flat_target->ne(options.ignore_index).sum().to(wide)
                   : at::full({}, static_cast<double>(hidden.size(0)), hidden.options().dtype(wide));
    scale = counted.clamp_min(1).reciprocal().reshape({1});
  }
  auto [loss_rows, d_hidden, d_weight, d_bias] = linear_distill_fwd_op().call(
      hidden, student_weight.detach(), maybe(student_bias.value_or(at::Tensor())), flat_target,
      rows_of(teacher.logits), rows_of(teacher.hidden), maybe(teacher.weight),
      maybe(teacher.bias), c10::nullopt, c10::nullopt, c10::nullopt, options.temperature,
      options.temperature, options.alpha, options.kind, options.beta,
      options.ignore_index, options.label_smoothing, options.scale_by_t2, chunk_rows,
      /*compute_grad=*/true, scale.defined() ? c10::optional<at::Tensor>(scale) : c10::nullopt);

  LinearDistillResult out;
  if (reduction == Reduction::kNone) {
    out.loss = loss_rows.reshape(batch_shape);
  } else {
    out.loss = loss_rows.sum();
    if (scale.defined()) out.loss = out.loss * scale.reshape({}).to(out.loss.scalar_type());
  }
  out.grad_hidden = d_hidden.reshape(student_hidden.sizes());
  out.grad_weight = d_weight;
  if (student_bias.has_value() && student_bias->defined()) out.grad_bias = d_bias;
  return out;
}

}  // namespace kdfast
