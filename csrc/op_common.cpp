#include "op_common.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "cpu/buffer_pool.h"

namespace kdfast {
namespace {

// The memory of a 1-D (N,) or 2-D (N, C) tensor as N byte ranges: row i covers
// [begin + i * stride, begin + i * stride + span), its first element to one past its last
// (exactly its bytes when the row has unit stride, an over-estimate otherwise).
struct ByteRows {
  int64_t begin = 0;
  int64_t n_rows = 0;
  int64_t stride = 0;
  int64_t span = 0;
};

ByteRows byte_rows(const at::Tensor& t, int64_t base) {
  const int64_t item = static_cast<int64_t>(t.element_size());
  const int64_t n_cols = t.dim() == 2 ? t.size(1) : 1;
  const int64_t col_stride = t.dim() == 2 ? t.stride(1) : 1;
  ByteRows rows;
  rows.begin = static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.const_data_ptr())) - base;
  rows.n_rows = t.size(0);
  rows.stride = t.stride(0) * item;
  rows.span = ((n_cols - 1) * col_stride + 1) * item;
  return rows;
}

// Whether row k of `b` meets the byte range [lo, hi) for some k: one division (rows of `b`
// start at evenly spaced addresses), so the whole test is O(rows of a).
bool some_row_meets(const ByteRows& b, int64_t lo, int64_t hi) {
  int64_t k = 0;  // the first row of b that ends after lo
  if (b.stride > 0 && b.begin + b.span <= lo) k = (lo - b.begin - b.span) / b.stride + 1;
  return k < b.n_rows && b.begin + k * b.stride < hi && b.begin + k * b.stride + b.span > lo;
}

// Whether two 1-D or 2-D tensors share any byte: exact for rows with unit stride (a student
// written in place always has them), conservative otherwise. The at::assert_no_overlap family
// answers "too hard" (and lets the call through) for non-dense views such as vocabulary slices
// logits[:, :C], and its message names no argument.
bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage() ||
      !a.storage().is_alias_of(b.storage())) {
    return false;
  }
  const int64_t base = static_cast<int64_t>(reinterpret_cast<uintptr_t>(a.storage().data()));
  const ByteRows rows_a = byte_rows(a, base);
  const ByteRows rows_b = byte_rows(b, base);
  for (int64_t i = 0; i < rows_a.n_rows; ++i) {
    const int64_t lo = rows_a.begin + i * rows_a.stride;
    if (some_row_meets(rows_b, lo, lo + rows_a.span)) return true;
  }
  return false;
}

// In-place mode writes every row's gradient over that row, so each element of the student
// must have its own memory (an expand()ed student would receive all rows' gradients in one
// row, and return a wrong loss), and nothing the kernel reads or the caller keeps may live
// there (passing one tensor as student and teacher would overwrite the teacher mid-call).
// Expects a student with unit stride along C (or C == 1), which the caller checked.
void check_inplace_memory(const at::Tensor& student, const at::Tensor& teacher,
                          const at::Tensor& target) {
  const int64_t row_elems = student.size(1) == 1 ? 1 : student.size(1);
  TORCH_CHECK_VALUE(student.size(0) <= 1 || student.stride(0) >= row_elems,
                    "inplace=True needs student_logits whose rows do not overlap in memory, got "
                    "strides ", student.strides(), " for shape ", student.sizes(),
                    " (e.g. from expand() or broadcasting): every row's gradient would be written "
                    "to the same memory. Pass student_logits.contiguous() or use inplace=False");
  TORCH_CHECK_VALUE(!shares_memory(student, teacher),
                    "inplace=True writes the gradient over student_logits, but teacher_logits "
                    "shares memory with it (the same tensor, or views of one buffer): expected "
                    "separate buffers. Pass teacher_logits.clone() or use inplace=False");
  TORCH_CHECK_VALUE(!target.defined() || !shares_memory(student, target),
                    "inplace=True writes the gradient over student_logits, but target shares "
                    "memory with it: expected separate buffers. Pass target.clone() or use "
                    "inplace=False");
}

}  // namespace

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

bool tensors_share_memory(const at::Tensor& a, const at::Tensor& b) { return shares_memory(a, b); }

void check_scalar_args(double temperature, double alpha, double beta, double label_smoothing) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(beta > 0.0 && beta < 1.0, "beta must be in (0, 1), got ", beta);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "label_smoothing must be in [0, 1], got ", label_smoothing);
}

at::Tensor prepare_target(const c10::optional<at::Tensor>& target, const at::Tensor& student) {
  if (!target.has_value() || !target->defined()) return at::Tensor();
  const at::Tensor& y = *target;
  const int64_t n_rows = student.size(0);
  TORCH_CHECK_TYPE(!at::isFloatingType(y.scalar_type()) && !at::isComplexType(y.scalar_type()) &&
                       y.scalar_type() != at::kBool,
                   "target must be an integer tensor of class indices, got ", y.scalar_type());
  TORCH_CHECK_VALUE(y.dim() == 1 && y.size(0) == n_rows, "target shape ", y.sizes(),
                    " must be (N,) = (", n_rows, ",) to match student_logits");
  TORCH_CHECK_VALUE(y.device() == student.device(), "target is on ", y.device(),
                    " but student_logits is on ", student.device());
  return y.to(at::kLong);
}

int32_t parse_kind(c10::string_view kind) {
  if (kind == "kl") return math::KIND_KL;
  if (kind == "reverse_kl") return math::KIND_REVERSE_KL;
  if (kind == "jsd") return math::KIND_JSD;
  if (kind == "logit_mse") return math::KIND_LOGIT_MSE;
  TORCH_CHECK_VALUE(false, "kind must be one of 'kl', 'reverse_kl', 'jsd', 'logit_mse', got '", kind, "'");
}

void check_kind_temperature(int32_t kind, double temperature) {
  TORCH_CHECK_VALUE(kind != math::KIND_LOGIT_MSE || temperature == 1.0,
                    "temperature must be 1 with kind='logit_mse' (logit matching compares raw logits: "
                    "it is the T -> infinity limit of T^2 KL, with no temperature of its own), got ",
                    temperature);
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
  check_scalar_args(temperature, alpha, beta, label_smoothing);
  const int32_t kind_id = parse_kind(kind);
  check_kind_temperature(kind_id, temperature);

  PreparedInputs out;
  out.n_rows = student_logits.size(0);
  out.n_cols = student_logits.size(1);
  out.target = prepare_target(target, student_logits);

  // Only the class dimension needs unit stride; row strides are passed to the kernels.
  const bool wants_f64 =
      student_logits.scalar_type() == at::kDouble || teacher_logits.scalar_type() == at::kDouble;
  if (inplace) {
    TORCH_CHECK_VALUE(student_logits.scalar_type() != at::kHalf,
                      "inplace=True needs float32, bfloat16 or float64 student_logits: a float16 "
                      "buffer cannot hold the unnormalized gradient without underflow");
    TORCH_CHECK_VALUE(student_logits.stride(1) == 1 || out.n_cols == 1,
                      "inplace=True needs student_logits contiguous along the class dimension");
    check_inplace_memory(student_logits, teacher_logits,
                         target.has_value() ? *target : at::Tensor());
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

void assert_targets_in_range_async(const PreparedInputs& in) {
  if (!in.target.defined() || in.n_rows == 0) return;
  const at::Tensor& y = in.target;
  const at::Tensor in_range = y.ge(0).logical_and_(y.lt(in.n_cols));
  const at::Tensor all_valid = in_range.logical_or_(y.eq(in.params.ignore_index)).all();
  // The message is fixed when queued: which target is bad is known only on the device.
  at::_assert_async(all_valid, c10::str("kdfast: target is out of range: expected class indices "
                                        "in [0, ", in.n_cols, ") or ignore_index=",
                                        in.params.ignore_index));
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
