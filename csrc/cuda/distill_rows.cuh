// The per-row work of the CUDA kernels (csrc/cuda/distill.cu), written against a "group" of
// threads that owns one row, so the same code runs with a sub-warp, a whole block, or host
// threads (tests/cuda_host_sim.cpp, run by the default test suite, checks it against the CPU
// rows without a GPU). Every formula is a kd_math.h step; this file owns the loops, the
// element -> thread map and the group reductions (group_allreduce, shared with the
// simulation, which models shuffles, shared memory and barriers and flags a missing barrier).
//
// The group type provides: `rank`, `width`, `lanes` (threads per warp of the group: width for a
// sub-warp, 32 for a block), `shfl_xor(A v, int offset)` within a warp, `barrier()` (whole
// group; never called by sub-warp groups), and shared memory for the cross-warp step:
// `smem_store(int index, A v)` / `smem_load(int index)` over kSmemValues values.
//
// Reads of each row from global memory: kl and reverse_kl twice (pass 1: maxima, exp sums and
// the cross sum with online rescaling; pass 2: the gradient, exps recomputed relative to the
// row maxima), jsd three times (its log mixture needs the finished normalizers: pass 2 sums its
// terms, pass 3 writes the gradient). Without a gradient: once (kl, reverse_kl) or twice (jsd).
// HBM traffic per element, fp32 rows with a gradient: kl / reverse_kl 2 x 8 bytes read + 4
// written = 20 bytes; jsd 28 bytes (rows that fit in L2 read back from it instead).
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

// ---- element conversions (kd_math.h: storage layouts equal at::BFloat16 / at::Half) ----
template <class A, class X> KDFAST_DEV A widen(X v) { return math::to_acc<A>(v); }

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

// ---- group reductions ----
// Shared-memory values a group needs: 2 alternating slots of 32 warps x kMaxReduceValues.
constexpr int kMaxReduceValues = 8;
constexpr int kSmemValues = 2 * 32 * kMaxReduceValues;

// All-reduce of a struct V of A values over the group: a butterfly of shuffles within each
// warp, then (groups of several warps) the warps' results through shared memory, folded in
// warp order by every thread. `merge` must be bitwise commutative (kd_math.h merge_parts is),
// so every lane of a butterfly holds the same value. `parity` (per thread, the same in every
// thread of the group) alternates the shared-memory slot: a slot is rewritten only after the
// barrier of the reduction in between, so no barrier is needed after the reads.
template <class A, class V, class Group, class Merge>
KDFAST_DEV V group_allreduce(const Group& g, V v, int& parity, Merge merge) {
  constexpr int K = static_cast<int>(sizeof(V) / sizeof(A));
  static_assert(K <= kMaxReduceValues, "group_allreduce: too many values");
  for (int offset = g.lanes >> 1; offset > 0; offset >>= 1) {
    A mine[K], theirs[K];
    memcpy(mine, &v, sizeof(V));
#pragma unroll
    for (int i = 0; i < K; ++i) theirs[i] = g.shfl_xor(mine[i], offset);
    V other;
    memcpy(&other, theirs, sizeof(V));
    v = merge(v, other);
  }
  if (g.width <= g.lanes) return v;
  const int base = parity * 32 * kMaxReduceValues;
  parity ^= 1;
  if (g.rank % g.lanes == 0) {
    A mine[K];
    memcpy(mine, &v, sizeof(V));
    const int warp = g.rank / g.lanes;
#pragma unroll
    for (int i = 0; i < K; ++i) g.smem_store(base + warp * kMaxReduceValues + i, mine[i]);
  }
  g.barrier();
  auto load = [&](int warp) {
    A vals[K];
#pragma unroll
    for (int i = 0; i < K; ++i) vals[i] = g.smem_load(base + warp * kMaxReduceValues + i);
    V out;
    memcpy(&out, vals, sizeof(V));
    return out;
  };
  V acc = load(0);
  for (int w = 1; w < g.width / g.lanes; ++w) acc = merge(acc, load(w));
  return acc;
}

template <class A> struct JsdSums { A pm, qm; };

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
    const A sk = widen<A>(s[k]);
    const A tk = widen<A>(t[k]);
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
        math::store_from_acc(&gp.v[j], f(k0 + j, widen<A>(sp.v[j]), widen<A>(tp.v[j])));
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
      for (int j = 0; j < V; ++j) f(k0 + j, widen<A>(sp.v[j]), widen<A>(tp.v[j]));
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

// ---- one row ----
// S, T: storage types of student and teacher rows; Gd: gradient storage; A: accumulation type;
// V: elements per vector step. Every row that is not ignored does one group reduction (two for
// jsd), whatever its gradient, so `parity` stays the same in every thread of the group.
template <class S, class T, class Gd, class A, int V, class Group>
KDFAST_DEV void process_row(const KernelArgs& a, int64_t row, const Group& grp, int& parity) {
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

  const int32_t kind = P.kind;
  const bool need_hard = P.hard_coef != 0.0;
  const bool smooth = need_hard && P.smoothing != 0.0;
  const HardExp hx = hard_exp_mode(P);
  const A inv_t = static_cast<A>(P.inv_temperature);
  const A weight = a.row_weight != nullptr ? static_cast<A>(*a.row_weight) : A(1);
  const GradCoefs<A> gc = grad_coefs(P, C, weight);
  const A log_beta = static_cast<A>(P.log_beta), log1m_beta = static_cast<A>(P.log1m_beta);
  // Read before any gradient store: in place, the gradient overwrites the student row. The
  // reduction below and grp.sync() order this read before every store.
  A s_y = A(0);
  if (need_hard && rank == 0) s_y = widen<A>(s[y]);

  // Pass 1: this thread's part of the row, its maxima raised as larger elements come (online
  // rescaling, kd_math.h step 2), then the group's union.
  PartStats<A> part = empty_part<A>();
  Shifts<A> sh = shifts_of(part.max_s, part.max_t, inv_t);
  row_loop<V, false, A>(s, t, gr, C, rank, nthr, [&](int, A sk, A tk) {
    if (sk > part.max_s || tk > part.max_t || sk != sk || tk != tk) {
      part = raise_part(part, nan_max(part.max_s, sk), nan_max(part.max_t, tk), inv_t, hx, kind);
      sh = shifts_of(part.max_s, part.max_t, inv_t);
    }
    add_element(part, kind, elem_exps(sk, tk, inv_t, sh, hx), sk, smooth);
  });
  const PartStats<A> st = group_allreduce<A>(grp, part, parity, [&](const PartStats<A>& x, const PartStats<A>& z) {
    return merge_parts(x, z, inv_t, hx, kind);
  });
  const RowNorm<A> n = row_norm(inv_t, st.max_s, st.max_t, st.z_a, st.z_b, st.z_s);
  const Shifts<A> row_sh = shifts_of(st.max_s, st.max_t, inv_t);

  // The soft loss: kl / reverse_kl from the cross sum; jsd from its terms (pass 2).
  A soft, row_kl;
  if (kind != KIND_JSD) {
    soft = row_kl = soft_from_cross(kind, st.cross, st.z_a, st.z_b);
  } else {
    JsdSums<A> js{A(0), A(0)};
    row_loop<V, false, A>(s, t, gr, C, rank, nthr, [&](int, A sk, A tk) {
      const ElemExps<A> e = elem_exps(sk, tk, inv_t, row_sh, hx);
      const JsdTerms<A> j = jsd_terms(sk, tk, e.ea, e.eb, n, log_beta, log1m_beta);
      js.pm += j.pm;
      js.qm += j.qm;
    });
    js = group_allreduce<A>(grp, js, parity, [](const JsdSums<A>& x, const JsdSums<A>& z) {
      return JsdSums<A>{x.pm + z.pm, x.qm + z.qm};
    });
    soft = jsd_soft(js.pm, js.qm, static_cast<A>(P.beta));
    row_kl = js.qm;
  }

  // The gradient (pass 2, jsd pass 3), exps recomputed relative to the row maxima.
  if (gr != nullptr) {
    grp.sync();
    const int label = need_hard ? static_cast<int>(y) : -1;
    row_loop<V, true, A>(s, t, gr, C, rank, nthr, [&](int k, A sk, A tk) -> A {
      const ElemExps<A> e = elem_exps(sk, tk, inv_t, row_sh, hx);
      A ratio = A(0);
      if (kind == KIND_REVERSE_KL) ratio = reverse_kl_ratio(sk, tk, n);
      if (kind == KIND_JSD) ratio = jsd_terms(sk, tk, e.ea, e.eb, n, log_beta, log1m_beta).ratio;
      return grad_element(kind, e.ea, e.eb, ratio, row_kl, e.es, n, gc, k == label);
    });
  }

  if (rank == 0) {
    const A hard = need_hard ? hard_loss(s_y, st.sum_s, C, static_cast<A>(P.smoothing), n) : A(0);
    out_loss[row] = weight * row_loss(soft, hard, P);
  }
}

}  // namespace rows
}  // namespace cuda
}  // namespace kdfast
