// Per-row distillation math shared by the CPU and CUDA kernels.
//
// Everything here is a plain inline function on scalars, callable from host and device, so
// the CPU tests exercise the exact arithmetic the CUDA kernel runs. The kernels own only the
// loops (SIMD lanes on the CPU, threads on the GPU) and the reductions between the passes.
//
// Notation for one row of C classes, s = student logits, t = teacher logits, T = temperature:
//   a = s/T, b = t/T, q = softmax(a), p = softmax(b), r = softmax(s).
// Pass 1 (stats):     max(s), max(t), sum(s) (for label smoothing); no exps.
// Pass 2 (normalize): e_a = exp(a - max a), e_b = exp(b - max b), e_s = exp(s - max s), and
//                     their row sums; the exps are stashed in per-row scratch.
// Pass 3 (loss+grad): per-element soft term and gradient from the stashed exps, no new exps
//                     for "kl". "reverse_kl"/"jsd" need the row's soft loss inside the
//                     gradient, so pass 3 only reduces and pass 4 writes the gradient.
// Exps per element: kl 3 (2 when T == 1, when alpha == 1, or with no target),
//                   reverse_kl the same, jsd the same + 1 exp + 1 log (log-space mixture).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define KD_HD __host__ __device__ __forceinline__
#else
#define KD_HD inline __attribute__((always_inline))
#endif

namespace kdfast {
namespace math {

enum Kind : int32_t { KIND_KL = 0, KIND_REVERSE_KL = 1, KIND_JSD = 2 };

// Scalar parameters of one call, resolved on the host (see make_params).
struct Params {
  int32_t kind;
  int32_t has_target;      // 0: unlabeled transfer set, every row is soft-only
  int64_t ignore_index;
  double temperature;
  double inv_temperature;
  double soft_coef;        // weight of soft_i in loss_i: alpha * T^2 (or alpha), 1 w/o target
  double soft_grad_coef;   // soft_coef / T: d(a)/d(s) = 1/T
  double hard_coef;        // weight of hard_i: 1 - alpha, 0 w/o target
  double beta;             // jsd mixture weight of the teacher
  double log_beta, log1m_beta;
  double smoothing;        // label smoothing epsilon
  int32_t same_scale;      // T == 1: q == r, so e_s is e_a and one exp is saved
  // T == 2 or 4: s/T - max(s)/T is exactly (s - max s)/T (1/T is a power of two), so
  // exp(s - max s) = exp(s/T - max(s)/T)^T, 1 or 2 squarings instead of an exp (2-5 ulp).
  int32_t hard_exp_squarings;
};

inline Params make_params(int32_t kind, bool has_target, int64_t ignore_index,
                          double temperature, double alpha, double beta, double smoothing,
                          bool scale_by_t2) {
  Params p;
  p.kind = kind;
  p.has_target = has_target ? 1 : 0;
  p.ignore_index = ignore_index;
  p.temperature = temperature;
  p.inv_temperature = 1.0 / temperature;
  const double a = has_target ? alpha : 1.0;
  p.soft_coef = a * (scale_by_t2 ? temperature * temperature : 1.0);
  p.soft_grad_coef = p.soft_coef / temperature;
  p.hard_coef = has_target ? 1.0 - alpha : 0.0;
  p.beta = beta;
  p.log_beta = log(beta);
  p.log1m_beta = log1p(-beta);
  p.smoothing = smoothing;
  p.same_scale = temperature == 1.0 ? 1 : 0;
  p.hard_exp_squarings = temperature == 2.0 ? 1 : temperature == 4.0 ? 2 : 0;
  return p;
}

// Multiplies every term of loss_i (and so of its gradient) by w: the kernels' "average_rows"
// mode passes w = 1 / (number of counted rows).
inline void scale_params(Params& p, double w) {
  p.soft_coef *= w;
  p.soft_grad_coef *= w;
  p.hard_coef *= w;
}

// Overloads the kernels call, so float rows use float transcendentals and double rows double.
KD_HD float kd_log(float x) { return logf(x); }
KD_HD double kd_log(double x) { return log(x); }
// Bit casts the vectorizer sees through (a union round-trips through the stack in GCC).
KD_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}
KD_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}

// exp(x) for x <= 0 (or NaN), the only arguments the kernels pass: every exponent is taken
// relative to its row maximum. Cephes' single-precision polynomial after Cody-Waite range
// reduction, about 1 ulp; results below 2^-126 flush to 0 (they are < 1e-38 of the row's
// largest term). Plain arithmetic, so GCC vectorizes it at 2-3x libmvec's expf throughput,
// and -inf -> 0, NaN -> NaN hold without -ffast-math.
// t = 1.5 * 2^23 + round(x / ln2) holds the rounded exponent k in its low mantissa bits, so
// 2^k is t's bits shifted into the exponent field plus the bias: two integer operations, no
// float-to-int conversion, no clamp (below -87, -inf included, the bits are garbage and the
// final select returns 0; NaN reaches the result through r).
KD_HD float exp_nonpos(float x) {
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float k = t - 12582912.0f;                                   // round(x/ln2)
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;       // x - k*ln2, two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const float scale = bits_to_float((float_to_bits(t) << 23) + (127u << 23));
  return x < -87.0f ? 0.0f : p * scale;
}
KD_HD double exp_nonpos(double x) { return exp(x); }

// log(1 + u) for u in [0, 1] (the log-space mixture's tail): 2*atanh(u / (2 + u)) as an odd
// series in z = u / (2 + u) <= 1/3; truncation error < 4e-8 relative. Vectorizes like above.
KD_HD float log1p_unit(float u) {
  const float z = u / (2.0f + u);
  const float w = z * z;
  float p = 1.0f / 13.0f;
  p = p * w + 1.0f / 11.0f;
  p = p * w + 1.0f / 9.0f;
  p = p * w + 1.0f / 7.0f;
  p = p * w + 1.0f / 5.0f;
  p = p * w + 1.0f / 3.0f;
  p = p * w + 1.0f;
  return 2.0f * z * p;
}
KD_HD double log1p_unit(double u) { return log1p(u); }

template <class A> KD_HD A kd_max(A x, A y) { return x > y ? x : y; }
template <class A> KD_HD A neg_inf() { return -static_cast<A>(INFINITY); }

// ---- storage types: bit-compatible with at::BFloat16 / at::Half, usable without torch ----
struct bf16_bits { uint16_t x; };
struct f16_bits { uint16_t x; };

KD_HD float to_acc_float(float v) { return v; }
KD_HD float to_acc_float(bf16_bits v) { return bits_to_float(static_cast<uint32_t>(v.x) << 16); }
// IEEE half -> float without lookup tables or branches, so it vectorizes: the 5-bit exponent
// is rebiased by multiplying with 2^112; inf/NaN (exponent 31) get the float exponent forced.
KD_HD float to_acc_float(f16_bits v) {
  const uint32_t h = v.x;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t magnitude = (h & 0x7fffu) << 13;
  const float scaled = bits_to_float(magnitude) * 5.192296858534828e33f;  // 2^112
  const uint32_t special = (h & 0x7c00u) == 0x7c00u ? (0x7f800000u | magnitude) : 0u;
  const uint32_t out = special ? special : float_to_bits(scaled);
  return bits_to_float(sign | out);
}
KD_HD double to_acc_double(double v) { return v; }

KD_HD void store_from_acc(float* dst, float v) { *dst = v; }
KD_HD void store_from_acc(double* dst, double v) { *dst = v; }
// float -> bfloat16, round to nearest even; NaN stays a quiet NaN.
KD_HD void store_from_acc(bf16_bits* dst, float v) {
  const uint32_t u = float_to_bits(v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  dst->x = static_cast<uint16_t>(is_nan ? ((u >> 16) | 0x40u) : rounded);
}

// ---- per-row normalizers, from the pass-1 maxima and the pass-2 exp sums ----
template <class A>
struct RowNorm {
  A inv_t;         // 1/T
  A max_a, max_b;  // max of s/T and t/T
  A max_s;         // max of s (T = 1)
  A lse_a, lse_b;  // log-sum-exp of a and b
  A lse_s;         // log-sum-exp of s
  A inv_za, inv_zb, inv_zs;
  A lse_gap;       // lse_a - lse_b: log p - log q = (b - a) - (lse_b - lse_a)
};

// max(s/T) is max(s)/T exactly because multiplying by 1/T > 0 is monotone in IEEE rounding.
template <class A>
KD_HD RowNorm<A> row_norm(A inv_t, A max_s, A max_t, A z_a, A z_b, A z_s) {
  RowNorm<A> n;
  n.inv_t = inv_t;
  n.max_a = max_s * inv_t;
  n.max_b = max_t * inv_t;
  n.max_s = max_s;
  n.lse_a = n.max_a + kd_log(z_a);
  n.lse_b = n.max_b + kd_log(z_b);
  n.lse_s = max_s + kd_log(z_s);
  n.inv_za = A(1) / z_a;
  n.inv_zb = A(1) / z_b;
  n.inv_zs = A(1) / z_s;
  n.lse_gap = n.lse_a - n.lse_b;
  return n;
}

// Pass-2 exponent arguments.
template <class A> KD_HD A exp_arg_a(A s, RowNorm<A> n) { return s * n.inv_t - n.max_a; }
template <class A> KD_HD A exp_arg_b(A t, RowNorm<A> n) { return t * n.inv_t - n.max_b; }

// log p - log q for one element, from the raw logits.
template <class A> KD_HD A log_ratio_pq(A s, A t, RowNorm<A> n) {
  return (t - s) * n.inv_t + n.lse_gap;
}

// weight * value with 0 * anything = 0: the convention 0 log 0 = 0 that makes -inf teacher
// entries (masked vocabulary) contribute nothing instead of NaN. A NaN weight stays NaN.
template <class A> KD_HD A weighted(A weight, A value) { return weight == A(0) ? A(0) : weight * value; }

// log(beta*p + (1-beta)*q) from log p and log q without leaving log space, so rows whose p or
// q underflow keep a finite log-mixture (the JSD NaN trap).
template <class A>
KD_HD A log_mixture(A log_p, A log_q, A log_beta, A log1m_beta) {
  const A x = log_p + log_beta;
  const A y = log_q + log1m_beta;
  // Written so a NaN in either argument reaches the result (a plain min would drop a NaN x).
  const A hi = x > y ? x : y;
  const A lo = x > y ? y : x;
  const A tail = log1p_unit(exp_nonpos(lo - hi));
  return lo == neg_inf<A>() ? hi : hi + tail;
}

// Hard cross-entropy of softmax(s) against label y with smoothing eps:
// (1-eps) * (lse_s - s_y) + eps * (lse_s - mean(s)).
template <class A>
KD_HD A hard_loss(A s_y, A sum_s, int64_t n_cols, A eps, RowNorm<A> n) {
  const A nll = n.lse_s - s_y;
  if (eps == A(0)) return nll;
  return (A(1) - eps) * nll + eps * (n.lse_s - sum_s / A(n_cols));
}

// d(hard)/ds_k without the one-hot part, which the kernel subtracts at the label:
// softmax(s)_k - eps/C.  d(hard)/ds_y additionally has -(1 - eps).
template <class A>
KD_HD A hard_grad(A e_s, A eps_over_c, RowNorm<A> n) { return e_s * n.inv_zs - eps_over_c; }

// Soft-term gradient with respect to a = s/T (the kernel multiplies by soft_grad_coef).
//   kl:          q_k - p_k
//   reverse_kl:  q_k * (log q_k - log p_k - KL(q||p))
//   jsd:         (1-beta) * q_k * (log q_k - log m_k - KL(q||m))
// `ratio` is the per-element log ratio stashed by pass 3 (unused for kl).
template <class A>
KD_HD A soft_grad_kl(A e_a, A e_b, RowNorm<A> n) { return e_a * n.inv_za - e_b * n.inv_zb; }
template <class A>
KD_HD A soft_grad_mode_seeking(A e_a, A ratio, A row_kl, A weight, RowNorm<A> n) {
  return weighted(e_a * n.inv_za, weight * (ratio - row_kl));
}

// Row loss from the reduced terms; an ignored row contributes 0 (the kernel skips it).
template <class A>
KD_HD A row_loss(A soft, A hard, const Params& p) {
  return A(p.soft_coef) * soft + (p.hard_coef != 0.0 ? A(p.hard_coef) * hard : A(0));
}

}  // namespace math
}  // namespace kdfast
