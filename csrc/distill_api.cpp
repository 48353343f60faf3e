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
    c10::string_view, double, int64_t, double, bool, bool);

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

  auto [loss_rows, grad] = distill_fwd_op().call(
      student, teacher, flat_target, options.temperature, options.alpha, options.kind,
      options.beta, options.ignore_index, options.label_smoothing, options.scale_by_t2,
      /*compute_grad=*/true);

  DistillResult out;
  at::Tensor scale;  // 0-d, loss_rows' dtype; undefined = 1
  switch (reduction) {
    case Reduction::kNone:
      out.loss = loss_rows.reshape(batch_shape);
      break;
    case Reduction::kSum:
      out.loss = loss_rows.sum();
      break;
    case Reduction::kMean: {
      // The number of counted rows stays on the device (no host sync), clamped to >= 1.
      at::Tensor count = has_target ? flat_target->ne(options.ignore_index).sum()
                                    : at::scalar_tensor(static_cast<double>(loss_rows.numel()),
                                                        loss_rows.options());
      count = count.clamp_min(1).to(loss_rows.scalar_type());
      out.loss = loss_rows.sum().div(count);
      scale = count.reciprocal();
      break;
    }
  }

  // grad holds d loss_i / d student_i: the student's dtype, float32 for float16, float64 when
  // either input is float64. The 1/n factor is applied in float32 (or float64) and the product
  // rounded once into the student's dtype, as the Python autograd formula does.
  const at::ScalarType out_dtype = student_logits.scalar_type();
  if (!scale.defined()) {
    grad = grad.to(out_dtype);  // "sum", "none": d loss / d loss_i = 1
  } else if (grad.scalar_type() == out_dtype && out_dtype == scale.scalar_type()) {
    grad.mul_(scale);  // float32 / float64: grad is a fresh buffer of ours
  } else {
    // One pass: a (1, 1) (not 0-d) factor takes part in type promotion, so mul_out computes
    // in float32 (float64) and rounds once into the student's dtype.
    at::Tensor cast = at::empty(grad.sizes(), grad.options().dtype(out_dtype));
    at::mul_out(cast, grad, scale.reshape({1, 1}));
    grad = cast;
  }
  out.grad_student = grad.reshape(student_logits.sizes());
  return out;
}

}  // namespace kdfast
