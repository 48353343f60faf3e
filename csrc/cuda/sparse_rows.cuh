// The per-row work of the CUDA sparse distillation kernel (csrc/cuda/sparse_distill.cu), written
// against a thread group that owns one row, so tests/sparse_host_sim.cpp runs the same code on
// host threads (no GPU needed) and compares it with the CPU rows (csrc/cpu/sparse_rows.h). Every
// formula is a sparse_math.h / kd_math.h step; this file owns the loops, the element -> thread
// map, the block reductions (distill_rows.cuh's group_allreduce) and the barriers.
//
// The group type provides what distill_rows.cuh's groups do (rank, width, lanes, shfl_xor,
// barrier, smem_store / smem_load for group_allreduce) and a bitmap of the row's C classes in
// shared memory: bits_clear(word), bits_or(word, mask) (atomic), bits_load(word).
//
// One row (its teacher at k slots: ids, -1 = empty, and their logits z; K = the valid ids):
//   0. rank 0 reads the label logit s_y (before any gradient store: in place, the gradient
//      overwrites the student row; the barriers below order it before every store).
//   1. The bitmap is cleared; each thread takes its slots: sets the id's bit, gathers s_id and
//      folds it into its part of K (online rescaling), and z_i / T_t into its teacher part
//      (sparse_math.h's TeacherPart). An id outside [-1, C) trips a device assert and is
//      skipped (memory-safe); duplicates are not detected on CUDA (the CPU op rejects them).
//   2. Barrier (the bitmap is complete), then one read of the student row: each thread's part
//      of the rest (the columns whose bit is clear) with online rescaling, and the row's logit
//      sum (label smoothing). Three group reductions: the rest, K, the teacher (+ count of ids).
//   3. The normalizers (sparse_row_norm) and the bins: each thread sums its slots' terms
//      (id_bin; the slots re-read from L1/L2), one more reduction, the rest's bin added once.
//   4. The gradient: a second read of the row, every column of the rest written
//      (rest_grad_element; columns of K skipped), a barrier (in place, those vector loads also
//      read K's columns), then each thread writes its slots' columns (bin_grad_element). Each
//      gradient element is written once, by one thread.
//   5. A barrier: the next row clears the bitmap.
// Global memory per row: the student row read twice (C elements each), ids / z / tail once
// from HBM (the slot passes 3 and 4 re-read k entries from L1/L2), the gradient written once.
#pragma once

#include "distill_rows.cuh"
#include "kdfast/sparse_math.h"

namespace kdfast {
namespace cuda {

struct SparseKernelArgs {
  const void* student;  // (N, C), unit stride along C
  int64_t student_row_stride;
  const void* ids;      // (N, k) contiguous, int32 or int64 (the kernel's template)
  int64_t k;
  const void* teacher_logits;  // (N, k) contiguous, of the accumulation type
  const void* tail;            // (N,) of the accumulation type, or nullptr (tail="renormalize")
  const int64_t* target;       // nullptr when params.has_target == 0
  int64_t target_stride;
  void* loss_rows;  // (N,) of the accumulation type
  void* grad;       // (N, C) or nullptr; may alias student (in place)
  int64_t grad_row_stride;
  int64_t n_rows;
  int32_t n_cols;
  math::Params params;
  double inv_teacher_temperature;
  const double* row_weight;  // device scalar multiplying loss_i and its gradient, or nullptr (1)
};

namespace sparse_rows {

using rows::imin;
using rows::load_pack;
using rows::misalignment;
using rows::Pack;
using rows::store_pack;
using rows::widen;

// 32-bit words of the bitmap of a row of C classes.
KDFAST_DEV int bitmap_words(int C) { return (C + 31) / 32; }
template <class Group> KDFAST_DEV bool in_k(const Group& g, int j) {
  return (g.bits_load(j >> 5) >> (j & 31)) & 1u;
}

// Calls f(j, s_j) for this thread's elements of the row: a scalar head up to the vector
// boundary, vectors of V, a scalar tail. The map depends on the row's address only, so both
// reads of a row (statistics, gradient) give each element to the same thread.
template <int V, class A, class S, class F>
KDFAST_DEV void student_loop(const S* s, int C, int rank, int nthr, F&& f) {
  const int ms = misalignment<V>(s);
  const int head = imin((V - ms) % V, C);
  const int n_vec = (C - head) / V;
  for (int j = rank; j < head; j += nthr) f(j, widen<A>(s[j]));
  for (int c = rank; c < n_vec; c += nthr) {
    const int j0 = head + c * V;
    const Pack<S, V> sp = load_pack<S, V>(s + j0);
#pragma unroll
    for (int v = 0; v < V; ++v) f(j0 + v, widen<A>(sp.v[v]));
  }
  for (int j = head + n_vec * V + rank; j < C; j += nthr) f(j, widen<A>(s[j]));
}

// The gradient of the rest's columns: gr[j] = f(j, s_j) for this thread's elements whose bit is
// clear (same map as student_loop); K's columns are left to the slot pass. Vector stores when the
// gradient row is aligned like the student row and the vector holds no column of K.
template <int V, class A, class S, class Gd, class Group, class F>
KDFAST_DEV void rest_grad_loop(const S* s, Gd* gr, int C, const Group& g, F&& f) {
  const int ms = misalignment<V>(s);
  const int head = imin((V - ms) % V, C);
  const int n_vec = (C - head) / V;
  const bool grad_vec = misalignment<V>(gr) == ms;
  auto scalar = [&](int j) {
    if (!in_k(g, j)) math::store_from_acc(gr + j, f(j, widen<A>(s[j])));
  };
  for (int j = g.rank; j < head; j += g.width) scalar(j);
  for (int c = g.rank; c < n_vec; c += g.width) {
    const int j0 = head + c * V;
    const Pack<S, V> sp = load_pack<S, V>(s + j0);
    Pack<Gd, V> gp;
    bool any_k = false;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const bool k_col = in_k(g, j0 + v);
      any_k = any_k || k_col;
      math::store_from_acc(&gp.v[v], k_col ? A(0) : f(j0 + v, widen<A>(sp.v[v])));
    }
    if (grad_vec && !any_k) {
      store_pack<Gd, V>(gr + j0, gp);
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (!in_k(g, j0 + v)) gr[j0 + v] = gp.v[v];
      }
    }
  }
  for (int j = head + n_vec * V + g.rank; j < C; j += g.width) scalar(j);
}

// What the slot passes need of the call.
template <class A>
struct SparseCtx {
  int32_t kind;
  bool need_hard, smooth;
  math::HardExp hx;
  A inv_t, inv_tt, weight, log_beta, log1m_beta;
  math::GradCoefs<A> gc;
};
template <class A>
KDFAST_DEV SparseCtx<A> sparse_ctx(const SparseKernelArgs& a) {
  const math::Params& P = a.params;
  SparseCtx<A> x;
  x.kind = P.kind;
  x.need_hard = P.hard_coef != 0.0;
  x.smooth = x.need_hard && P.smoothing != 0.0;
  x.hx = math::hard_exp_mode(P);
  x.inv_t = static_cast<A>(P.inv_temperature);
  x.inv_tt = static_cast<A>(a.inv_teacher_temperature);
  x.weight = a.row_weight != nullptr ? static_cast<A>(*a.row_weight) : A(1);
  x.log_beta = static_cast<A>(P.log_beta);
  x.log1m_beta = static_cast<A>(P.log1m_beta);
  x.gc = math::grad_coefs(P, a.n_cols, x.weight);
  return x;
}

// A slot's valid id, or -1 (an empty slot, or an id out of range: a device assert, then
// skipped, so nothing outside the row is read or written).
template <class I>
KDFAST_DEV int slot_id(const I* ids, int64_t j, int C) {
  const int64_t id = static_cast<int64_t>(ids[j]);
  const bool ok = id >= -1 && id < C;
  CUDA_KERNEL_ASSERT_MSG(ok, "kdfast: teacher.indices out of range: expected class ids in [0, C) or -1");
  return ok ? static_cast<int>(id) : -1;
}

// A student-only part plus one element (online: the part's maximum raised first when the
// element is larger, or NaN).
template <int Sq, bool Sep, class A>
KDFAST_DEV void add_student(math::PartStats<A>& part, math::Shifts<A>& sh, A s, A inv_t, bool need_sum) {
  using namespace ::kdfast::math;
  constexpr HardExp h{Sq, Sep};
  if (s > part.max_s || s != s) {
    part = raise_part(part, nan_max(part.max_s, s), neg_inf<A>(), inv_t, h, static_cast<int32_t>(KIND_JSD));
    sh = student_shifts(part.max_s, inv_t);
  }
  const StudentExps<A> e = student_exps<Sq, Sep>(s, inv_t, sh.a, sh.s);
  part.z_a += e.ea;
  part.z_s += e.es;
  if (need_sum) part.sum_s += s;
}

template <class A> struct SlotSums { A teacher_max, teacher_z, count; };
template <class A> struct BinSums { A p, q; };

// One row whose target counts (or that has none), the hard term's exps fixed at compile time.
template <int Sq, bool Sep, class S, class I, class Gd, class A, int V, class Group>
KDFAST_DEV void sparse_row_mode(const SparseKernelArgs& a, int64_t row, int64_t y, const Group& g, int& parity) {
  using namespace ::kdfast::math;
  constexpr HardExp hx{Sq, Sep};
  constexpr bool kOwnSums = Sq > 0 || Sep;
  const int C = a.n_cols;
  const int64_t k = a.k;
  const SparseCtx<A> x = sparse_ctx<A>(a);
  const S* s = static_cast<const S*>(a.student) + row * a.student_row_stride;
  const I* ids = static_cast<const I*>(a.ids) + row * k;
  const A* z = static_cast<const A*>(a.teacher_logits) + row * k;
  Gd* gr = a.grad != nullptr ? static_cast<Gd*>(a.grad) + row * a.grad_row_stride : nullptr;
  // 0. Before any gradient store (the barriers below order it).
  const A s_y = x.need_hard && g.rank == 0 ? widen<A>(s[y]) : A(0);

  // 1. The bitmap of K, K's student part, the teacher's part.
  for (int w = g.rank; w < bitmap_words(C); w += g.width) g.bits_clear(w);
  g.barrier();
  PartStats<A> k_part = empty_part<A>();
  Shifts<A> k_sh = student_shifts(k_part.max_s, x.inv_t);
  TeacherPart<A> teacher = empty_teacher_part<A>();
  A count = A(0);
  for (int64_t j = g.rank; j < k; j += g.width) {
    const int id = slot_id(ids, j, C);
    if (id < 0) continue;
    g.bits_or(id >> 5, 1u << (id & 31));
    add_student<Sq, Sep>(k_part, k_sh, widen<A>(s[id]), x.inv_t, false);
    teacher = add_teacher_entry(teacher, teacher_scaled(z[j], x.inv_tt));
    count += A(1);
  }
  g.barrier();  // the bitmap is complete

  // 2. The rest's statistics: one read of the student row.
  PartStats<A> rest = empty_part<A>();
  Shifts<A> r_sh = student_shifts(rest.max_s, x.inv_t);
  student_loop<V, A>(s, C, g.rank, g.width, [&](int j, A sj) {
    if (in_k(g, j)) {
      if (x.smooth) rest.sum_s += sj;
    } else {
      add_student<Sq, Sep>(rest, r_sh, sj, x.inv_t, x.smooth);
    }
  });
  auto merge_students = [&](const PartStats<A>& p, const PartStats<A>& q) {
    return merge_student_parts(p, q, x.inv_t, hx);
  };
  rest = rows::group_allreduce<A>(g, rest, parity, merge_students);
  k_part = rows::group_allreduce<A>(g, k_part, parity, merge_students);
  const SlotSums<A> slots = rows::group_allreduce<A>(
      g, SlotSums<A>{teacher.max_a, teacher.z, count}, parity, [](const SlotSums<A>& p, const SlotSums<A>& q) {
        const TeacherPart<A> t = merge_teacher_parts(TeacherPart<A>{p.teacher_max, p.teacher_z},
                                                     TeacherPart<A>{q.teacher_max, q.teacher_z});
        return SlotSums<A>{t.max_a, t.z, p.count + q.count};
      });
  const PartStats<A> all = merge_student_parts(rest, k_part, x.inv_t, hx);
  const SparseRowNorm<A> n = sparse_row_norm(rest, all, x.inv_t, hx);
  const bool has_ids = slots.count > A(0);

  // 3. The bins (every row does this reduction, so `parity` stays group-uniform).
  const A tail = a.tail != nullptr ? static_cast<const A*>(a.tail)[row] : neg_inf<A>();
  const A log_total = teacher_log_total(slots.teacher_max, slots.teacher_z, tail);
  BinSums<A> bins{A(0), A(0)};
  for (int64_t j = g.rank; has_ids && j < k; j += g.width) {
    const int id = slot_id(ids, j, C);
    if (id < 0) continue;
    const Bin<A> b = id_bin(x.kind, teacher_scaled(z[j], x.inv_tt), widen<A>(s[id]), log_total, n, x.log_beta,
                            x.log1m_beta);
    bins.p += b.term_p;
    bins.q += b.term_q;
  }
  bins = rows::group_allreduce<A>(g, bins, parity, [](const BinSums<A>& p, const BinSums<A>& q) {
    return BinSums<A>{p.p + q.p, p.q + q.q};
  });
  const Bin<A> rest_b = rest_bin(x.kind, tail, log_total, n, x.log_beta, x.log1m_beta);
  const A row_kl = bins_row_kl(bins.q + rest_b.term_q);
  const A soft = has_ids ? bins_soft(x.kind, bins.p + rest_b.term_p, bins.q + rest_b.term_q, static_cast<A>(a.params.beta))
                         : A(0);
  const A w_rest = has_ids ? bin_grad_weight(x.kind, rest_b, row_kl, x.gc.mode_weight) : A(0);
  // A row without target and without ids (padding) does not count.
  const bool counts = a.params.has_target || has_ids;

  // 4. The gradient: the rest's columns, then K's.
  if (gr != nullptr) {
    if (!counts) {
      rows::zero_row<V>(gr, C, g.rank, g.width);
    } else {
      rest_grad_loop<V, A>(s, gr, C, g, [&](int j, A sj) {
        return rest_grad_element<Sq, Sep>(sj, w_rest, n, x.gc, j == y);
      });
      g.barrier();  // in place: the loop's vector loads read K's columns too
      for (int64_t j = g.rank; j < k; j += g.width) {
        const int id = slot_id(ids, j, C);
        if (id < 0) continue;
        const A sj = widen<A>(s[id]);
        const Bin<A> b = id_bin(x.kind, teacher_scaled(z[j], x.inv_tt), sj, log_total, n, x.log_beta, x.log1m_beta);
        const A w = bin_grad_weight(x.kind, b, row_kl, x.gc.mode_weight);
        math::store_from_acc(gr + id, bin_grad_element<kOwnSums>(sj, w, b.q, n, x.gc, id == y));
      }
    }
  }
  if (g.rank == 0) {
    const A hard = x.need_hard ? sparse_hard_loss(s_y, all.sum_s, C, static_cast<A>(a.params.smoothing), n) : A(0);
    static_cast<A*>(a.loss_rows)[row] = counts ? x.weight * row_loss(soft, hard, a.params) : A(0);
  }
  g.barrier();  // 5. the next row clears the bitmap
}

// One row per group. S: student storage, I: id type, Gd: gradient storage, A: accumulation type,
// V: elements per vector step. Ignored rows (and a bad target: a device assert) take no
// barrier, uniformly across the group; their ids are not read (so not checked: the in-place
// op's check before the launch covers them).
template <class S, class I, class Gd, class A, int V, class Group>
KDFAST_DEV void process_sparse_row(const SparseKernelArgs& a, int64_t row, const Group& g, int& parity) {
  int64_t y = -1;
  if (a.params.has_target) {
    y = a.target[row * a.target_stride];
    if (y == a.params.ignore_index) {
      if (g.rank == 0) static_cast<A*>(a.loss_rows)[row] = A(0);
      if (a.grad != nullptr) {
        rows::zero_row<V>(static_cast<Gd*>(a.grad) + row * a.grad_row_stride, a.n_cols, g.rank, g.width);
      }
      return;
    }
    const bool valid = y >= 0 && y < a.n_cols;
    if (g.rank == 0) {
      CUDA_KERNEL_ASSERT_MSG(valid, "kdfast: target out of range: expected a class index in [0, C) or ignore_index");
    }
    if (!valid) return;  // not reached on the GPU: the assert stops the kernel
  }
  const math::HardExp h = math::hard_exp_mode(a.params);
  if (h.squarings == 1) return sparse_row_mode<1, false, S, I, Gd, A, V>(a, row, y, g, parity);
  if (h.squarings == 2) return sparse_row_mode<2, false, S, I, Gd, A, V>(a, row, y, g, parity);
  if (h.separate) return sparse_row_mode<0, true, S, I, Gd, A, V>(a, row, y, g, parity);
  return sparse_row_mode<0, false, S, I, Gd, A, V>(a, row, y, g, parity);
}

}  // namespace sparse_rows
}  // namespace cuda
}  // namespace kdfast
