// CPU row loops of the fused sparse distillation loss (kdfast::sparse_distill_fwd), over raw
// pointers. Included by csrc/cpu/rows.h's users, csrc/cpu/isa/*.cpp, after rows.h (whose
// chunk widening and gradient stores it reuses), so it is compiled once per instruction set;
// the same rules hold: no torch, only inline code. The per-row math is
// csrc/include/kdfast/sparse_math.h.
//
// One row: the valid ids arrive sorted (the op's validation pass), so the student row is read
// once, chunk by chunk: each chunk is widened into its slots of a row-sized stash, the ids of
// K that fall in it are masked to -inf there (a merge walk of the sorted ids), and the
// chunk's maximum and exps (overwriting it in the stash, still in L1) give the rest's
// statistics for that chunk; K's own k entries are gathered separately. The gradient pass
// reads only the stash: q_j / Q_R is a stashed exp times its chunk's factor (sparse_math.h's
// rest_chunk_factors; the stash is not rewritten when the row's maximum grows), then the
// columns of K (and the label's) are overwritten with their own, in an L1 buffer streamed out
// once: no exp per element, and no second read of the student row, which in-place mode
// overwrites (benchmarks/NOTES.md, entry 20).
#pragma once

#include "kdfast/cpu_rows_api.h"
#include "kdfast/sparse_math.h"

namespace kdfast {
namespace cpu {
namespace KDFAST_ISA {
namespace {

using namespace ::kdfast::math;

// The rest's statistics of one chunk of n columns: e_a holds the chunk (widened) with K's
// columns masked to -inf, and gets their exps relative to the chunk's shifts (e_s: softmax(s)'s
// own, when Separate). sum_s is the unmasked chunk's logit sum (label smoothing over all C).
template <int Squarings, bool Separate, class A>
PartStats<A> rest_chunk_stats(A* e_a, A* e_s, int64_t n, A inv_t, A sum_s) {
  A cm = neg_inf<A>();
#pragma omp simd reduction(max : cm)
  for (int64_t j = 0; j < n; ++j) cm = kd_max(cm, e_a[j]);
  const Shifts<A> sh = student_shifts(cm, inv_t);
  A z_a = A(0), z_s = A(0);
#pragma omp simd reduction(+ : z_a, z_s)
  for (int64_t j = 0; j < n; ++j) {
    const StudentExps<A> e = student_exps<Squarings, Separate>(e_a[j], inv_t, sh.a, sh.s);
    e_a[j] = e.ea;
    if (Separate) e_s[j] = e.es;
    z_a += e.ea;
    z_s += e.es;
  }
  return student_part(cm, z_a, z_s, sum_s);
}

// K's part of the student row from its gathered logits ks[0, nk).
template <int Squarings, bool Separate, class A>
PartStats<A> k_part_stats(const A* ks, int64_t nk, A inv_t) {
  A km = neg_inf<A>();
  for (int64_t j = 0; j < nk; ++j) km = kd_max(km, ks[j]);
  const Shifts<A> sh = student_shifts(km, inv_t);
  A z_a = A(0), z_s = A(0);
  for (int64_t j = 0; j < nk; ++j) {
    const StudentExps<A> e = student_exps<Squarings, Separate>(ks[j], inv_t, sh.a, sh.s);
    z_a += e.ea;
    z_s += e.es;
  }
  return student_part(km, z_a, z_s, A(0));
}

// Per-thread scratch of the sparse rows (sparse_scratch_elems): the stash of the rest's exps
// (e_s only when softmax(s) has exps of its own), each chunk's maximum, and K's gathered
// logits, gradient weights and q_i.
template <class A> struct SparseScratch {
  A* e_a;
  A* e_s;
  A* chunk_max;
  A* ks;
  A* ws;
  A* qs;
};
template <class A> SparseScratch<A> sparse_scratch(A* scratch, int64_t C, int64_t k) {
  const int64_t row = sparse_stash_row_elems(C);
  A* records = scratch + 2 * row;
  A* ks = records + row_chunks(C);
  return SparseScratch<A>{scratch, scratch + row, records, ks, ks + k, ks + 2 * k};
}

// The rest's statistics over the whole row (one read of it) and the row's logit sum; the
// rest's exps and each chunk's maximum stashed in w for the gradient.
template <int Squarings, bool Separate, class S, class A>
PartStats<A> rest_row_stats(const S* s_src, const int64_t* keys, int64_t nk, int64_t C, A inv_t,
                            bool need_logit_sum, const SparseScratch<A>& w) {
  PartStats<A> rest = empty_part<A>();
  int64_t next = 0;
  for (int64_t k0 = 0; k0 < C; k0 += kRowChunk) {
    const int64_t k1 = k0 + kRowChunk < C ? k0 + kRowChunk : C;
    A* buf = w.e_a + k0;
#pragma omp simd
    for (int64_t j = k0; j < k1; ++j) buf[j - k0] = to_acc<A>(s_src[j]);
    A sum_s = A(0);
    if (need_logit_sum) {
#pragma omp simd reduction(+ : sum_s)
      for (int64_t j = 0; j < k1 - k0; ++j) sum_s += buf[j];
    }
    for (; next < nk && sparse_key_id(keys[next]) < k1; ++next) buf[sparse_key_id(keys[next]) - k0] = neg_inf<A>();
    const PartStats<A> chunk = rest_chunk_stats<Squarings, Separate>(buf, w.e_s + k0, k1 - k0, inv_t, sum_s);
    w.chunk_max[k0 / kRowChunk] = chunk.max_s;
    rest = merge_student_parts(rest, chunk, inv_t, HardExp{Squarings, Separate});
  }
  return rest;
}

// The row's soft loss and each bin's gradient weight (ws for K, in sorted order; *w_rest for
// the rest); qs gets q_i of K. z: the row's teacher logits by slot.
template <class A>
A soft_and_weights(const SparseRowsArgs& g, const int64_t* keys, int64_t nk, const A* z, A tail,
                   const A* ks, const SparseRowNorm<A>& n, GradCoefs<A> gc, A* ws, A* qs, A* w_rest) {
  const Params& P = g.params;
  const A inv_tt = static_cast<A>(g.inv_teacher_temperature);
  const A log_beta = static_cast<A>(P.log_beta), log1m_beta = static_cast<A>(P.log1m_beta);
  A t_max = neg_inf<A>();
  for (int64_t j = 0; j < nk; ++j) t_max = kd_max(t_max, teacher_scaled(z[sparse_key_slot(keys[j])], inv_tt));
  A t_z = A(0);
  for (int64_t j = 0; j < nk; ++j) t_z += teacher_exp(teacher_scaled(z[sparse_key_slot(keys[j])], inv_tt), t_max);
  const A log_total = teacher_log_total(t_max, t_z, tail);
  auto bin_of = [&](int64_t j) {
    const A a = teacher_scaled(z[sparse_key_slot(keys[j])], inv_tt);
    return id_bin(P.kind, a, ks[j], log_total, n, log_beta, log1m_beta);
  };
  const Bin<A> rest = rest_bin(P.kind, tail, log_total, n, log_beta, log1m_beta);
  A sum_p = rest.term_p, sum_q = rest.term_q;
  for (int64_t j = 0; j < nk; ++j) {
    const Bin<A> b = bin_of(j);
    sum_p += b.term_p;
    sum_q += b.term_q;
  }
  const A row_kl = bins_row_kl(sum_q);
  for (int64_t j = 0; j < nk; ++j) {
    const Bin<A> b = bin_of(j);
    ws[j] = bin_grad_weight(P.kind, b, row_kl, gc.mode_weight);
    qs[j] = b.q;
  }
  *w_rest = bin_grad_weight(P.kind, rest, row_kl, gc.mode_weight);
  return bins_soft(P.kind, sum_p, sum_q, static_cast<A>(P.beta));
}

// Writes the row's gradient: every column with the rest's coefficient (from the stash), then
// K's columns and the label's with their own, chunk by chunk through an L1 buffer. Reads no
// student logit (K's and the label's were gathered first), so in-place mode (grad_row == the
// student row) is safe.
template <int Squarings, bool Separate, class G, class A>
void write_sparse_grad(G* grad_row, const SparseScratch<A>& w, const int64_t* keys, int64_t nk, int64_t C,
                       int64_t y, bool y_in_k, A s_y, A w_rest, const SparseRowNorm<A>& n, GradCoefs<A> gc) {
  constexpr bool kOwnSums = Squarings > 0 || Separate;
  const HardExp hx{Squarings, Separate};
  alignas(64) A out[kRowChunk];
  int64_t next = 0;
  for (int64_t k0 = 0; k0 < C; k0 += kRowChunk) {
    const int64_t k1 = k0 + kRowChunk < C ? k0 + kRowChunk : C;
    const RestChunkFactors<A> f = rest_chunk_factors(w.chunk_max[k0 / kRowChunk], n, hx);
    const A* e_a = w.e_a + k0;
    const A* e_s = w.e_s + k0;
#pragma omp simd
    for (int64_t j = 0; j < k1 - k0; ++j) {
      out[j] = rest_grad_stashed<Squarings, Separate>(e_a[j], Separate ? e_s[j] : A(0), f, w_rest, n, gc, false);
    }
    for (; next < nk && sparse_key_id(keys[next]) < k1; ++next) {
      const int64_t id = sparse_key_id(keys[next]);
      out[id - k0] = bin_grad_element<kOwnSums>(w.ks[next], w.ws[next], w.qs[next], n, gc, id == y);
    }
    if (!y_in_k && y >= k0 && y < k1) {
      out[y - k0] = rest_grad_element<Squarings, Separate>(s_y, w_rest, n, gc, true);
    }
    write_grad_row(grad_row + k0, out, k1 - k0);
  }
}

template <class G, class A> void zero_grad_row(G* grad_row, int64_t C) {
  for (int64_t j = 0; j < C; ++j) store_from_acc(grad_row + j, A(0));
}

// Squarings, Separate: how softmax(s) gets its exps (kd_math.h's HardExp, fixed at compile
// time so the loops carry no select): e_a squared once or twice (T = 2, 4), an exp of its
// own (another T, with a hard term), or e_a itself.
template <class S, class G, class A, int Squarings, bool Separate>
int64_t run_sparse_rows_typed(const SparseRowsArgs& g, int64_t begin, int64_t end, A* scratch) {
  const Params& P = g.params;
  const int64_t C = g.n_cols, k = g.k;
  const A inv_t = static_cast<A>(P.inv_temperature);
  const A eps = static_cast<A>(P.smoothing);
  const GradCoefs<A> gc = grad_coefs(P, C, A(1));
  const bool need_hard = P.hard_coef != 0.0;
  const bool need_logit_sum = need_hard && eps != A(0);
  const HardExp hx{Squarings, Separate};
  const SparseScratch<A> w = sparse_scratch(scratch, C, k);
  A* ks = w.ks;
  A* out_loss = static_cast<A*>(g.loss_rows);
  const A* teacher = static_cast<const A*>(g.teacher_logits);
  const A* tails = static_cast<const A*>(g.tail);

  for (int64_t i = begin; i < end; ++i) {
    G* grad_row = g.grad ? static_cast<G*>(g.grad) + i * g.grad_row_stride : nullptr;
    const int64_t* keys = g.keys + i * k;
    const int64_t nk = g.n_valid[i];
    const int64_t y = P.has_target ? g.target[i * g.target_stride] : -1;
    // Rows that do not count: an ignored target, or no target and no valid id (padding).
    if (P.has_target ? y == P.ignore_index : nk == 0) {
      out_loss[i] = A(0);
      if (grad_row) zero_grad_row<G, A>(grad_row, C);
      continue;
    }
    const S* s_src = static_cast<const S*>(g.student) + i * g.student_row_stride;
    // Read before any gradient store: in-place mode writes the gradient over the student row.
    // Read whenever there is a label, hard term or not: write_sparse_grad gives the label's
    // column (when not in K) its gradient from s_y.
    const A s_y = y >= 0 ? to_acc<A>(s_src[y]) : A(0);
    bool y_in_k = false;
    for (int64_t j = 0; j < nk; ++j) {
      ks[j] = to_acc<A>(s_src[sparse_key_id(keys[j])]);
      y_in_k = y_in_k || sparse_key_id(keys[j]) == y;
    }
    const PartStats<A> rest = rest_row_stats<Squarings, Separate>(s_src, keys, nk, C, inv_t, need_logit_sum, w);
    const PartStats<A> k_part = k_part_stats<Squarings, Separate>(ks, nk, inv_t);
    const PartStats<A> all = merge_student_parts(rest, k_part, inv_t, hx);
    const SparseRowNorm<A> n = sparse_row_norm(rest, all, inv_t, hx);

    A soft = A(0), w_rest = A(0);
    if (nk > 0) {
      const A tail = tails ? tails[i] : neg_inf<A>();
      soft = soft_and_weights(g, keys, nk, teacher + i * k, tail, ks, n, gc, w.ws, w.qs, &w_rest);
    }
    if (grad_row) {
      write_sparse_grad<Squarings, Separate>(grad_row, w, keys, nk, C, y, y_in_k, s_y, w_rest, n, gc);
    }
    const A hard = need_hard ? sparse_hard_loss(s_y, all.sum_s, C, eps, n) : A(0);
    out_loss[i] = row_loss(soft, hard, P);
  }
  stream_fence();
  return -1;
}

template <class S, class A>
int64_t run_sparse_rows_for(const SparseRowsArgs& g, int64_t begin, int64_t end, A* scratch) {
  using G = grad_storage_t<S>;
  const HardExp h = hard_exp_mode(g.params);
  if (h.squarings == 1) return run_sparse_rows_typed<S, G, A, 1, false>(g, begin, end, scratch);
  if (h.squarings == 2) return run_sparse_rows_typed<S, G, A, 2, false>(g, begin, end, scratch);
  if (h.separate) return run_sparse_rows_typed<S, G, A, 0, true>(g, begin, end, scratch);
  return run_sparse_rows_typed<S, G, A, 0, false>(g, begin, end, scratch);
}

}  // namespace

int64_t run_sparse_rows(const SparseRowsArgs& g, int64_t begin, int64_t end, void* scratch) {
  switch (g.student_dtype) {
    case DT_F32: return run_sparse_rows_for<float, float>(g, begin, end, static_cast<float*>(scratch));
    case DT_BF16: return run_sparse_rows_for<bf16_bits, float>(g, begin, end, static_cast<float*>(scratch));
    case DT_F16: return run_sparse_rows_for<f16_bits, float>(g, begin, end, static_cast<float*>(scratch));
    case DT_F64: return run_sparse_rows_for<double, double>(g, begin, end, static_cast<double*>(scratch));
    default: return -2;
  }
}

}  // namespace KDFAST_ISA
}  // namespace cpu
}  // namespace kdfast
