// The op schemas, defined once for every backend (CPU: cpu/distill.cpp, cpu/sparse_distill.cpp;
// CUDA: cuda/distill.cu).
#include <torch/library.h>


TORCH_LIBRARY(kdfast, m) {
  // The sparse-cache builder (CPU: cpu/topk_targets.cpp): per row of (..., C) float32/bfloat16/
  // float16 logits the top-k ids (int64, largest first, equal values by smaller id), their
  // logits (float32) and the tail log-sum-exp at each temperature (float32, (..., n_T)).
  // See kdfast/topk.py.
  m.def(
      "topk_targets(Tensor teacher_logits, int k, float[] temperatures) "
      "-> (Tensor indices, Tensor logits, Tensor tail_logsumexp)");
  // The sampled caches' draws (CPU: cpu/inverse_cdf.cpp): per row of (R, C) float32 weights
  // w >= 0 and (R, n) float64 uniforms u in [0, 1), the (R, n) int64 ids
  // searchsorted(cumsum(w, float64), min(u * total, nextafter(total, 0)), right=True) clamped
  // to C - 1, without the float64 cumsum. See kdfast/cache/sparse.py (draw_ids).
  m.def("inverse_cdf_draws(Tensor weights, Tensor uniforms) -> Tensor");

  // Row losses (N,) in float32 (float64 for float64 inputs) and the per-row gradient of
  // loss_i with respect to student_logits (N, C); the gradient is empty when compute_grad is
  // false. average_rows divides both by the number of counted rows (so loss_rows.sum() is the
  // "mean" reduction and its gradient needs no second pass). See kdfast/ops.py.
  m.def(
      "distill_fwd(Tensor student_logits, Tensor teacher_logits, Tensor? target, "
      "float temperature, float alpha, str kind, float beta, int ignore_index, "
      "float label_smoothing, bool scale_by_t2, bool compute_grad, bool average_rows=False) "
      "-> (Tensor, Tensor)");
  // Same, but the gradient overwrites student_logits (saves one N x C buffer).
  m.def(
      "distill_fwd_inplace(Tensor(a!) student_logits, Tensor teacher_logits, Tensor? target, "
      "float temperature, float alpha, str kind, float beta, int ignore_index, "
      "float label_smoothing, bool scale_by_t2, bool average_rows=False) -> Tensor");
  // The sparse teacher (kdfast.sparse_distillation_loss): its logits at k ids per row
  // (teacher_ids (N, k), -1 = empty slot) and, for tail="bucket", the log-sum-exp of the rest
  // (tail_logsumexp (N,); None: the rest has no teacher mass, tail="renormalize"). Outputs and
  // average_rows as distill_fwd's; a row counts if its target is not ignore_index or, without
  // target, if it has a valid id. See kdfast/sparse_ops.py.
  m.def(
      "sparse_distill_fwd(Tensor student_logits, Tensor teacher_ids, Tensor teacher_logits, "
      "Tensor? tail_logsumexp, Tensor? target, float temperature, float teacher_temperature, "
      "float alpha, str kind, float beta, int ignore_index, float label_smoothing, "
      "bool scale_by_t2, bool compute_grad, bool average_rows=False) -> (Tensor, Tensor)");
  // Same, but the gradient overwrites student_logits; every row's ids and target are checked
  // before any is written.
  m.def(
      "sparse_distill_fwd_inplace(Tensor(a!) student_logits, Tensor teacher_ids, "
      "Tensor teacher_logits, Tensor? tail_logsumexp, Tensor? target, float temperature, "
      "float teacher_temperature, float alpha, str kind, float beta, int ignore_index, "
      "float label_smoothing, bool scale_by_t2, bool average_rows=False) -> Tensor");
  // Backward of distill_fwd: grad * row_scale[:, None] computed in float32 (or wider), rounded
  // once into `dtype`, written to a fresh buffer (huge-page backed on Linux CPUs).
  m.def("scale_rows(Tensor grad, Tensor row_scale, ScalarType dtype) -> Tensor");

  // The student's output layer fused with the loss (csrc/linear_distill.cpp): loss rows (N,)
  // of distill_fwd(student_hidden @ student_weight.T + student_bias, teacher, ...) and, with
  // compute_grad, the gradients of hidden (N, H), weight (C, H) and bias (C,) (empty without
  // bias), computed chunk by chunk without the N x C logits. The teacher: dense logits,
  // hidden states + output layer, or sparse (ids, their logits, tail logsumexp: see
  // sparse_distill_fwd; teacher_temperature applies to it only). row_scale: one value or (N,),
  // multiplies each row's gradient (the reduction and grad_output). See kdfast/linear.py.
  m.def(
      "linear_distill_fwd(Tensor student_hidden, Tensor student_weight, Tensor? student_bias, "
      "Tensor? target, Tensor? teacher_logits, Tensor? teacher_hidden, Tensor? teacher_weight, "
      "Tensor? teacher_bias, Tensor? teacher_ids, Tensor? teacher_sparse_logits, "
      "Tensor? tail_logsumexp, float temperature, float teacher_temperature, float alpha, "
      "str kind, float beta, int ignore_index, float label_smoothing, bool scale_by_t2, "
      "int chunk_rows, bool compute_grad, Tensor? row_scale) -> (Tensor, Tensor, Tensor, Tensor)");
}
