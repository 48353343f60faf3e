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
// logit_mse twice (pass 1 adds the logit sums; pass 2 sums the centred squares along with the
// gradient, or alone without one); rows split across groups three times (the sum of squares is
// a stage of its own there, as jsd's sums).
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
  // Rows split across groups (small N, large C): `splits` segments of `split_cols` classes per
  // row, each a unit of work; `records` holds kRecordValues accumulation values per unit.
  int32_t splits;            // 1: one group per row (process_row), no records
  int32_t split_cols;
  void* records;
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
template <class A> struct SquareSum { A sq; };  // logit_mse's soft sum, as a reduced struct

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

// ---- the steps of a row ----
// What every step of a row needs, from the call's parameters.
template <class A>
struct RowCtx {
  int32_t kind;
  int n_cols;
  bool need_hard, logit_sum;  // logit_sum: the student's logit sum (label smoothing, logit_mse)
  math::HardExp hx;
  A inv_t, weight, log_beta, log1m_beta;
  math::GradCoefs<A> gc;
};
template <class A>
KDFAST_DEV RowCtx<A> row_ctx(const KernelArgs& a, int C) {
  const math::Params& P = a.params;
  RowCtx<A> x;
  x.kind = P.kind;
  x.n_cols = C;
  x.need_hard = P.hard_coef != 0.0;
  x.logit_sum = (x.need_hard && P.smoothing != 0.0) || P.kind == math::KIND_LOGIT_MSE;
  x.hx = math::hard_exp_mode(P);
  x.inv_t = static_cast<A>(P.inv_temperature);
  x.weight = a.row_weight != nullptr ? static_cast<A>(*a.row_weight) : A(1);
  x.log_beta = static_cast<A>(P.log_beta);
  x.log1m_beta = static_cast<A>(P.log1m_beta);
  x.gc = math::grad_coefs(P, C, x.weight);
  return x;
}

// The row's target (-1 without one); false for a row that takes no steps: an ignored row (its
// loss and gradient `segment` are zeroed here) or a bad target (a device assert).
template <int V, class A, class Gd>
KDFAST_DEV bool row_counts(const KernelArgs& a, int64_t row, int k0, int k1, int rank, int nthr, int64_t* y) {
  *y = -1;
  if (!a.params.has_target) return true;
  *y = a.target[row * a.target_stride];
  if (*y == a.params.ignore_index) {
    if (rank == 0 && k0 == 0) static_cast<A*>(a.loss_rows)[row] = A(0);
    if (a.grad != nullptr) zero_row<V>(static_cast<Gd*>(a.grad) + row * a.grad_row_stride + k0, k1 - k0, rank, nthr);
    return false;
  }
  const bool valid = *y >= 0 && *y < a.n_cols;
  if (rank == 0) {
    CUDA_KERNEL_ASSERT_MSG(valid, "kdfast: target out of range: expected a class index in [0, C) or ignore_index");
  }
  return valid;  // false is not reached on the GPU: the assert stops the kernel
}

// Statistics of elements [k0, k1) of the row: each thread's part, its maxima raised as larger
// elements come (online rescaling, kd_math.h step 2), then the group's union.
template <class A, int V, class S, class T, class Group>
KDFAST_DEV math::PartStats<A> segment_stats(const RowCtx<A>& x, const S* s, const T* t, int k0, int k1,
                                            const Group& grp, int& parity) {
  using namespace ::kdfast::math;
  PartStats<A> part = empty_part<A>();
  Shifts<A> sh = shifts_of(part.max_s, part.max_t, x.inv_t);
  row_loop<V, false, A>(s + k0, t + k0, static_cast<A*>(nullptr), k1 - k0, grp.rank, grp.width, [&](int, A sk, A tk) {
    if (sk > part.max_s || tk > part.max_t || sk != sk || tk != tk) {
      part = raise_part(part, nan_max(part.max_s, sk), nan_max(part.max_t, tk), x.inv_t, x.hx, x.kind);
      sh = shifts_of(part.max_s, part.max_t, x.inv_t);
    }
    add_element(part, x.kind, elem_exps(sk, tk, x.inv_t, sh, x.hx), sk, tk, x.logit_sum);
  });
  return group_allreduce<A>(grp, part, parity, [&](const PartStats<A>& p, const PartStats<A>& q) {
    return merge_parts(p, q, x.inv_t, x.hx, x.kind);
  });
}

// The row's normalizers and soft loss from its statistics (jsd's and logit_mse's soft loss
// come later; logit_mse's row means from here).
template <class A>
struct RowSoft {
  math::RowNorm<A> n;
  math::Shifts<A> sh;
  math::MseRow<A> mse;
  A soft, row_kl;
};
template <class A>
KDFAST_DEV RowSoft<A> row_soft(const RowCtx<A>& x, const math::PartStats<A>& st) {
  using namespace ::kdfast::math;
  RowSoft<A> r;
  r.n = row_norm(x.inv_t, st.max_s, st.max_t, st.z_a, st.z_b, st.z_s);
  r.sh = shifts_of(st.max_s, st.max_t, x.inv_t);
  r.mse = mse_row(st.sum_s, st.sum_t, x.n_cols);
  const bool from_cross = x.kind == KIND_KL || x.kind == KIND_REVERSE_KL;
  r.soft = r.row_kl = from_cross ? soft_from_cross(x.kind, st.cross, st.z_a, st.z_b) : A(0);
  return r;
}

// jsd's two sums over elements [k0, k1), reduced over the group.
template <class A, int V, class S, class T, class Group>
KDFAST_DEV JsdSums<A> segment_jsd(const RowCtx<A>& x, const RowSoft<A>& r, const S* s, const T* t, int k0, int k1,
                                  const Group& grp, int& parity) {
  using namespace ::kdfast::math;
  JsdSums<A> js{A(0), A(0)};
  row_loop<V, false, A>(s + k0, t + k0, static_cast<A*>(nullptr), k1 - k0, grp.rank, grp.width, [&](int, A sk, A tk) {
    const ElemExps<A> e = elem_exps(sk, tk, x.inv_t, r.sh, x.hx);
    const JsdTerms<A> j = jsd_terms(sk, tk, e.ea, e.eb, r.n, x.log_beta, x.log1m_beta);
    js.pm += j.pm;
    js.qm += j.qm;
  });
  return group_allreduce<A>(grp, js, parity, [](const JsdSums<A>& p, const JsdSums<A>& q) {
    return JsdSums<A>{p.pm + q.pm, p.qm + q.qm};
  });
}
template <class A>
KDFAST_DEV void set_jsd_soft(RowSoft<A>& r, const JsdSums<A>& js, const math::Params& P) {
  r.soft = math::jsd_soft(js.pm, js.qm, static_cast<A>(P.beta));
  r.row_kl = js.qm;
}

// logit_mse's sum of centred squares: the threads' parts reduced over the group.
template <class A, class Group>
KDFAST_DEV A reduce_squares(const Group& grp, SquareSum<A> part, int& parity) {
  return group_allreduce<A>(grp, part, parity, [](const SquareSum<A>& p, const SquareSum<A>& q) {
    return SquareSum<A>{p.sq + q.sq};
  }).sq;
}
// The same over elements [k0, k1) in a pass of its own (a call without a gradient, and split
// rows; with a gradient, segment_grad sums them on its way).
template <class A, int V, class S, class T, class Group>
KDFAST_DEV A segment_mse(const RowSoft<A>& r, const S* s, const T* t, int k0, int k1, const Group& grp, int& parity) {
  SquareSum<A> part{A(0)};
  row_loop<V, false, A>(s + k0, t + k0, static_cast<A*>(nullptr), k1 - k0, grp.rank, grp.width,
                        [&](int, A sk, A tk) { part.sq += math::mse_terms(sk, tk, r.mse).sq; });
  return reduce_squares(grp, part, parity);
}

// The gradient of elements [k0, k1), exps recomputed relative to the row maxima. Returns this
// thread's part of logit_mse's sum of centred squares (0 for the other kinds), added in the
// order of segment_mse's: the same element -> thread map, so the same sum. logit_mse has a loop
// of its own: the other kinds' loop keeps its work, and neither holds the other's registers
// (one loop for all spilled in split_finish's float64 kernel).
template <class A, int V, class S, class T, class Gd, class Group>
KDFAST_DEV A segment_grad(const RowCtx<A>& x, const RowSoft<A>& r, const S* s, const T* t, Gd* gr, int k0, int k1,
                          int64_t y, const Group& grp) {
  using namespace ::kdfast::math;
  const int label = x.need_hard ? static_cast<int>(y) - k0 : -1;
  if (x.kind == KIND_LOGIT_MSE) {
    SquareSum<A> part{A(0)};
    row_loop<V, true, A>(s + k0, t + k0, gr + k0, k1 - k0, grp.rank, grp.width, [&](int k, A sk, A tk) -> A {
      const MseTerms<A> d = mse_terms(sk, tk, r.mse);
      part.sq += d.sq;
      return grad_mse_element(d.gap, student_exps(sk, r.sh).es, r.n, r.mse, x.gc, k == label);
    });
    return part.sq;
  }
  row_loop<V, true, A>(s + k0, t + k0, gr + k0, k1 - k0, grp.rank, grp.width, [&](int k, A sk, A tk) -> A {
    const ElemExps<A> e = elem_exps(sk, tk, x.inv_t, r.sh, x.hx);
    A ratio = A(0);
    if (x.kind == KIND_REVERSE_KL) ratio = reverse_kl_ratio(sk, tk, r.n);
    if (x.kind == KIND_JSD) ratio = jsd_terms(sk, tk, e.ea, e.eb, r.n, x.log_beta, x.log1m_beta).ratio;
    return grad_element(x.kind, e.ea, e.eb, ratio, r.row_kl, e.es, r.n, x.gc, k == label);
  });
  return A(0);
}

template <class A>
KDFAST_DEV A row_loss_of(const KernelArgs& a, const RowCtx<A>& x, const RowSoft<A>& r, A s_y, A sum_s) {
  const A hard = x.need_hard ? math::hard_loss(s_y, sum_s, a.n_cols, static_cast<A>(a.params.smoothing), r.n) : A(0);
  return x.weight * math::row_loss(r.soft, hard, a.params);
}

// ---- one row per group ----
// S, T: storage types of student and teacher rows; Gd: gradient storage; A: accumulation type;
// V: elements per vector step. Every row that is not ignored does one group reduction (two for
// jsd and logit_mse), whatever its gradient, so `parity` stays the same in every thread of the
// group.
template <class S, class T, class Gd, class A, int V, class Group>
KDFAST_DEV void process_row(const KernelArgs& a, int64_t row, const Group& grp, int& parity) {
  const int C = a.n_cols;
  int64_t y;
  if (!row_counts<V, A, Gd>(a, row, 0, C, grp.rank, grp.width, &y)) return;
  const S* s = static_cast<const S*>(a.student) + row * a.student_row_stride;
  const T* t = static_cast<const T*>(a.teacher) + row * a.teacher_row_stride;
  Gd* gr = a.grad != nullptr ? static_cast<Gd*>(a.grad) + row * a.grad_row_stride : nullptr;
  const RowCtx<A> x = row_ctx<A>(a, C);
  // Read before any gradient store: in place, the gradient overwrites the student row. The
  // reduction below and grp.sync() order this read before every store.
  const A s_y = x.need_hard && grp.rank == 0 ? widen<A>(s[y]) : A(0);

  const math::PartStats<A> st = segment_stats<A, V>(x, s, t, 0, C, grp, parity);
  RowSoft<A> r = row_soft(x, st);
  if (x.kind == math::KIND_JSD) set_jsd_soft(r, segment_jsd<A, V>(x, r, s, t, 0, C, grp, parity), a.params);
  const bool logit_mse = x.kind == math::KIND_LOGIT_MSE;
  if (gr != nullptr) {
    grp.sync();
    const A squares = segment_grad<A, V>(x, r, s, t, gr, 0, C, y, grp);
    if (logit_mse) r.soft = math::mse_soft(reduce_squares(grp, SquareSum<A>{squares}, parity), r.mse);
  } else if (logit_mse) {
    r.soft = math::mse_soft(segment_mse<A, V>(r, s, t, 0, C, grp, parity), r.mse);
  }
  if (grp.rank == 0) static_cast<A*>(a.loss_rows)[row] = row_loss_of(a, x, r, s_y, st.sum_s);
}

// ---- rows split across groups ----
// For small N with large C: a.splits groups (blocks) per row, each one unit of work over its
// segment of a.split_cols classes. Three kernels (stages) in stream order: statistics
// (split_stats), the soft sums (split_soft: jsd's two, logit_mse's sum of centred squares; those
// kinds only), gradient and loss (split_finish). Units exchange their results through a.records
// (kRecordValues per unit), which every later stage folds in split order, so every group of a
// row sees the same row statistics.
// A unit's record: its PartStats, the label logit, the soft sums.
constexpr int kStatsValues = 8;
static_assert(sizeof(math::PartStats<float>) == kStatsValues * sizeof(float), "record layout");
constexpr int kLabelValue = kStatsValues;
constexpr int kSoftValues = kStatsValues + 1;  // jsd: pm, qm; logit_mse: the squares
constexpr int kRecordValues = kStatsValues + 3;

// The row's target (-1 without one); false for an ignored row or a bad target (both already
// handled by the first stage).
KDFAST_DEV bool row_target_ok(const KernelArgs& a, int64_t row, int64_t* y) {
  *y = -1;
  if (!a.params.has_target) return true;
  *y = a.target[row * a.target_stride];
  return *y != a.params.ignore_index && *y >= 0 && *y < a.n_cols;
}

template <class A>
KDFAST_DEV A* unit_record(const KernelArgs& a, int64_t unit) {
  return static_cast<A*>(a.records) + unit * kRecordValues;
}
// The row's statistics and label logit: the units' records folded in split order.
template <class A>
KDFAST_DEV math::PartStats<A> fold_records(const KernelArgs& a, const RowCtx<A>& x, int64_t row, A* s_y) {
  math::PartStats<A> st = math::empty_part<A>();
  *s_y = A(0);
  for (int sp = 0; sp < a.splits; ++sp) {
    const A* rec = unit_record<A>(a, row * a.splits + sp);
    math::PartStats<A> part;
    memcpy(&part, rec, sizeof(part));
    st = math::merge_parts(st, part, x.inv_t, x.hx, x.kind);
    *s_y += rec[kLabelValue];  // only the unit holding the label wrote a non-zero
  }
  return st;
}

// A unit's row and segment [k0, k1) of it.
struct Unit {
  int64_t row;
  int k0, k1;
};
KDFAST_DEV Unit unit_of(const KernelArgs& a, int64_t unit) {
  const int k0 = static_cast<int>(unit % a.splits) * a.split_cols;
  return Unit{unit / a.splits, k0, imin(a.n_cols, k0 + a.split_cols)};
}

template <class S, class T, class Gd, class A, int V, class Group>
KDFAST_DEV void split_stats(const KernelArgs& a, int64_t unit, const Group& grp, int& parity) {
  const auto [row, k0, k1] = unit_of(a, unit);
  int64_t y;
  if (!row_counts<V, A, Gd>(a, row, k0, k1, grp.rank, grp.width, &y)) return;
  const S* s = static_cast<const S*>(a.student) + row * a.student_row_stride;
  const T* t = static_cast<const T*>(a.teacher) + row * a.teacher_row_stride;
  const RowCtx<A> x = row_ctx<A>(a, a.n_cols);
  const math::PartStats<A> st = segment_stats<A, V>(x, s, t, k0, k1, grp, parity);
  if (grp.rank == 0) {
    A* rec = unit_record<A>(a, unit);
    memcpy(rec, &st, sizeof(st));
    // Read here, before any unit writes a gradient (in place: over the student).
    rec[kLabelValue] = x.need_hard && y >= k0 && y < k1 ? widen<A>(s[y]) : A(0);
  }
}

// jsd's or logit_mse's soft sums of the unit's segment.
template <class S, class T, class Gd, class A, int V, class Group>
KDFAST_DEV void split_soft(const KernelArgs& a, int64_t unit, const Group& grp, int& parity) {
  const auto [row, k0, k1] = unit_of(a, unit);
  int64_t y;
  if (!row_target_ok(a, row, &y)) return;  // done in split_stats
  const S* s = static_cast<const S*>(a.student) + row * a.student_row_stride;
  const T* t = static_cast<const T*>(a.teacher) + row * a.teacher_row_stride;
  const RowCtx<A> x = row_ctx<A>(a, a.n_cols);
  A s_y;
  const RowSoft<A> r = row_soft(x, fold_records(a, x, row, &s_y));
  A sums[2] = {A(0), A(0)};
  if (x.kind == math::KIND_JSD) {
    const JsdSums<A> js = segment_jsd<A, V>(x, r, s, t, k0, k1, grp, parity);
    sums[0] = js.pm, sums[1] = js.qm;
  } else {
    sums[0] = segment_mse<A, V>(r, s, t, k0, k1, grp, parity);
  }
  if (grp.rank == 0) {
    A* rec = unit_record<A>(a, unit);
    rec[kSoftValues] = sums[0];
    rec[kSoftValues + 1] = sums[1];
  }
}

template <class S, class T, class Gd, class A, int V, class Group>
KDFAST_DEV void split_finish(const KernelArgs& a, int64_t unit, const Group& grp) {
  const auto [row, k0, k1] = unit_of(a, unit);
  int64_t y;
  if (!row_target_ok(a, row, &y)) return;  // done in split_stats
  const S* s = static_cast<const S*>(a.student) + row * a.student_row_stride;
  const T* t = static_cast<const T*>(a.teacher) + row * a.teacher_row_stride;
  Gd* gr = a.grad != nullptr ? static_cast<Gd*>(a.grad) + row * a.grad_row_stride : nullptr;
  const RowCtx<A> x = row_ctx<A>(a, a.n_cols);
  A s_y;
  const math::PartStats<A> st = fold_records(a, x, row, &s_y);
  RowSoft<A> r = row_soft(x, st);
  if (x.kind == math::KIND_JSD || x.kind == math::KIND_LOGIT_MSE) {
    A sums[2] = {A(0), A(0)};
    for (int sp = 0; sp < a.splits; ++sp) {
      const A* rec = unit_record<A>(a, row * a.splits + sp);
      sums[0] += rec[kSoftValues];
      sums[1] += rec[kSoftValues + 1];
    }
    if (x.kind == math::KIND_JSD) {
      set_jsd_soft(r, JsdSums<A>{sums[0], sums[1]}, a.params);
    } else {
      r.soft = math::mse_soft(sums[0], r.mse);
    }
  }
  if (gr != nullptr) segment_grad<A, V>(x, r, s, t, gr, k0, k1, y, grp);
  if (grp.rank == 0 && k0 == 0) static_cast<A*>(a.loss_rows)[row] = row_loss_of(a, x, r, s_y, st.sum_s);
}

}  // namespace rows
}  // namespace cuda
}  // namespace kdfast
