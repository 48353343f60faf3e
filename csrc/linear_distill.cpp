// kdfast::linear_distill_fwd: the student's output layer fused with the distillation loss.
//
// Rows are processed in chunks. Per chunk: the student logits come from one matmul (ATen:
// BLAS / cuBLAS), the fused row kernel (kdfast::distill_fwd_inplace) turns them into their
// own gradient in place, and the chunk's hidden, weight and bias gradients follow from two
// more matmuls. So at most one chunk of logits (plus the teacher's, when it is computed from
// its hidden states) exists at a time: never the N x C logits. Device-generic: the same code
// runs for CPU and CUDA tensors (the matmuls and the row kernel dispatch by device).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/mixed_gemm.h"
#include "op_common.h"

namespace kdfast {
namespace {

using Opt = c10::optional<at::Tensor>;

using DistillFwdSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const Opt&, double, double, c10::string_view, double,
    int64_t, double, bool, bool, bool);
using DistillInplaceSig = at::Tensor(at::Tensor&, const at::Tensor&, const Opt&, double, double,
                                     c10::string_view, double, int64_t, double, bool, bool);

using SparseFwdSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, const Opt&, double,
    double, double, c10::string_view, double, int64_t, double, bool, bool, bool);
using SparseInplaceSig = at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const Opt&, const Opt&, double, double, double,
                                    c10::string_view, double, int64_t, double, bool, bool);

const c10::TypedOperatorHandle<SparseFwdSig>& sparse_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("kdfast::sparse_distill_fwd", "")
                             .typed<SparseFwdSig>();
  return op;
}

const c10::TypedOperatorHandle<SparseInplaceSig>& sparse_inplace_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("kdfast::sparse_distill_fwd_inplace", "")
                             .typed<SparseInplaceSig>();
  return op;
}

const c10::TypedOperatorHandle<DistillFwdSig>& distill_fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("kdfast::distill_fwd", "")
                             .typed<DistillFwdSig>();
  return op;
}

const c10::TypedOperatorHandle<DistillInplaceSig>& distill_inplace_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("kdfast::distill_fwd_inplace", "")
                             .typed<DistillInplaceSig>();
  return op;
}

// The default chunk: rows of equal count, as few chunks as keep each chunk within the budget,
// where a chunk may exceed it by up to 1/8 so that no chunk is a sliver (4096 rows at 1365.3
// rows per budget: 3 chunks of 1366, not 3 of 1365 and one of 1).
// - 32/64-bit inputs: each C-wide chunk buffer (the student's logits; the teacher's when
//   computed from its hidden states; a separate gradient when the kernel cannot work in
//   place) within 2^26 logits (256 MiB in float32). A budget in logits, not bytes, because
//   the matmuls' speed depends on the chunk's row count: measured (benchmarks/NOTES.md 21) at
//   (4096, 128, 49152), chunks of 341-683 rows lost 11-19 % to the unfused path, and at
//   H = 576 683-row chunks lost 4-35 % where 1366-row chunks won 2 %.
// - 16-bit inputs with a gradient: 512 rows, or H / 2 when that is more. They also hold the
//   weight gradient's float32 sum (C x H, twice their .grad) beside the chunk, so the chunk
//   is kept small; but each chunk re-reads the weight and that sum, and the weight product
//   reduces over the chunk's rows, so short chunks cost time, more so at large H. Measured
//   (NOTES.md 22), fused / unfused time and memory: (4096, 576, 49152) bf16, 512 rows 0.86x in
//   0.23 of the memory, 341 rows 1.08x, 1366 rows 0.77x in 0.34; (2048, 2048, 128256) bf16,
//   512 rows 1.38x, 1024 rows 1.05x (there the float32 sum alone is twice the unfused
//   path's extra memory).
// Still far below the N x C logits of a language model's batch (8192 x 128k float32 = 4 GiB).
constexpr int64_t kChunkBudgetLogits = int64_t(1) << 26;
constexpr int64_t kChunkRows16 = 512;

int64_t even_chunk_rows(int64_t n_rows, double budget_rows) {
  if (n_rows <= 1) return 1;
  const int64_t chunks = std::max<int64_t>(
      1, int64_t(std::ceil(double(n_rows) / std::max(1.0, budget_rows) - 0.125)));
  return (n_rows + chunks - 1) / chunks;
}

int64_t default_chunk_rows(int64_t n_rows, int64_t n_cols, int64_t n_hidden, int64_t buffers,
                           bool sums_16bit) {
  if (sums_16bit) return even_chunk_rows(n_rows, double(std::max(kChunkRows16, n_hidden / 2)));
  const double row_logits = double(std::max<int64_t>(1, n_cols * buffers));
  return even_chunk_rows(n_rows, std::floor(double(kChunkBudgetLogits) / row_logits));
}

bool given(const Opt& t) { return t.has_value() && t->defined(); }

// One layer's logits x @ w.T (+ b), as torch.nn.functional.linear computes them, written into
// `out` (rows of a chunk buffer reused across chunks).
void layer_logits_out(at::Tensor& out, const at::Tensor& x, const at::Tensor& w, const Opt& b) {
  if (given(b)) {
    at::addmm_out(out, *b, x, w.t());
  } else {
    at::mm_out(out, x, w.t());
  }
}

void check_layer(const char* x_name, const at::Tensor& x, const char* w_name,
                 const at::Tensor& w, const char* b_name, const Opt& b) {
  TORCH_CHECK_VALUE(x.dim() == 2, x_name, " must be (N, H), got shape ", x.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(1) == x.size(1), w_name, " must be (C, H) with H = ",
                    x_name, ".shape[-1] = ", x.size(1), ", got shape ", w.sizes());
  TORCH_CHECK_VALUE(w.scalar_type() == x.scalar_type(), w_name, " dtype ", w.scalar_type(),
                    " must equal ", x_name, " dtype ", x.scalar_type());
  if (given(b)) {
    TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == w.size(0), b_name, " must be (C,) with C = ",
                      w.size(0), ", got shape ", b->sizes());
    TORCH_CHECK_VALUE(b->scalar_type() == x.scalar_type(), b_name, " dtype ", b->scalar_type(),
                      " must equal ", x_name, " dtype ", x.scalar_type());
  }
}

// The loss options every chunk's row kernel gets.
struct LossArgs {
  double temperature, teacher_temperature, alpha;
  c10::string_view kind;
  double beta;
  int64_t ignore_index;
  double label_smoothing;
  bool scale_by_t2;
};

struct Teacher {
  Opt logits, hidden, weight, bias;  // dense: logits, or hidden + weight (+ bias)
  Opt ids, sparse_logits, tail_lse;  // sparse: ids + their logits (+ the tail's logsumexp)
  at::Tensor chunk_buffer;           // hidden form: one chunk's teacher logits, reused

  bool sparse() const { return given(ids); }

  bool has_float64() const {
    for (const Opt* t : {&logits, &sparse_logits, &tail_lse}) {
      if (given(*t) && (*t)->scalar_type() == at::kDouble) return true;
    }
    return false;
  }

  at::Tensor dense_chunk(int64_t start, int64_t rows) const {
    if (given(logits)) return logits->narrow(0, start, rows);
    at::Tensor out = chunk_buffer.narrow(0, 0, rows);
    layer_logits_out(out, hidden->narrow(0, start, rows), *weight, bias);
    return out;
  }

  Opt rows_of(const Opt& t, int64_t start, int64_t rows) const {
    return given(t) ? Opt(t->narrow(0, start, rows)) : Opt();
  }

  // The chunk's row losses; with `in_place` its logits become their gradient (returned as
  // the second value), else the gradient is a fresh buffer (undefined without compute_grad).
  std::tuple<at::Tensor, at::Tensor> run(at::Tensor& logits, int64_t start, const Opt& y,
                                         const LossArgs& a, bool compute_grad,
                                         bool in_place) const {
    const int64_t rows = logits.size(0);
    if (sparse()) {
      const at::Tensor i = ids->narrow(0, start, rows), z = sparse_logits->narrow(0, start, rows);
      const Opt tail = rows_of(tail_lse, start, rows);
      if (in_place) {
        return {sparse_inplace_op().call(logits, i, z, tail, y, a.temperature,
                                         a.teacher_temperature, a.alpha, a.kind, a.beta,
                                         a.ignore_index, a.label_smoothing, a.scale_by_t2, false),
                logits};
      }
      return sparse_fwd_op().call(logits, i, z, tail, y, a.temperature, a.teacher_temperature,
                                  a.alpha, a.kind, a.beta, a.ignore_index, a.label_smoothing,
                                  a.scale_by_t2, compute_grad, false);
    }
    const at::Tensor t = dense_chunk(start, rows);
    if (in_place) {
      return {distill_inplace_op().call(logits, t, y, a.temperature, a.alpha, a.kind, a.beta,
                                        a.ignore_index, a.label_smoothing, a.scale_by_t2, false),
              logits};
    }
    return distill_fwd_op().call(logits, t, y, a.temperature, a.alpha, a.kind, a.beta,
                                 a.ignore_index, a.label_smoothing, a.scale_by_t2, compute_grad,
                                 false);
  }
};

void check_teacher(const Teacher& t, int64_t n_rows, int64_t n_cols) {
  const int forms = given(t.logits) + given(t.hidden) + given(t.ids);
  TORCH_CHECK_VALUE(forms == 1,
                    "exactly one teacher form: teacher_logits, teacher_hidden with "
                    "teacher_weight, or teacher_ids with teacher_sparse_logits (got ", forms, ")");
  if (t.sparse()) {
    TORCH_CHECK_VALUE(given(t.sparse_logits) && t.ids->dim() == 2 && t.ids->size(0) == n_rows &&
                          t.sparse_logits->sizes() == t.ids->sizes(),
                      "teacher_ids and teacher_sparse_logits must both be (N, k) with N = ",
                      n_rows);
    TORCH_CHECK_VALUE(!given(t.tail_lse) || (t.tail_lse->dim() == 1 && t.tail_lse->size(0) == n_rows),
                      "tail_logsumexp must be (N,) with N = ", n_rows);
    return;
  }
  if (given(t.logits)) {
    TORCH_CHECK_VALUE(t.logits->dim() == 2 && t.logits->size(0) == n_rows &&
                          t.logits->size(1) == n_cols,
                      "teacher_logits must be (N, C) = (", n_rows, ", ", n_cols, "), got shape ",
                      t.logits->sizes());
    return;
  }
  TORCH_CHECK_VALUE(given(t.weight), "teacher_hidden needs teacher_weight (C, H_t)");
  check_layer("teacher_hidden", *t.hidden, "teacher_weight", *t.weight, "teacher_bias", t.bias);
  TORCH_CHECK_VALUE(t.hidden->size(0) == n_rows && t.weight->size(0) == n_cols,
                    "teacher_hidden must have N = ", n_rows, " rows and teacher_weight C = ",
                    n_cols, " classes, got ", t.hidden->sizes(), " and ", t.weight->sizes());
}

// The layer's gradients: hidden in its own dtype (each row written once), weight and bias
// summed over the chunks in float32 (float64 for float64 inputs); the first chunk's products
// become the sums (no zero fill, no extra pass over the C x H weight gradient).
struct LayerGrads {
  at::Tensor hidden, weight, bias;
  at::ScalarType acc_dtype;
  bool with_bias;
};

void accumulate(at::Tensor& sum, const at::Tensor& part, at::ScalarType acc_dtype) {
  if (!sum.defined()) {
    sum = part.scalar_type() == acc_dtype ? part : part.to(acc_dtype);
  } else {
    sum.add_(part);  // each chunk's product rounded once into its dtype, summed wide
  }
}

// The bias gradient of one chunk, the column sums of g. A wide g (float32/float64) goes
// through a GEMV (g^T 1), 2-2.5x faster than at::sum over dim 0 here; a bfloat16 g is summed in
// its own dtype (at::sum accumulates reduced floats in float32 and rounds once, like the
// weight gradient's chunk products) and widened: 5x faster than at::sum to float32, which
// converts element by element.
at::Tensor chunk_bias_grad(const at::Tensor& g, at::ScalarType acc_dtype) {
  if (g.scalar_type() == acc_dtype) return at::mv(g.t(), at::ones({g.size(0)}, g.options()));
  return at::sum(g, 0).to(acc_dtype);
}

// The bfloat16 CPU path of add_chunk_grads: the three products by MKL's mixed gemm where torch
// carries it (cpu/mixed_gemm.h), each in float32 with the uniform scale as alpha. The weight
// and bias sums (from the buffer pool, as the chunk buffer is) take each chunk's product
// without rounding it to bfloat16 first, and no C x H temporaries exist; the hidden gradient
// is rounded once from float32. Measured (benchmarks/NOTES.md 22): g^T x 1.7-2x faster than
// ATen's bfloat16 product, g w 1.5x at 586 rows, the bias's g^T 1 4x faster than at::sum.
// False when unavailable: the generic path runs.
bool add_chunk_grads_mixed(LayerGrads& acc, const at::Tensor& g, const at::Tensor& x,
                           const at::Tensor& w, int64_t start, const at::Tensor& uniform) {
  const int64_t rows = g.size(0), n_cols = w.size(0), n_hidden = w.size(1);
  if (!g.is_cpu() || g.scalar_type() != at::kBFloat16 || x.scalar_type() != at::kBFloat16 ||
      !cpu::mixed_gemm_available() || !cpu::fits_blas_int({rows, n_cols, n_hidden})) {
    return false;
  }
  const float scale = uniform.defined() ? uniform.item<float>() : 1.0f;
  // BLAS skips the products when alpha is 0, so a non-finite g would not reach the result:
  // such scales take the generic path, which propagates them as the unfused path does.
  if (scale == 0.0f || !std::isfinite(scale)) return false;
  const at::TensorOptions wide = g.options().dtype(at::kFloat);
  const at::Tensor gc = g.contiguous(), xc = x.contiguous(), wc = w.contiguous();
  const bool first = !acc.weight.defined();
  if (first) {
    acc.weight = empty_output({n_cols, n_hidden}, wide);
    if (acc.with_bias) acc.bias = at::empty({n_cols}, wide);
  }
  at::Tensor d_x = at::empty({rows, n_hidden}, wide);
  at::Tensor d_b = acc.with_bias ? acc.bias.view({n_cols, 1}) : at::Tensor();
  const bool done = cpu::bf16_gemm(d_x, gc, wc, scale, false) &&
                    cpu::bf16_gemm(acc.weight, gc.t(), xc, scale, !first) &&
                    (!acc.with_bias ||
                     cpu::bf16_gemm(d_b, gc.t(), at::ones({rows, 1}, g.options()), scale, !first));
  TORCH_INTERNAL_ASSERT(done, "bf16_gemm refused contiguous operands that fit");
  acc.hidden.narrow(0, start, rows).copy_(d_x);
  return true;
}

// Adds one chunk's contribution. `g` is d loss_i / d logits for the chunk's rows, already
// scaled per row when the scale differs between rows; `uniform` (one element, or undefined
// for 1) scales the chunk's hidden rows instead: N x H values, never the C-wide ones.
void add_chunk_grads(LayerGrads& acc, const at::Tensor& g, const at::Tensor& x,
                     const at::Tensor& w, int64_t start, const at::Tensor& uniform) {
  if (add_chunk_grads_mixed(acc, g, x, w, start, uniform)) return;
  // float16 rows come back in float32 (see op_common.h's grad_dtype): multiply in float32.
  const at::Tensor wm = g.scalar_type() == w.scalar_type() ? w : w.to(g.scalar_type());
  at::Tensor xm = g.scalar_type() == x.scalar_type() ? x : x.to(g.scalar_type());
  if (uniform.defined()) xm = xm * uniform;  // 0-d: the product keeps x's dtype, one rounding
  at::Tensor d_x = acc.hidden.narrow(0, start, x.size(0));  // contiguous rows
  if (d_x.scalar_type() == g.scalar_type()) {
    at::mm_out(d_x, g, wm);
  } else {
    d_x.copy_(at::mm(g, wm));
  }
  if (uniform.defined()) d_x.mul_(uniform);
  if (acc.weight.defined() && acc.weight.scalar_type() == g.scalar_type()) {
    acc.weight.addmm_(g.t(), xm);
  } else {
    accumulate(acc.weight, at::mm(g.t(), xm), acc.acc_dtype);
  }
  if (acc.with_bias) {
    at::Tensor d_b = chunk_bias_grad(g, acc.acc_dtype);
    if (uniform.defined()) d_b.mul_(uniform);
    accumulate(acc.bias, d_b, acc.acc_dtype);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_distill_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const Opt& bias, const Opt& target,
    const Opt& teacher_logits, const Opt& teacher_hidden, const Opt& teacher_weight,
    const Opt& teacher_bias, const Opt& teacher_ids, const Opt& teacher_sparse_logits,
    const Opt& tail_logsumexp, double temperature, double teacher_temperature, double alpha,
    c10::string_view kind, double beta, int64_t ignore_index, double label_smoothing,
    bool scale_by_t2, int64_t chunk_rows, bool compute_grad, const Opt& row_scale) {
  check_layer("student_hidden", hidden, "student_weight", weight, "student_bias", bias);
  const int64_t n_rows = hidden.size(0), n_cols = weight.size(0);
  Teacher teacher{teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
                  teacher_ids, teacher_sparse_logits, tail_logsumexp, {}};
  const LossArgs loss_args{temperature, teacher_temperature, alpha, kind, beta, ignore_index,
                           label_smoothing, scale_by_t2};
  check_teacher(teacher, n_rows, n_cols);
  TORCH_CHECK_VALUE(chunk_rows >= 0, "chunk_rows must be >= 1 (or 0 for the default), got ",
                    chunk_rows);
  const bool per_row_scale = given(row_scale) && row_scale->numel() != 1;
  if (per_row_scale) {
    TORCH_CHECK_VALUE(row_scale->dim() == 1 && row_scale->size(0) == n_rows,
                      "row_scale must have one element or N = ", n_rows, ", got shape ",
                      row_scale->sizes());
  }
  const at::ScalarType dtype = hidden.scalar_type();
  const bool wide = dtype == at::kDouble || teacher.has_float64();
  // The gradient overwrites the chunk's logits, unless their dtype cannot hold it (float16:
  // see grad_dtype in op_common.h; a float64 teacher widens the gradient to float64).
  const bool in_place = compute_grad && dtype != at::kHalf && (dtype == at::kDouble || !wide);
  const int64_t buffers = 1 + (given(teacher_hidden) ? 1 : 0) + (compute_grad && !in_place ? 1 : 0);
  const bool sums_16bit = compute_grad && (dtype == at::kBFloat16 || dtype == at::kHalf);
  const int64_t rows =
      chunk_rows > 0 ? chunk_rows
                     : default_chunk_rows(n_rows, n_cols, hidden.size(1), buffers, sums_16bit);

  at::Tensor loss_rows = at::empty({n_rows}, hidden.options().dtype(wide ? at::kDouble : at::kFloat));
  LayerGrads acc;
  at::Tensor uniform;
  if (compute_grad) {
    const at::ScalarType acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
    acc.hidden = at::empty(hidden.sizes(), hidden.options());
    acc.acc_dtype = acc_dtype;
    acc.with_bias = given(bias);
    if (given(row_scale) && !per_row_scale) uniform = row_scale->reshape({}).to(acc_dtype);
  }
  // One logits buffer for every chunk, from the CPU buffer pool: a fresh buffer per chunk
  // would be mapped and first-touched each time (as many page faults as the unfused path's
  // N x C logits), and a pooled one is already mapped on the next step.
  const std::vector<int64_t> chunk_shape{std::min(rows, n_rows), n_cols};
  const at::Tensor buffer = empty_output(chunk_shape, hidden.options());
  if (given(teacher_hidden)) teacher.chunk_buffer = empty_output(chunk_shape, teacher_hidden->options());
  for (int64_t start = 0; start < n_rows; start += rows) {
    const int64_t len = std::min(rows, n_rows - start);
    const at::Tensor x = hidden.narrow(0, start, len);
    at::Tensor logits = buffer.narrow(0, 0, len);  // rows [0, len): contiguous
    layer_logits_out(logits, x, weight, bias);
    const Opt y = given(target) ? Opt(target->narrow(0, start, len)) : Opt();
    auto [loss, g] = teacher.run(logits, start, y, loss_args, compute_grad, in_place);
    loss_rows.narrow(0, start, len).copy_(loss);
    if (!compute_grad) continue;
    if (per_row_scale) g.mul_(row_scale->narrow(0, start, len).unsqueeze(1));
    add_chunk_grads(acc, g, x, weight, start, uniform);
  }
  if (!compute_grad) {  // three distinct empty outputs: the schema declares no aliasing
    return {loss_rows, at::empty({0}, hidden.options()), at::empty({0}, hidden.options()),
            at::empty({0}, hidden.options())};
  }
  if (!acc.weight.defined()) acc.weight = at::zeros(weight.sizes(), weight.options());  // N = 0
  if (acc.with_bias && !acc.bias.defined()) acc.bias = at::zeros(bias->sizes(), bias->options());
  at::Tensor d_bias = acc.with_bias ? acc.bias.to(dtype) : at::empty({0}, hidden.options());
  return {loss_rows, acc.hidden, acc.weight.to(dtype), d_bias};
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("linear_distill_fwd", &linear_distill_fwd); }
TORCH_LIBRARY_IMPL(kdfast, CUDA, m) { m.impl("linear_distill_fwd", &linear_distill_fwd); }

}  // namespace kdfast
