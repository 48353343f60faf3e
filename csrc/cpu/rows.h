// CPU row loops of the fused distillation loss, over raw pointers.
//
// This header is compiled once per instruction set (csrc/cpu/isa/*.cpp set `#pragma GCC
// target` and KDFAST_ISA before including it), so it must not include torch or any header
// with non-inline code whose instantiation could leak one ISA's code into another. The loops
// are written for GCC's vectorizer: `omp simd` reductions (no -ffast-math, so -inf and NaN
// keep IEEE meaning).
#pragma once

#include "kdfast/cpu_rows_api.h"
#include "kdfast/kd_math.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// float rows use kd_math.h's polynomial exp/log (plain arithmetic, vectorized in line); double
// rows (gradcheck, tests) call libm, whose SIMD variants libmvec provides.
extern "C" double exp(double) noexcept __attribute__((simd("notinbranch")));
extern "C" double log1p(double) noexcept __attribute__((simd("notinbranch")));
// lanes.h takes the row normalizers' logs across rows: libmvec's vector logf.
extern "C" float logf(float) noexcept __attribute__((simd("notinbranch")));

namespace kdfast {
namespace cpu {
namespace KDFAST_ISA {
namespace {

using namespace ::kdfast::math;

template <class A> KD_HD A widen(float v) { return v; }
template <class A> KD_HD A widen(double v) { return static_cast<A>(v); }
template <class A> KD_HD A widen(bf16_bits v) { return to_acc_float(v); }
template <class A> KD_HD A widen(f16_bits v) { return to_acc_float(v); }

// Rows already in the accumulation type are read in place; others are widened once into
// scratch so the later passes read one format.
template <class A, class S>
const A* row_as_acc(const S* src, A* buf, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) buf[k] = widen<A>(src[k]);
  return buf;
}
template <class A>
const A* row_as_acc(const A* src, A*, int64_t) { return src; }

// Writes a finished gradient row. float rows bypass the cache (non-temporal stores): the
// gradient is not read again while the rows run, and an ordinary store would first read
// every line of it from DRAM (write-allocate), a third of the row loops' memory traffic.
template <class G, class A>
void write_grad_row(G* dst, const A* src, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) store_from_acc(dst + k, src[k]);
}

#if defined(__x86_64__)
void write_grad_row(float* dst, const float* src, int64_t n) {
#if defined(__AVX512F__)
  constexpr int64_t kWidth = 16;
#elif defined(__AVX__)
  constexpr int64_t kWidth = 8;
#else
  constexpr int64_t kWidth = 4;
#endif
  int64_t k = 0;
  for (; k < n && (reinterpret_cast<uintptr_t>(dst + k) % (kWidth * sizeof(float))) != 0; ++k) dst[k] = src[k];
  for (; k + kWidth <= n; k += kWidth) {
#if defined(__AVX512F__)
    _mm512_stream_ps(dst + k, _mm512_loadu_ps(src + k));
#elif defined(__AVX__)
    _mm256_stream_ps(dst + k, _mm256_loadu_ps(src + k));
#else
    _mm_stream_ps(dst + k, _mm_loadu_ps(src + k));
#endif
  }
  for (; k < n; ++k) dst[k] = src[k];
}
// Non-temporal stores are weakly ordered: fence them before the rows are handed back.
inline void stream_fence() { _mm_sfence(); }
#else
inline void stream_fence() {}
#endif

// Elements per pass-2 chunk between prefetches of the next row (see run_rows_typed).
constexpr int64_t kPrefetchChunk = 1024;

template <class S, class Tt, class G, class A>
int64_t run_rows_typed(const RowsArgs& g, int64_t begin, int64_t end, A* scratch) {
  const Params& P = g.params;
  const int64_t C = g.n_cols;
  A* s_buf = scratch;
  A* t_buf = scratch + C;
  A* e_a = scratch + 2 * C;  // exp(a - max a)
  A* e_b = scratch + 3 * C;  // exp(b - max b); later the per-element log ratio
  A* e_s_own = scratch + 4 * C;  // exp(s - max s), only when T != 1
  const A inv_t = static_cast<A>(P.inv_temperature);
  const A eps = static_cast<A>(P.smoothing);
  const A eps_over_c = eps / static_cast<A>(C);
  const A soft_g = static_cast<A>(P.soft_grad_coef);
  const A hard_g = static_cast<A>(P.hard_coef);
  const bool need_hard = P.hard_coef != 0.0;
  const bool separate_hard_exp = need_hard && !P.same_scale;
  A* out_loss = static_cast<A*>(g.loss_rows);

  for (int64_t i = begin; i < end; ++i) {
    G* grad_row = g.grad ? static_cast<G*>(g.grad) + i * g.grad_row_stride : nullptr;
    int64_t y = -1;
    if (P.has_target) {
      y = g.target[i * g.target_stride];
      if (y == P.ignore_index) {
        out_loss[i] = A(0);
        if (grad_row) {
          for (int64_t k = 0; k < C; ++k) store_from_acc(grad_row + k, A(0));
        }
        continue;
      }
      if (y < 0 || y >= C) {
        stream_fence();
        return i;
      }
    }
    const A* s = row_as_acc(static_cast<const S*>(g.student) + i * g.student_row_stride, s_buf, C);
    const A* t = row_as_acc(static_cast<const Tt*>(g.teacher) + i * g.teacher_row_stride, t_buf, C);
    // Read before any gradient store: in-place mode writes the gradient over the student row.
    const A s_y = need_hard ? s[y] : A(0);

    // Pass 1: maxima (and the logit sum label smoothing needs). No exps.
    A max_s = neg_inf<A>(), max_t = neg_inf<A>(), sum_s = A(0);
#pragma omp simd reduction(max : max_s, max_t)
    for (int64_t k = 0; k < C; ++k) {
      max_s = kd_max(max_s, s[k]);
      max_t = kd_max(max_t, t[k]);
    }
    if (need_hard && eps != A(0)) {
#pragma omp simd reduction(+ : sum_s)
      for (int64_t k = 0; k < C; ++k) sum_s += s[k];
    }

    // Pass 2: exps, stashed for pass 3, and their sums. 3 exps per element; 2 when the hard
    // term reuses softmax(s/T) (T == 1), squares it (T == 2 or 4), or there is none.
    const A max_a = max_s * inv_t, max_b = max_t * inv_t;
    // cross = sum_k e_b[k] (x_b[k] - x_a[k]) over the exps' arguments x = logit/T - row max:
    // log p_k - log q_k = x_b[k] - x_a[k] + log z_a - log z_b, so kl's soft loss is
    // cross / z_b + log z_a - log z_b and kl needs no later pass over the logits. Relative to
    // the row maxima nothing large cancels (huge logits included). weighted: a -inf (masked)
    // teacher entry adds 0.
    A z_a = A(0), z_b = A(0), z_s = A(0), cross = A(0);
    const A* e_s = e_a;  // softmax(s) == softmax(s/T) when T == 1; a harmless dummy w/o hard term
    // Processed in chunks, each followed by prefetches of the same chunk of the next row: the
    // exps are compute-bound, so the next row's pass 1 then reads from cache, not DRAM.
    const char* next_s = i + 1 < end ? reinterpret_cast<const char*>(
        static_cast<const S*>(g.student) + (i + 1) * g.student_row_stride) : nullptr;
    const char* next_t = i + 1 < end ? reinterpret_cast<const char*>(
        static_cast<const Tt*>(g.teacher) + (i + 1) * g.teacher_row_stride) : nullptr;
    for (int64_t k0 = 0; k0 < C; k0 += kPrefetchChunk) {
      const int64_t k1 = k0 + kPrefetchChunk < C ? k0 + kPrefetchChunk : C;
      if (separate_hard_exp && P.hard_exp_squarings > 0) {
        const bool twice = P.hard_exp_squarings == 2;
#pragma omp simd reduction(+ : z_a, z_b, z_s, cross)
        for (int64_t k = k0; k < k1; ++k) {
          const A xa = s[k] * inv_t - max_a, xb = t[k] * inv_t - max_b;
          const A ea = exp_nonpos(xa);
          const A eb = exp_nonpos(xb);
          cross += weighted(eb, xb - xa);
          const A ea2 = ea * ea;
          const A es = twice ? ea2 * ea2 : ea2;
          e_a[k] = ea;
          e_b[k] = eb;
          e_s_own[k] = es;
          z_a += ea;
          z_b += eb;
          z_s += es;
        }
      } else if (separate_hard_exp) {
#pragma omp simd reduction(+ : z_a, z_b, z_s, cross)
        for (int64_t k = k0; k < k1; ++k) {
          const A xa = s[k] * inv_t - max_a, xb = t[k] * inv_t - max_b;
          const A ea = exp_nonpos(xa);
          const A eb = exp_nonpos(xb);
          cross += weighted(eb, xb - xa);
          const A es = exp_nonpos(s[k] - max_s);
          e_a[k] = ea;
          e_b[k] = eb;
          e_s_own[k] = es;
          z_a += ea;
          z_b += eb;
          z_s += es;
        }
      } else {
#pragma omp simd reduction(+ : z_a, z_b, cross)
        for (int64_t k = k0; k < k1; ++k) {
          const A xa = s[k] * inv_t - max_a, xb = t[k] * inv_t - max_b;
          const A ea = exp_nonpos(xa);
          const A eb = exp_nonpos(xb);
          cross += weighted(eb, xb - xa);
          e_a[k] = ea;
          e_b[k] = eb;
          z_a += ea;
          z_b += eb;
        }
      }
      if (next_s != nullptr) {
        const int64_t ss = sizeof(S), st = sizeof(Tt);
        for (int64_t b = k0 * ss; b < k1 * ss; b += 64) __builtin_prefetch(next_s + b);
        for (int64_t b = k0 * st; b < k1 * st; b += 64) __builtin_prefetch(next_t + b);
      }
    }
    if (separate_hard_exp) {
      e_s = e_s_own;
    } else {
      z_s = z_a;
    }
    const RowNorm<A> n = row_norm(inv_t, max_s, max_t, z_a, z_b, z_s);

    // Pass 3: kl's soft loss comes from pass 2's cross sum and its gradient is computed and
    // streamed out chunk by chunk. reverse_kl and jsd need a row sum of pass 3 first: their
    // gradient is built in e_a's slots (each read before it is overwritten) and written out
    // at the end. Either way the gradient is stored after every read of the student row, which
    // in-place mode overwrites, and float gradients are streamed past the cache.
    const A ea_y = need_hard ? e_a[y] : A(0);
    const A es_y = need_hard ? e_s[y] : A(0);
    A soft = A(0), grad_kl = A(0);
    if (P.kind == KIND_KL) {
      soft = cross * n.inv_zb + (kd_log(z_a) - kd_log(z_b));
      if (grad_row) {
        // One pass: each chunk of the gradient is computed into an L1 buffer (the label's
        // element, rounded once, put in place) and streamed out.
        A gy = A(0);
        if (need_hard) {
          gy = hard_g * (hard_grad(e_s[y], eps_over_c, n) - (A(1) - eps)) +
               soft_g * soft_grad_kl(e_a[y], e_b[y], n);
        }
        alignas(64) A chunk[kPrefetchChunk];
        for (int64_t k0 = 0; k0 < C; k0 += kPrefetchChunk) {
          const int64_t k1 = k0 + kPrefetchChunk < C ? k0 + kPrefetchChunk : C;
#pragma omp simd
          for (int64_t k = k0; k < k1; ++k) {
            chunk[k - k0] = soft_g * soft_grad_kl(e_a[k], e_b[k], n) + hard_g * hard_grad(e_s[k], eps_over_c, n);
          }
          if (need_hard && y >= k0 && y < k1) chunk[y - k0] = gy;
          write_grad_row(grad_row + k0, chunk, k1 - k0);
        }
      }
    } else if (P.kind == KIND_REVERSE_KL) {
#pragma omp simd reduction(+ : soft)
      for (int64_t k = 0; k < C; ++k) {
        const A log_q_over_p = -log_ratio_pq(s[k], t[k], n);
        e_b[k] = log_q_over_p;
        soft += weighted(e_a[k] * n.inv_za, log_q_over_p);
      }
      grad_kl = soft;
    } else {  // jsd, in log space
      const A log_beta = static_cast<A>(P.log_beta), log1m_beta = static_cast<A>(P.log1m_beta);
      A kl_pm = A(0), kl_qm = A(0);
#pragma omp simd reduction(+ : kl_pm, kl_qm)
      for (int64_t k = 0; k < C; ++k) {
        const A log_p = t[k] * inv_t - n.lse_b;
        const A log_q = s[k] * inv_t - n.lse_a;
        const A log_m = log_mixture(log_p, log_q, log_beta, log1m_beta);
        kl_pm += weighted(e_b[k] * n.inv_zb, log_p - log_m);
        kl_qm += weighted(e_a[k] * n.inv_za, log_q - log_m);
        e_b[k] = log_q - log_m;
      }
      const A beta = static_cast<A>(P.beta);
      soft = beta * kl_pm + (A(1) - beta) * kl_qm;
      grad_kl = kl_qm;
    }

    // Pass 4 (reverse_kl, jsd): the gradient needs the finished row sum of pass 3.
    if (grad_row && P.kind != KIND_KL) {
      const A weight = P.kind == KIND_JSD ? A(1) - static_cast<A>(P.beta) : A(1);
#pragma omp simd
      for (int64_t k = 0; k < C; ++k) {
        e_a[k] = soft_g * soft_grad_mode_seeking(e_a[k], e_b[k], grad_kl, weight, n) +
                 hard_g * hard_grad(e_s[k], eps_over_c, n);
      }
    }

    A hard = A(0);
    if (need_hard) {
      hard = hard_loss(s_y, sum_s, C, eps, n);
      if (grad_row && P.kind != KIND_KL) {
        // Recompute the label's element in full precision so it is rounded once.
        const A weight = P.kind == KIND_JSD ? A(1) - static_cast<A>(P.beta) : A(1);
        e_a[y] = hard_g * (hard_grad(es_y, eps_over_c, n) - (A(1) - eps)) +
                 soft_g * soft_grad_mode_seeking(ea_y, e_b[y], grad_kl, weight, n);
      }
    }
    if (grad_row && P.kind != KIND_KL) write_grad_row(grad_row, e_a, C);
    out_loss[i] = row_loss(soft, hard, P);
  }
  stream_fence();
  return -1;
}

}  // namespace
}  // namespace KDFAST_ISA
}  // namespace cpu
}  // namespace kdfast

#include "lanes.h"

namespace kdfast {
namespace cpu {
namespace KDFAST_ISA {

float exp_probe(float* buf, int64_t n, int64_t reps) {
  float acc = 0.0f;
  for (int64_t r = 0; r < reps; ++r) {
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < n; ++k) {
      const float e = exp_nonpos(-buf[k]);
      buf[k] = e;  // feeds the next repeat, so the work cannot be hoisted
      acc += e;
    }
  }
  return acc;
}

int64_t run_rows(const RowsArgs& g, int64_t begin, int64_t end, void* scratch) {
  // The gradient is stored in the student's dtype, except fp16 students: their unnormalized
  // gradient underflows fp16, so it stays float32 (see cpu_rows_api.h).
  using F = float;
  using B = bf16_bits;
  using H = f16_bits;
  F* sf = static_cast<F*>(scratch);
  const bool lanes = g.n_cols <= g.lanes_max_cols;
#define KD_CASE(SD, TD, S, T, G)                                   \
  if (g.student_dtype == SD && g.teacher_dtype == TD)              \
    return lanes ? run_rows_lanes<S, T, G>(g, begin, end, sf)      \
                 : run_rows_typed<S, T, G, F>(g, begin, end, sf);
  KD_CASE(DT_F32, DT_F32, F, F, F)
  KD_CASE(DT_F32, DT_BF16, F, B, F)
  KD_CASE(DT_F32, DT_F16, F, H, F)
  KD_CASE(DT_BF16, DT_F32, B, F, B)
  KD_CASE(DT_BF16, DT_BF16, B, B, B)
  KD_CASE(DT_BF16, DT_F16, B, H, B)
  KD_CASE(DT_F16, DT_F32, H, F, F)
  KD_CASE(DT_F16, DT_BF16, H, B, F)
  KD_CASE(DT_F16, DT_F16, H, H, F)
#undef KD_CASE
  if (g.student_dtype == DT_F64 && g.teacher_dtype == DT_F64)
    return run_rows_typed<double, double, double, double>(g, begin, end, static_cast<double*>(scratch));
  return -2;
}

}  // namespace KDFAST_ISA
}  // namespace cpu
}  // namespace kdfast
