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

}  // namespace kdfast
