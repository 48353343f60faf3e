// Per-row distillation math shared by the CPU and CUDA kernels: the one definition of every
// per-row step. The backends (csrc/cpu/rows.h, csrc/cpu/lanes.h, csrc/cuda/distill_rows.cuh)
// own only their loops, stashes and reductions; tests/test_shared_math.py checks that no
// transcendental or loss formula is written in them.
//
// Everything here is a plain inline function on scalars, callable from host and device, so
// the CPU tests and the host simulation of the CUDA rows (tests/cuda_host_sim.cpp) exercise
// the arithmetic the CUDA kernel runs.
//
// Notation for one row of C classes, s = student logits, t = teacher logits, T = temperature:
//   a = s/T, b = t/T, q = softmax(a), p = softmax(b), r = softmax(s).
// The steps:
//   1. Statistics of a part of the row (a CPU chunk, a GPU thread's elements, a row split):
//      its maxima, its exp sums relative to them (elem_exps), kl's / reverse_kl's cross sum
//      and the logit sum label smoothing needs (PartStats, add_element).
//   2. Parts combined with online rescaling (part_scales, add_scaled, merge_parts): the row's
//      statistics without a second read of the logits.
//   3. The row's normalizers (row_norm) and soft loss: kl / reverse_kl from the cross sum
//      (soft_from_cross), jsd from a sum of jsd_terms over the row.
//   4. The gradient element by element (GradCoefs, grad_kl_element, grad_mode_seeking_element,
//      hard_grad_part) and the row loss (hard_loss, row_loss).
// logit_mse (Caruana et al. 2006, logit matching; T = 1) takes the same steps with other terms:
// step 1 sums the raw logits of s and t (softmax(s)'s exps only for the hard term: student_exps),
// step 3 is a sum of mse_terms over the row, centred by the row means (mse_row), and step 4 is
// grad_mse_element.
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

enum Kind : int32_t { KIND_KL = 0, KIND_REVERSE_KL = 1, KIND_JSD = 2, KIND_LOGIT_MSE = 3 };

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

// log p - log q for one element, from the raw logits.
template <class A> KD_HD A log_ratio_pq(A s, A t, RowNorm<A> n) {
  return (t - s) * n.inv_t + n.lse_gap;
}

// weight * value with 0 * anything = 0: the convention 0 log 0 = 0 that makes -inf teacher
// entries (masked vocabulary) contribute nothing instead of NaN. A NaN weight stays NaN.
template <class A> KD_HD A weighted(A weight, A value) { return weight == A(0) ? A(0) : weight * value; }

// log(beta*p + (1-beta)*q) from log p and log q without leaving log space, so rows whose p or
// q underflow keep a finite log-mixture (the JSD NaN trap).
// log(exp(x) + exp(y)) (-inf when both are -inf).
template <class A>
KD_HD A log_add_exp(A x, A y) {
  // Written so a NaN in either argument reaches the result (a plain min would drop a NaN x).
  const A hi = x > y ? x : y;
  const A lo = x > y ? y : x;
  const A tail = log1p_unit(exp_nonpos(lo - hi));
  return lo == neg_inf<A>() ? hi : hi + tail;
}
template <class A>
KD_HD A log_mixture(A log_p, A log_q, A log_beta, A log1m_beta) {
  return log_add_exp(log_p + log_beta, log_q + log1m_beta);
}

// Hard cross-entropy of softmax(s) against label y with smoothing eps:
// (1-eps) * (lse_s - s_y) + eps * (lse_s - mean(s)).
// From lse_s = log sum_j exp(s_j) (the sparse rows have it without a RowNorm).
template <class A>
KD_HD A hard_loss_from_lse(A s_y, A sum_s, int64_t n_cols, A eps, A lse_s) {
  const A nll = lse_s - s_y;
  if (eps == A(0)) return nll;
  return (A(1) - eps) * nll + eps * (lse_s - sum_s / A(n_cols));
}
template <class A>
KD_HD A hard_loss(A s_y, A sum_s, int64_t n_cols, A eps, RowNorm<A> n) {
  return hard_loss_from_lse(s_y, sum_s, n_cols, eps, n.lse_s);
}

// d(hard)/ds_k without the one-hot part, which the kernel subtracts at the label:
// softmax(s)_k - eps/C.  d(hard)/ds_y additionally has -(1 - eps).
template <class A>
KD_HD A hard_grad(A e_s, A eps_over_c, RowNorm<A> n) { return e_s * n.inv_zs - eps_over_c; }

// Soft-term gradient with respect to a = s/T (the kernel multiplies by soft_grad_coef).
//   kl:          q_k - p_k
//   reverse_kl:  q_k * (log q_k - log p_k - KL(q||p))
//   jsd:         (1-beta) * q_k * (log q_k - log m_k - KL(q||m))
// `ratio` is the element's log ratio (reverse_kl_ratio, or jsd_terms' ratio; unused for kl).
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


// ---- widening, and the gradient-dtype rule ----
// Storage -> accumulation type (float, or double for double rows).
template <class A> KD_HD A to_acc(float v) { return static_cast<A>(v); }
template <class A> KD_HD A to_acc(double v) { return static_cast<A>(v); }
template <class A> KD_HD A to_acc(bf16_bits v) { return static_cast<A>(to_acc_float(v)); }
template <class A> KD_HD A to_acc(f16_bits v) { return static_cast<A>(to_acc_float(v)); }

// The gradient is stored in the student's dtype, except float16 students: their unnormalized
// gradient (entries near 1/C) underflows float16's subnormals, so it stays float32. (The torch
// side, grad_dtype in csrc/op_common.h, states the same rule for the output tensor.)
template <class S> struct GradStorage { using type = S; };
template <> struct GradStorage<f16_bits> { using type = float; };
template <class S> using grad_storage_t = typename GradStorage<S>::type;

// max that keeps NaN (an IEEE comparison would drop it).
template <class A> KD_HD A nan_max(A x, A y) { return (x > y || x != x) ? x : y; }

// ---- step 1: the exps of one element, relative to a part's maxima ----
// The shift of a part's exps: its maximum, or 0 for an all -inf part (masked vocabulary), so
// those exps are 0 instead of NaN.
template <class A> KD_HD A part_shift(A part_max) { return part_max == neg_inf<A>() ? A(0) : part_max; }

template <class A> struct Shifts { A a, b, s; };  // subtracted from s/T, t/T and s
// max(s/T) is max(s)/T exactly: multiplying by 1/T > 0 is monotone in IEEE rounding.
template <class A> KD_HD Shifts<A> shifts_of(A max_s, A max_t, A inv_t) {
  const A sh_s = part_shift(max_s);
  return Shifts<A>{sh_s * inv_t, part_shift(max_t) * inv_t, sh_s};
}

// How softmax(s) (the hard term) gets its exps, fixed per call:
//   squarings 1 or 2 (T == 2 or 4): s/T - max(s)/T is exactly (s - max s)/T (1/T is a power of
//     two), so exp(s - max s) is e_a squared once or twice (2-5 ulp), no exp;
//   separate: an exp of its own (T not 1, 2 or 4, with a hard term);
//   else e_a itself (T == 1: r == q; or no hard term: a harmless stand-in).
struct HardExp {
  int squarings;
  bool separate;
};
KD_HD HardExp hard_exp_mode(const Params& p) {
  const bool separate = p.hard_coef != 0.0 && !p.same_scale;
  return HardExp{separate ? p.hard_exp_squarings : 0, separate && p.hard_exp_squarings == 0};
}
// softmax(s)'s exp from e_a, the mode fixed at compile time (`if constexpr`: GCC's vectorizer
// kept a lane loop scalar when it had to fold a mode passed as a value); elem_exps(..., HardExp)
// dispatches a run-time mode (the CUDA rows).
template <int Squarings, bool Separate, class A> KD_HD A hard_exp(A s, A e_a, A shift_s) {
  if constexpr (Squarings == 1) {
    return e_a * e_a;
  } else if constexpr (Squarings == 2) {
    const A ea2 = e_a * e_a;
    return ea2 * ea2;
  } else if constexpr (Separate) {
    return exp_nonpos(s - shift_s);
  } else {
    return e_a;
  }
}

// One element's exponent arguments x (logit/T - shift) and exps.
template <class A> struct ElemExps { A xa, xb, ea, eb, es; };
template <int Squarings, bool Separate, class A>
KD_HD ElemExps<A> elem_exps(A s, A t, A inv_t, const Shifts<A>& sh) {
  ElemExps<A> e;
  e.xa = s * inv_t - sh.a;
  e.xb = t * inv_t - sh.b;
  e.ea = exp_nonpos(e.xa);
  e.eb = exp_nonpos(e.xb);
  e.es = hard_exp<Squarings, Separate>(s, e.ea, sh.s);
  return e;
}
template <class A> KD_HD ElemExps<A> elem_exps(A s, A t, A inv_t, const Shifts<A>& sh, HardExp h) {
  if (h.squarings == 1) return elem_exps<1, false>(s, t, inv_t, sh);
  if (h.squarings == 2) return elem_exps<2, false>(s, t, inv_t, sh);
  return h.separate ? elem_exps<0, true>(s, t, inv_t, sh) : elem_exps<0, false>(s, t, inv_t, sh);
}

// logit_mse's exps (T = 1): softmax(s)'s only, for the hard term (e_a = e_s, as any T = 1 call
// has them); its soft term needs no exp of the teacher, so e_b and the cross sum stay 0.
template <class A> KD_HD ElemExps<A> student_exps(A s, const Shifts<A>& sh) {
  ElemExps<A> e;
  e.xa = s - sh.s;
  e.xb = A(0);
  e.ea = exp_nonpos(e.xa);
  e.eb = A(0);
  e.es = e.ea;
  return e;
}
// The exps a call of kind Kind needs, the kind fixed at compile time (the CPU loops).
template <int32_t Kind, int Squarings, bool Separate, class A>
KD_HD ElemExps<A> kind_exps(A s, A t, A inv_t, const Shifts<A>& sh) {
  if constexpr (Kind == KIND_LOGIT_MSE) {
    return student_exps(s, sh);
  } else {
    return elem_exps<Squarings, Separate>(s, t, inv_t, sh);
  }
}

// The cross sum's term. kl: e_b (x_b - x_a), since log p_k - log q_k = x_b - x_a + log z_a -
// log z_b, so KL(p||q) = cross / z_b + log z_a - log z_b with nothing large cancelling (huge
// logits included). reverse_kl: e_a (x_a - x_b), the mirror image. jsd has none (0).
// weighted: a -inf (masked) entry adds 0.
// ElemExps by reference: GCC 12 kept the CPU's exp loops scalar (5x slower) when this took it
// by value.
template <int32_t Kind, class A> KD_HD A cross_term(const ElemExps<A>& e) {
  if constexpr (Kind == KIND_KL) {
    return weighted(e.eb, e.xb - e.xa);
  } else if constexpr (Kind == KIND_REVERSE_KL) {
    return weighted(e.ea, e.xa - e.xb);
  } else {
    return A(0);
  }
}

template <class A> KD_HD A cross_term(int32_t kind, const ElemExps<A>& e) {
  return kind == KIND_KL ? cross_term<KIND_KL>(e) : kind == KIND_REVERSE_KL ? cross_term<KIND_REVERSE_KL>(e) : A(0);
}

// Statistics of a part of a row: maxima of the raw logits, exp sums relative to
// shifts_of(max_s, max_t), the cross sum in the same frame, and the logit sums (the student's
// for label smoothing and logit_mse, the teacher's for logit_mse only; plain sums, which need
// no rescaling).
template <class A> struct PartStats {
  A max_s, max_t;
  A z_a, z_b, z_s;
  A cross;
  A sum_s;
  A sum_t;
};
template <class A> KD_HD PartStats<A> empty_part() {
  return PartStats<A>{neg_inf<A>(), neg_inf<A>(), A(0), A(0), A(0), A(0), A(0), A(0)};
}
// Adds one element's exps (computed against this part's shifts) and, with need_sum, its student
// logit s; logit_mse also its teacher logit t.
template <class A>
KD_HD void add_element(PartStats<A>& p, int32_t kind, const ElemExps<A>& e, A s, A t, bool need_sum) {
  p.z_a += e.ea;
  p.z_b += e.eb;
  p.z_s += e.es;
  p.cross += cross_term(kind, e);
  if (need_sum) p.sum_s += s;
  if (kind == KIND_LOGIT_MSE) p.sum_t += t;
}

// ---- step 2: online rescaling ----
// A part's sums seen from larger reference maxima (max_s, max_t): each exp gains the factor
// r = exp(d), d = part shift/T - reference/T (r_s for softmax(s), d relative to s), and each
// x of the cross sum shifts by d. An empty or all -inf part gets r = 0 (its sums are 0); an
// all -inf row makes its normalizers 0 and the loss NaN, as softmax of it is.
template <class A> struct Scales { A r_a, r_b, r_s, d_a, d_b; };
template <class A>
KD_HD Scales<A> part_scales(A part_max_s, A part_max_t, A max_s, A max_t, A inv_t, HardExp h) {
  Scales<A> sc;
  const bool no_s = part_max_s == neg_inf<A>(), no_t = part_max_t == neg_inf<A>();
  sc.d_a = no_s ? A(0) : part_max_s * inv_t - max_s * inv_t;
  sc.d_b = no_t ? A(0) : part_max_t * inv_t - max_t * inv_t;
  sc.r_a = no_s ? A(0) : exp_nonpos(sc.d_a);
  sc.r_b = no_t ? A(0) : exp_nonpos(sc.d_b);
  const A r_a2 = sc.r_a * sc.r_a;
  sc.r_s = h.squarings == 1 ? r_a2
         : h.squarings == 2 ? r_a2 * r_a2
         : h.separate ? (no_s ? A(0) : exp_nonpos(part_max_s - max_s)) : sc.r_a;
  return sc;
}
// The part's cross sum in the reference frame: sum e r (x + d_w - d_o) over its elements.
template <class A> KD_HD A rescaled_cross(int32_t kind, const PartStats<A>& p, Scales<A> sc) {
  if (kind == KIND_KL) return weighted(sc.r_b, p.cross) + weighted(sc.r_b * p.z_b, sc.d_b - sc.d_a);
  if (kind == KIND_REVERSE_KL) return weighted(sc.r_a, p.cross) + weighted(sc.r_a * p.z_a, sc.d_a - sc.d_b);
  return A(0);
}
// total += part, rescaled (total's maxima are the reference).
template <class A> KD_HD void add_scaled(PartStats<A>& total, const PartStats<A>& p, Scales<A> sc, int32_t kind) {
  total.z_a += sc.r_a * p.z_a;
  total.z_b += sc.r_b * p.z_b;
  total.z_s += sc.r_s * p.z_s;
  total.cross += rescaled_cross(kind, p, sc);
  total.sum_s += p.sum_s;
  total.sum_t += p.sum_t;
}
// The union of two parts. Bitwise commutative (each side's contribution depends only on itself
// and the common maxima, and IEEE addition commutes), so every lane of a butterfly all-reduce
// ends with the same value.
template <class A>
KD_HD PartStats<A> merge_parts(const PartStats<A>& x, const PartStats<A>& y, A inv_t, HardExp h, int32_t kind) {
  PartStats<A> m = empty_part<A>();
  m.max_s = nan_max(x.max_s, y.max_s);
  m.max_t = nan_max(x.max_t, y.max_t);
  add_scaled(m, x, part_scales(x.max_s, x.max_t, m.max_s, m.max_t, inv_t, h), kind);
  add_scaled(m, y, part_scales(y.max_s, y.max_t, m.max_s, m.max_t, inv_t, h), kind);
  return m;
}
// p with its maxima raised to (max_s, max_t) (an online update before adding larger elements).
template <class A>
KD_HD PartStats<A> raise_part(const PartStats<A>& p, A max_s, A max_t, A inv_t, HardExp h, int32_t kind) {
  PartStats<A> m = empty_part<A>();
  m.max_s = max_s;
  m.max_t = max_t;
  add_scaled(m, p, part_scales(p.max_s, p.max_t, max_s, max_t, inv_t, h), kind);
  return m;
}

// The row's normalizers as seen by exps stashed relative to a part's shifts (the CPU keeps its
// chunks' exps and folds the chunk's scales in here instead of rewriting them).
template <class A> KD_HD RowNorm<A> part_norm(RowNorm<A> n, Scales<A> sc) {
  n.inv_za *= sc.r_a;
  n.inv_zb *= sc.r_b;
  n.inv_zs *= sc.r_s;
  return n;
}

// ---- step 3: the row's soft loss ----
// kl: KL(p||q) = cross / z_b + log z_a - log z_b; reverse_kl: KL(q||p) = cross / z_a + log z_b
// - log z_a (both in the frame of the row maxima, see cross_term).
template <class A> KD_HD A soft_from_cross(int32_t kind, A cross, A z_a, A z_b) {
  if (kind == KIND_KL) return cross / z_b + (kd_log(z_a) - kd_log(z_b));
  return cross / z_a + (kd_log(z_b) - kd_log(z_a));
}

// jsd's per-element terms (in log space): p_k (log p_k - log m_k), q_k (log q_k - log m_k),
// and the gradient's ratio log q_k - log m_k. p_k, q_k come as exps times the normalizers'
// inverses the caller holds (chunk_norm on the CPU).
template <class A> struct JsdTerms { A pm, qm, ratio; };
template <class A>
KD_HD JsdTerms<A> jsd_terms(A s, A t, A e_a, A e_b, RowNorm<A> n, A log_beta, A log1m_beta) {
  const A log_p = t * n.inv_t - n.lse_b;
  const A log_q = s * n.inv_t - n.lse_a;
  const A log_m = log_mixture(log_p, log_q, log_beta, log1m_beta);
  JsdTerms<A> j;
  j.pm = weighted(e_b * n.inv_zb, log_p - log_m);
  j.qm = weighted(e_a * n.inv_za, log_q - log_m);
  j.ratio = log_q - log_m;
  return j;
}
// jsd = beta KL(p||m) + (1-beta) KL(q||m).
template <class A> KD_HD A jsd_soft(A kl_pm, A kl_qm, A beta) { return beta * kl_pm + (A(1) - beta) * kl_qm; }
// reverse_kl's gradient ratio log q_k - log p_k, from the raw logits.
template <class A> KD_HD A reverse_kl_ratio(A s, A t, RowNorm<A> n) { return -log_ratio_pq(s, t, n); }

// logit_mse: soft = 1/(2C) sum_k (s^_k - t^_k)^2, s^ and t^ the logits centred to zero mean over
// the row. It is T^2 KL(p||q) in the limit T -> infinity (Hinton et al. 2015, section 2.1), and
// its gradient (s^_k - t^_k)/C needs no exp (the mean of s^ - t^ is 0, so centring adds no term).
// The row means from step 1's logit sums.
template <class A> struct MseRow { A mean_s, mean_t, inv_c; };
template <class A> KD_HD MseRow<A> mse_row(A sum_s, A sum_t, int64_t n_cols) {
  const A c = static_cast<A>(n_cols);
  return MseRow<A>{sum_s / c, sum_t / c, A(1) / c};
}
// One element's centred gap s^_k - t^_k and its square, the soft sum's term. Each logit is
// centred before the difference: the sum is of squares of centred values, not sum d^2 - C mean^2
// (which cancels catastrophically when the rows are far from zero mean). A non-finite logit
// makes its row's means, and so every gap and the loss, non-finite (NaN for the loss).
template <class A> struct MseTerms { A gap, sq; };
template <class A> KD_HD MseTerms<A> mse_terms(A s, A t, MseRow<A> m) {
  const A gap = (s - m.mean_s) - (t - m.mean_t);
  return MseTerms<A>{gap, gap * gap};
}
template <class A> KD_HD A mse_soft(A sq_sum, MseRow<A> m) { return A(0.5) * sq_sum * m.inv_c; }

// ---- step 4: the gradient ----
// Per-call coefficients of d loss_i / d s_k.
template <class A> struct GradCoefs {
  A soft_g;      // soft_coef / T (times the row weight)
  A hard_g;      // hard_coef (times the row weight)
  A eps_over_c;  // label smoothing's uniform part
  A one_m_eps;   // the one-hot part at the label
  A mode_weight; // reverse_kl 1, jsd 1 - beta
};
template <class A> KD_HD GradCoefs<A> grad_coefs(const Params& p, int64_t n_cols, A row_weight) {
  GradCoefs<A> g;
  g.soft_g = static_cast<A>(p.soft_grad_coef) * row_weight;
  g.hard_g = static_cast<A>(p.hard_coef) * row_weight;
  g.eps_over_c = static_cast<A>(p.smoothing) / static_cast<A>(n_cols);
  g.one_m_eps = A(1) - static_cast<A>(p.smoothing);
  g.mode_weight = p.kind == KIND_JSD ? A(1) - static_cast<A>(p.beta) : A(1);
  return g;
}
// The hard part: hard_g (r_k - eps/C), and at the label minus the one-hot (1 - eps) (taken
// from r_y - eps/C first: no cancellation against the soft part when r_y is near 1).
template <class A> KD_HD A hard_grad_combine(A h, GradCoefs<A> g, bool at_label) {
  return g.hard_g * (at_label ? h - g.one_m_eps : h);
}
template <class A> KD_HD A hard_grad_part(A e_s, RowNorm<A> n, GradCoefs<A> g, bool at_label) {
  return hard_grad_combine(hard_grad(e_s, g.eps_over_c, n), g, at_label);
}
// The same from r_k = softmax(s)_k itself (the sparse rows compute it from lse_s).
template <class A> KD_HD A hard_grad_from_prob(A r, GradCoefs<A> g, bool at_label) {
  return hard_grad_combine(r - g.eps_over_c, g, at_label);
}
// kl: soft_g (q_k - p_k) + the hard part.
template <class A>
KD_HD A grad_kl_element(A e_a, A e_b, A e_s, RowNorm<A> n, GradCoefs<A> g, bool at_label) {
  return g.soft_g * soft_grad_kl(e_a, e_b, n) + hard_grad_part(e_s, n, g, at_label);
}
// reverse_kl / jsd: soft_g w q_k (ratio_k - row_kl) + the hard part.
template <class A>
KD_HD A grad_mode_seeking_element(A e_a, A ratio, A row_kl, A e_s, RowNorm<A> n, GradCoefs<A> g,
                                  bool at_label) {
  return g.soft_g * soft_grad_mode_seeking(e_a, ratio, row_kl, g.mode_weight, n) +
         hard_grad_part(e_s, n, g, at_label);
}
// logit_mse: soft_g (s^_k - t^_k)/C + the hard part.
template <class A>
KD_HD A grad_mse_element(A gap, A e_s, RowNorm<A> n, MseRow<A> m, GradCoefs<A> g, bool at_label) {
  return g.soft_g * (gap * m.inv_c) + hard_grad_part(e_s, n, g, at_label);
}
// kl's, reverse_kl's or jsd's element (kl ignores ratio and row_kl; the mode-seeking kinds
// ignore e_b).
template <class A>
KD_HD A grad_element(int32_t kind, A e_a, A e_b, A ratio, A row_kl, A e_s, RowNorm<A> n, GradCoefs<A> g,
                     bool at_label) {
  return kind == KIND_KL ? grad_kl_element(e_a, e_b, e_s, n, g, at_label)
                         : grad_mode_seeking_element(e_a, ratio, row_kl, e_s, n, g, at_label);
}

}  // namespace math
}  // namespace kdfast
