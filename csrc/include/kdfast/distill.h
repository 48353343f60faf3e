// kdfast's C++ (LibTorch) entry point: the fused knowledge-distillation loss and its gradient
// with respect to the student's logits, computed in one pass by the kdfast::distill_fwd op.
//
// Build and link: see README.md, section "C++ (LibTorch)". In short, build the `kdfast`
// shared library with CMake (find_package(Torch)), then in your project
//   find_package(kdfast REQUIRED)   # or add_subdirectory(<kdfast checkout>)
//   target_link_libraries(app PRIVATE kdfast::kdfast)
// The library registers the ops with the PyTorch dispatcher from static initializers; calling
// kdfast::distillation_loss references the library, so the linker keeps it.
//
// Do not load this library and the Python module kdfast._C into one process: both register
// the kdfast:: ops and the second registration fails.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <string>

#if defined(_WIN32)
#if defined(KDFAST_BUILDING_LIBRARY)
#define KDFAST_API __declspec(dllexport)
#else
#define KDFAST_API __declspec(dllimport)
#endif
#else
#define KDFAST_API __attribute__((visibility("default")))
#endif

namespace kdfast {

// Arguments of the loss; the defaults match kdfast.distillation_loss in Python.
struct DistillOptions {
  double temperature = 1.0;       // T > 0, finite
  double alpha = 0.5;             // weight of the soft term, in [0, 1]; ignored without target
  std::string kind = "kl";        // "kl", "reverse_kl", "jsd" or "logit_mse" (temperature 1)
  double beta = 0.5;              // jsd's teacher weight, in (0, 1)
  int64_t ignore_index = -100;    // target value of padding rows
  double label_smoothing = 0.0;   // epsilon of the hard term, in [0, 1]
  std::string reduction = "mean"; // "mean", "batchmean", "sum" or "none"
  bool scale_by_t2 = true;        // multiply the soft term by T^2
};

struct DistillResult {
  // The reduced loss: a 0-d tensor, or shape (...) = student_logits.shape[:-1] for "none".
  // float32 (float64 when either logits tensor is float64), on the logits' device.
  at::Tensor loss;
  // d loss / d student_logits for the chosen reduction (for "none": d loss.sum() /
  // d student_logits, i.e. the per-row gradients unscaled). Same shape and dtype as
  // student_logits, contiguous. Accumulated in float32 (float64 for float64) and rounded
  // once into the student's dtype.
  at::Tensor grad_student;
};

// Fused knowledge-distillation loss (Hinton et al. 2015) and its gradient.
//
// Inputs
//   student_logits: (..., C), float32 / bfloat16 / float16 / float64, any strides, C >= 1.
//     The leading dimensions are flattened to N rows; each row is one distribution over C
//     classes.
//   teacher_logits: the same shape (a vocabulary mismatch raises: slice both to the shared
//     classes), any of those dtypes, the same device. It receives no gradient.
//   target: c10::nullopt (unlabeled transfer set), or (...) = student_logits.shape[:-1]
//     integer class indices in [0, C) or options.ignore_index, on the same device.
// Tensors are used as values: autograd is not involved (requires_grad flags are ignored and
// the results do not require grad). CPU tensors run the SIMD + OpenMP CPU kernel; CUDA
// tensors run the CUDA kernel when the library was built with KDFAST_WITH_CUDA.
//
// Math, per row i with s = student row, t = teacher row, T = temperature:
//   p = softmax(t / T), q = softmax(s / T), r = softmax(s)
//   soft_i: "kl"         KL(p || q)
//           "reverse_kl" KL(q || p)
//           "jsd"        beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta*p + (1-beta)*q,
//                        computed in log space
//           times T^2 when scale_by_t2 (default): the soft gradients scale as 1/T^2, so T^2
//           keeps their weight against the hard term independent of T (Hinton et al., sec. 2).
//           "logit_mse"  (1 / (2C)) * sum_j (s^_j - t^_j)^2, s^ and t^ the rows centred to zero
//                        mean (Caruana et al. 2006 logit matching; the T -> infinity limit of
//                        T^2 KL(p || q)); needs temperature == 1, scale_by_t2 has no effect, and
//                        a non-finite teacher logit makes its row's loss NaN.
//   hard_i = (1 - eps) * (-log r_y) + eps * mean_j(-log r_j), y = target_i,
//            eps = label_smoothing
//   loss_i = alpha * soft_i + (1 - alpha) * hard_i with a target; rows whose target is
//            ignore_index are padding, loss_i = 0 and their gradient is 0.
//            loss_i = soft_i without a target.
// Reduction (n = number of rows whose target != ignore_index, or N without a target):
//   "mean", "batchmean": sum_i loss_i / max(n, 1)  (0, never NaN, when no row counts)
//   "sum":               sum_i loss_i
//   "none":              loss_i, shaped like student_logits.shape[:-1]
// Masked vocabulary (-inf teacher entries) contributes nothing for "kl" and "jsd"; for
// "reverse_kl" the loss is +inf where the student has mass there. NaN inputs give NaN.
//
// Errors (c10::Error subclasses, messages name the argument and the expected value):
//   c10::TypeError  - unsupported logits dtype, non-integer target;
//   c10::ValueError - shape / device mismatches, 0-d logits, C == 0, temperature, alpha,
//                     beta, label_smoothing or kind or reduction out of range, a target
//                     outside [0, C) that is not ignore_index;
//   c10::Error      - no kernel for the tensors' device (e.g. CUDA tensors with a CPU-only
//                     build).
KDFAST_API DistillResult distillation_loss(const at::Tensor& student_logits,
                                           const at::Tensor& teacher_logits,
                                           const c10::optional<at::Tensor>& target,
                                           const DistillOptions& options = {});

// The teacher of linear_distillation_loss: exactly one form is defined.
struct LinearTeacher {
  at::Tensor logits;  // (..., C) dense teacher logits (e.g. from a soft-target cache), or
  at::Tensor hidden;  // (..., H_t) teacher hidden states with
  at::Tensor weight;  // (C, H_t) the teacher's output layer and
  at::Tensor bias;    // (C,) its bias, or undefined.
};

struct LinearDistillResult {
  // The reduced loss, as DistillResult::loss.
  at::Tensor loss;
  // d loss / d student_hidden (its shape and dtype), d loss / d student_weight and
  // d loss / d student_bias (undefined without a bias); for "none" the gradients of
  // loss.sum(). Weight and bias gradients are summed over the chunks in float32 (float64 for
  // float64) and rounded once into the weight's dtype.
  at::Tensor grad_hidden, grad_weight, grad_bias;
};

// distillation_loss(student_hidden @ student_weight.T + student_bias, teacher logits, target,
// options) without ever holding the (..., C) student logits: rows are processed chunk_rows at
// a time (0: even chunks of at most 2^26 logits per buffer, or max(512, H / 2) rows for
// 16-bit inputs with a gradient, see kdfast/linear.py); each
// chunk's logits come from a matmul, become their own gradient in the fused kernel, and feed
// the gradient matmuls. student_hidden (..., H) float32/bfloat16/float16/float64, student_weight (C, H) and
// student_bias (C,) of the same dtype. Teacher tensors, target and errors as in
// distillation_loss (a missing or double teacher form is a c10::ValueError).
KDFAST_API LinearDistillResult linear_distillation_loss(
    const at::Tensor& student_hidden, const at::Tensor& student_weight,
    const c10::optional<at::Tensor>& student_bias, const LinearTeacher& teacher,
    const c10::optional<at::Tensor>& target, const DistillOptions& options = {},
    int64_t chunk_rows = 0);

}  // namespace kdfast
