// The per-row work of the CUDA kernels (csrc/cuda/distill.cu), written against a "group" of
// threads that owns one row, so the same code runs with a sub-warp, a whole block, or (for the
// host simulation in .ci/cuda_build.sh, which checks it against the CPU rows without a GPU)
// host threads. The group type provides: `rank`, `width`, `reduce<K, kMaxMask>(A (&)[K], slot)`
// (an all-reduce: every member gets the result) and `sync()`.
//
// Every formula is a kdfast::math function (kd_math.h), called exactly as csrc/cpu/rows.h calls
// it; this file only owns the loops and where the reductions happen.
#pragma once

#include <stdint.h>
#include <string.h>

#include "kdfast/kd_math.h"

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define KDFAST_DEV __device__ __forceinline__
#else  // host simulation
#include <cassert>
#define KDFAST_DEV inline
#endif

#ifndef CUDA_KERNEL_ASSERT_MSG  // from c10/macros/Macros.h in the extension
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) assert((cond) && msg)
#endif

namespace kdfast {
namespace cuda {

struct KernelArgs {
  const void* student;  // (N, C), unit stride along C
  int64_t student_row_stride;
  const void* teacher;
  int64_t teacher_row_stride;
  const int64_t* target;  // nullptr when params.has_target == 0
  int64_t target_stride;
  void* loss_rows;  // (N,) float, or double for float64 inputs
  void* grad;       // (N, C) or nullptr (no gradient work); may alias student (in place)
  int64_t grad_row_stride;
  int64_t n_rows;
  int32_t n_cols;
  math::Params params;
  const double* row_weight;  // device scalar multiplying loss_i and its gradient, or nullptr (1)
};

namespace rows {

using math::bf16_bits;
using math::f16_bits;

// ---- element conversions (storage layouts equal at::BFloat16 / at::Half) ----
KDFAST_DEV float widen(float v) { return v; }
KDFAST_DEV double widen(double v) { return v; }
KDFAST_DEV float widen(bf16_bits v) { return math::to_acc_float(v); }
#if defined(__CUDACC__)
KDFAST_DEV float widen(f16_bits v) { return __half2float(__ushort_as_half(v.x)); }
#else
KDFAST_DEV float widen(f16_bits v) { return math::to_acc_float(v); }
#endif

KDFAST_DEV int imin(int x, int y) { return x < y ? x : y; }

// ---- vector loads/stores of V elements through 4/8/16-byte words ----
template <class T, int V>
struct Pack {
  T v[V];
};

#if defined(__CUDACC__)
using Word8 = uint2;
using Word16 = uint4;
#else
struct alignas(8) Word8 { uint32_t x, y; };
struct alignas(16) Word16 { uint32_t x, y, z, w; };
#endif
template <int kBytes> struct Word;
template <> struct Word<4> { using type = uint32_t; };
template <> struct Word<8> { using type = Word8; };
template <> struct Word<16> { using type = Word16; };

template <class T, int V>
KDFAST_DEV Pack<T, V> load_pack(const T* p) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * V;
  constexpr int kWordBytes = kBytes >= 16 ? 16 : kBytes;
  using W = typename Word<kWordBytes>::type;
  W w[kBytes / kWordBytes];
#pragma unroll
  for (int i = 0; i < kBytes / kWordBytes; ++i) w[i] = reinterpret_cast<const W*>(p)[i];
  Pack<T, V> out;
  memcpy(&out, w, kBytes);
  return out;
}

template <class T, int V>
KDFAST_DEV void store_pack(T* p, const Pack<T, V>& in) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * V;
  constexpr int kWordBytes = kBytes >= 16 ? 16 : kBytes;
  using W = typename Word<kWordBytes>::type;
  W w[kBytes / kWordBytes];
  memcpy(w, &in, kBytes);
#pragma unroll
  for (int i = 0; i < kBytes / kWordBytes; ++i) reinterpret_cast<W*>(p)[i] = w[i];
}

// Element offset of p from the previous V-element boundary.
template <int V, class T>
KDFAST_DEV int misalignment(const T* p) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % V);
}

// ---- reduction operators ----
// max that keeps NaN (IEEE comparisons would drop it); -inf entries reduce normally. The CPU's
// max may drop a NaN, but a NaN element then makes that exp sum NaN, so every output matches.
template <class A>
KDFAST_DEV A nan_max(A x, A y) {
  return (x > y || x != x) ? x : y;
}

// Combines K partial values; bit i of kMaxMask: value i is a max, else a sum. Both operations
// are commutative in IEEE arithmetic, so every lane of a butterfly ends with the same value.
template <int K, int kMaxMask, class A>
KDFAST_DEV void combine(A (&acc)[K], const A (&other)[K]) {
#pragma unroll
  for (int i = 0; i < K; ++i) acc[i] = ((kMaxMask >> i) & 1) ? nan_max(acc[i], other[i]) : acc[i] + other[i];
}

// ---- the element loop of one pass ----
// Calls f(k, s_k, t_k) for this thread's elements of the row; with kStore, f returns the
// gradient element, stored at gr[k]. Scalar head up to the vector boundary, vectors, scalar tail;
// all scalar when student and teacher rows are misaligned with each other. The element -> thread
// map depends on s and t only, so every pass of a row uses the same map: each element is read
// (and, with kStore, then written) by one thread, which keeps in place (gr == s) safe, and the
// reductions add in the same order with or without a gradient, in place or not (bitwise equal
// losses). A gradient row misaligned with the student's is stored element by element.
template <int V, bool kStore, class A, class S, class T, class Gd, class F>
KDFAST_DEV void row_loop(const S* s, const T* t, Gd* gr, int C, int rank, int nthr, F&& f) {
  const int ms = misalignment<V>(s);
  const bool aligned = ms == misalignment<V>(t);
  const int head = aligned ? imin((V - ms) % V, C) : C;
  const int n_vec = aligned ? (C - head) / V : 0;

  auto scalar = [&](int k) {
    const A sk = static_cast<A>(widen(s[k]));
    const A tk = static_cast<A>(widen(t[k]));
    if constexpr (kStore) {
      math::store_from_acc(gr + k, f(k, sk, tk));
    } else {
      f(k, sk, tk);
    }
  };
  for (int k = rank; k < head; k += nthr) scalar(k);
  if constexpr (kStore) {
    const bool grad_vec = misalignment<V>(gr) == ms;
    for (int c = rank; c < n_vec; c += nthr) {
      const int k0 = head + c * V;
      const Pack<S, V> sp = load_pack<S, V>(s + k0);
      const Pack<T, V> tp = load_pack<T, V>(t + k0);
      Pack<Gd, V> gp;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        math::store_from_acc(&gp.v[j], f(k0 + j, static_cast<A>(widen(sp.v[j])), static_cast<A>(widen(tp.v[j]))));
      }
      if (grad_vec) {
        store_pack<Gd, V>(gr + k0, gp);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) gr[k0 + j] = gp.v[j];
      }
    }
  } else {
    for (int c = rank; c < n_vec; c += nthr) {
      const int k0 = head + c * V;
      const Pack<S, V> sp = load_pack<S, V>(s + k0);
      const Pack<T, V> tp = load_pack<T, V>(t + k0);
#pragma unroll
      for (int j = 0; j < V; ++j) f(k0 + j, static_cast<A>(widen(sp.v[j])), static_cast<A>(widen(tp.v[j])));
    }
  }
  for (int k = head + n_vec * V + rank; k < C; k += nthr) scalar(k);
}

// Zero gradient row of an ignored target.
template <int V, class Gd>
KDFAST_DEV void zero_row(Gd* gr, int C, int rank, int nthr) {
  const int m = misalignment<V>(gr);
  const int head = imin((V - m) % V, C);
  const int n_vec = (C - head) / V;
  const Gd zero{};
  Pack<Gd, V> zeros;
#pragma unroll
  for (int j = 0; j < V; ++j) zeros.v[j] = zero;
  for (int k = rank; k < head; k += nthr) gr[k] = zero;
  for (int c = rank; c < n_vec; c += nthr) store_pack<Gd, V>(gr + head + c * V, zeros);
  for (int k = head + n_vec * V + rank; k < C; k += nthr) gr[k] = zero;
}

// ---- one row: the passes of rows.h with three group reductions in between ----
// S, T: storage types of student and teacher rows; Gd: gradient storage; A: accumulation type;
// V: elements per vector step. Every row that is not ignored does exactly three reductions
// (slots 0, 1, 2), whatever the kind and whether a gradient is wanted.
template <class S, class T, class Gd, class A, int V, class Group>
KDFAST_DEV void process_row(const KernelArgs& a, int64_t row, const Group& grp) {
  using namespace ::kdfast::math;
  const Params& P = a.params;
  const int C = a.n_cols;
  const int rank = grp.rank;
  const int nthr = grp.width;
  const S* s = static_cast<const S*>(a.student) + row * a.student_row_stride;
  const T* t = static_cast<const T*>(a.teacher) + row * a.teacher_row_stride;
  Gd* gr = a.grad != nullptr ? static_cast<Gd*>(a.grad) + row * a.grad_row_stride : nullptr;
  A* out_loss = static_cast<A*>(a.loss_rows);

  int64_t y = -1;
  if (P.has_target) {
    y = a.target[row * a.target_stride];
    if (y == P.ignore_index) {
      if (rank == 0) out_loss[row] = A(0);
      if (gr != nullptr) zero_row<V>(gr, C, rank, nthr);
      return;
    }
    const bool valid = y >= 0 && y < C;
    if (rank == 0) {
      CUDA_KERNEL_ASSERT_MSG(valid, "kdfast: target out of range: expected a class index in [0, C) or ignore_index");
    }
    if (!valid) return;  // not reached on the GPU: the assert stops the kernel
  }

  const bool need_hard = P.hard_coef != 0.0;
  const bool separate_hard_exp = need_hard && !P.same_scale;
  const bool smooth = need_hard && P.smoothing != 0.0;
  const A inv_t = static_cast<A>(P.inv_temperature);
  const A eps = static_cast<A>(P.smoothing);
  const A eps_over_c = eps / static_cast<A>(C);
  const A weight = a.row_weight != nullptr ? static_cast<A>(*a.row_weight) : A(1);
  const A soft_g = static_cast<A>(P.soft_grad_coef) * weight;
  const A hard_g = static_cast<A>(P.hard_coef) * weight;
  const A one_m_eps = A(1) - eps;
  // Read before any gradient store: in place, the gradient overwrites the student row. The
  // reductions below (a barrier) and grp.sync() order this read before every store.
  A s_y = A(0);
  if (need_hard && rank == 0) s_y = static_cast<A>(widen(s[y]));

  // Pass 1: maxima (and the logit sum label smoothing needs). No exps.
  A r1[3] = {neg_inf<A>(), neg_inf<A>(), A(0)};
  row_loop<V, false, A>(s, t, gr, C, rank, nthr, [&](int, A sk, A tk) {
    r1[0] = nan_max(r1[0], sk);
    r1[1] = nan_max(r1[1], tk);
    if (smooth) r1[2] += sk;
  });
  grp.template reduce<3, 0b011>(r1, 0);
  const A max_s = r1[0], max_t = r1[1], sum_s = r1[2];

  // Pass 2: exp sums (rows.h's expressions; rows.h stashes these exps, the GPU recomputes them).
  const A max_a = max_s * inv_t, max_b = max_t * inv_t;
  A r2[3] = {A(0), A(0), A(0)};
  row_loop<V, false, A>(s, t, gr, C, rank, nthr, [&](int, A sk, A tk) {
    r2[0] += exp_nonpos(sk * inv_t - max_a);
    r2[1] += exp_nonpos(tk * inv_t - max_b);
    if (separate_hard_exp) r2[2] += exp_nonpos(sk - max_s);
  });
  grp.template reduce<3, 0>(r2, 1);
  // softmax(s) == softmax(s/T) when T == 1; without a hard term e_s is only a dummy (as rows.h).
  const RowNorm<A> n = row_norm(inv_t, max_s, max_t, r2[0], r2[1], separate_hard_exp ? r2[2] : r2[0]);

  // The same exps as pass 2 (exp_arg_a/b are pass 2's arguments: n.max_a == max_a).
  auto exp_a = [&](A sk) { return exp_nonpos(exp_arg_a(sk, n)); };
  auto exp_b = [&](A tk) { return exp_nonpos(exp_arg_b(tk, n)); };
  auto exp_s = [&](A sk, A ea) { return separate_hard_exp ? exp_nonpos(sk - n.max_s) : ea; };
  // The label's element gets the one-hot term, as rows.h's recomputed label element; -1: none.
  const int label = (need_hard && gr != nullptr) ? static_cast<int>(y) : -1;
  auto grad_element = [&](int k, A soft_part, A es) -> A {
    if (k == label) return hard_g * (hard_grad(es, eps_over_c, n) - one_m_eps) + soft_g * soft_part;
    return soft_g * soft_part + hard_g * hard_grad(es, eps_over_c, n);
  };
  if (gr != nullptr) grp.sync();

  // Pass 3: the soft loss; for kl also the gradient. Pass 4: the gradient of reverse_kl / jsd.
  A r3[2] = {A(0), A(0)};
  A soft;
  if (P.kind == KIND_KL) {
    if (gr != nullptr) {
      row_loop<V, true, A>(s, t, gr, C, rank, nthr, [&](int k, A sk, A tk) -> A {
        const A ea = exp_a(sk), eb = exp_b(tk);
        r3[0] += weighted(eb * n.inv_zb, log_ratio_pq(sk, tk, n));
        return grad_element(k, soft_grad_kl(ea, eb, n), exp_s(sk, ea));
      });
    } else {
      row_loop<V, false, A>(s, t, gr, C, rank, nthr, [&](int, A sk, A tk) {
        r3[0] += weighted(exp_b(tk) * n.inv_zb, log_ratio_pq(sk, tk, n));
      });
    }
    grp.template reduce<2, 0>(r3, 2);
    soft = r3[0];
  } else if (P.kind == KIND_REVERSE_KL) {
    row_loop<V, false, A>(s, t, gr, C, rank, nthr, [&](int, A sk, A tk) {
      r3[0] += weighted(exp_a(sk) * n.inv_za, -log_ratio_pq(sk, tk, n));
    });
    grp.template reduce<2, 0>(r3, 2);
    soft = r3[0];
    const A row_kl = r3[0];
    if (gr != nullptr) {
      row_loop<V, true, A>(s, t, gr, C, rank, nthr, [&](int k, A sk, A tk) -> A {
        const A ea = exp_a(sk);
        const A ratio = -log_ratio_pq(sk, tk, n);
        return grad_element(k, soft_grad_mode_seeking(ea, ratio, row_kl, A(1), n), exp_s(sk, ea));
      });
    }
  } else {  // jsd, in log space
    const A log_beta = static_cast<A>(P.log_beta), log1m_beta = static_cast<A>(P.log1m_beta);
    row_loop<V, false, A>(s, t, gr, C, rank, nthr, [&](int, A sk, A tk) {
      const A log_p = tk * inv_t - n.lse_b;
      const A log_q = sk * inv_t - n.lse_a;
      const A log_m = log_mixture(log_p, log_q, log_beta, log1m_beta);
      r3[0] += weighted(exp_b(tk) * n.inv_zb, log_p - log_m);
      r3[1] += weighted(exp_a(sk) * n.inv_za, log_q - log_m);
    });
    grp.template reduce<2, 0>(r3, 2);
    const A beta = static_cast<A>(P.beta);
    soft = beta * r3[0] + (A(1) - beta) * r3[1];
    const A kl_qm = r3[1];
    if (gr != nullptr) {
      const A weight = A(1) - static_cast<A>(P.beta);
      row_loop<V, true, A>(s, t, gr, C, rank, nthr, [&](int k, A sk, A tk) -> A {
        const A log_p = tk * inv_t - n.lse_b;
        const A log_q = sk * inv_t - n.lse_a;
        const A ratio = log_q - log_mixture(log_p, log_q, log_beta, log1m_beta);
        const A ea = exp_a(sk);
        return grad_element(k, soft_grad_mode_seeking(ea, ratio, kl_qm, weight, n), exp_s(sk, ea));
      });
    }
  }

  if (rank == 0) {
    const A hard = need_hard ? hard_loss(s_y, sum_s, C, eps, n) : A(0);
    out_loss[row] = weight * row_loss(soft, hard, P);
  }
}

}  // namespace rows
}  // namespace cuda
}  // namespace kdfast
