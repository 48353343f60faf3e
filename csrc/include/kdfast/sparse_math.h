// Per-row math of the sparse distillation loss (kdfast.sparse_distillation_loss), shared by
// its CPU rows (csrc/cpu/sparse_rows.h) and its CUDA rows (csrc/cuda/sparse_rows.cuh): the one
// definition of every per-row step, built on kd_math.h's helpers. tests/test_shared_math.py
// checks that the backends write no transcendental or formula of their own.
//
// One row: s = student logits (C), K = the row's valid teacher ids, z_K the teacher's logits
// there, T / T_t the student / teacher temperatures, tail = log sum_{j not in K} exp(z_j / T_t)
// (-inf for tail="renormalize": that mode is "bucket" with P_R = 0, one code path for both).
// The bins are the k valid ids and the rest R:
//   teacher: a = z_K / T_t, L = logaddexp(logsumexp(a), tail), log p_i = a_i - L,
//            log P_R = tail - L;
//   student: q = softmax(s / T) over all C, log q_i = s_i / T - lse_a,
//            log Q_R = lse_rest - lse_a with lse_rest = log sum_{j not in K} exp(s_j / T)
//            summed over the rest itself (no 1 - sum q_K cancellation).
// The steps:
//   1. The student row's statistics in two parts, the rest and K (kd_math.h's PartStats with
//      no teacher side: max_t = -inf, z_b = cross = 0), each from student_exps; merged with
//      merge_parts into the full row's; sparse_row_norm turns them into the normalizers.
//   2. The teacher's normalizer (teacher_log_total) and each bin's terms (make_bin: p, q, the
//      divergence's terms, the gradient ratio); bins_soft / bins_row_kl from their sums.
//   3. The gradient. For a divergence D of the bins with g_b = dD/dQ_b,
//      dD/ds_j = (1/T) q_j (g_b(j) - sum_b Q_b g_b), so each bin has one weight
//      w_b = Q_b (g_b - gbar) (bin_grad_weight): an id i in K gets soft_g * w_i, a column j of
//      the rest soft_g * (q_j / Q_R) * w_R (rest_grad_element), plus the hard part; q_j / Q_R
//      from step 1's stashed exps times a per-chunk factor (rest_chunk_factors), no exp.
#pragma once

#include "kdfast/kd_math.h"

namespace kdfast {
namespace math {

// ---- step 1: the student row ----
// One element's exps relative to a part's shifts: exp(s/T - shift_a), and softmax(s)'s
// exp(s - shift_s) as kd_math.h's hard_exp gets it (the mode HardExp of the call, fixed at
// compile time: e_a squared at T = 2 or 4, an exp of its own, or e_a itself).
template <class A> struct StudentExps { A ea, es; };
template <int Squarings, bool Separate, class A>
KD_HD StudentExps<A> student_exps(A s, A inv_t, A shift_a, A shift_s) {
  StudentExps<A> e;
  e.ea = exp_nonpos(s * inv_t - shift_a);
  e.es = hard_exp<Squarings, Separate>(s, e.ea, shift_s);
  return e;
}
// The shifts of a part whose (raw) maximum is max_s: shifts_of with no teacher side.
template <class A> KD_HD Shifts<A> student_shifts(A max_s, A inv_t) {
  return shifts_of(max_s, neg_inf<A>(), inv_t);
}
// A student-only part from its maximum and sums (merge_parts combines them; kind JSD: no
// cross sum).
template <class A> KD_HD PartStats<A> student_part(A max_s, A z_a, A z_s, A sum_s) {
  return PartStats<A>{max_s, neg_inf<A>(), z_a, A(0), z_s, A(0), sum_s};
}
template <class A>
KD_HD PartStats<A> merge_student_parts(const PartStats<A>& x, const PartStats<A>& y, A inv_t, HardExp h) {
  return merge_parts(x, y, inv_t, h, static_cast<int32_t>(KIND_JSD));
}
// Whether softmax(s) has sums of its own (z_s): squared or separate exps.
KD_HD bool own_hard_sums(HardExp h) { return h.squarings > 0 || h.separate; }
// exp of any argument (row constants, not elements): libm's.
KD_HD float row_exp(float x) { return expf(x); }
KD_HD double row_exp(double x) { return exp(x); }

// The row's normalizers. lse_s is lse_a's value when softmax(s) shares q's exps (T == 1, or
// no hard term: then it is unused).
template <class A> struct SparseRowNorm {
  A inv_t;
  A lse_a;       // log sum_j exp(s_j / T) over all C
  A lse_s;       // log sum_j exp(s_j) over all C
  A lse_rest;    // log sum_{j not in K} exp(s_j / T); -inf when K holds every class
  A log_q_rest;  // log Q_R
  A q_rest;      // Q_R
  // softmax(s)_j of a column j of the rest is hard_exp(e) * rest_hard_scale with
  // e = exp(s_j / T - lse_rest): e^T exp(T lse_rest - lse_s) for squarings (T = 2, 4), e Q_R
  // when it shares q's exps (T = 1), exp(s_j - lse_s) itself (scale 1) when separate.
  A rest_hard_scale;
};
template <class A> KD_HD A part_lse(A max_scaled, A z) { return max_scaled + kd_log(z); }
template <class A>
KD_HD SparseRowNorm<A> sparse_row_norm(const PartStats<A>& rest, const PartStats<A>& all, A inv_t, HardExp h) {
  SparseRowNorm<A> n;
  n.inv_t = inv_t;
  n.lse_a = part_lse(all.max_s * inv_t, all.z_a);
  n.lse_s = own_hard_sums(h) ? part_lse(all.max_s, all.z_s) : n.lse_a;
  const bool no_rest = rest.max_s == neg_inf<A>();
  n.lse_rest = no_rest ? neg_inf<A>() : part_lse(rest.max_s * inv_t, rest.z_a);
  n.log_q_rest = no_rest ? neg_inf<A>() : n.lse_rest - n.lse_a;
  n.q_rest = no_rest ? A(0) : exp_nonpos(n.log_q_rest);
  const A powers = h.squarings == 1 ? A(2) : A(4);
  n.rest_hard_scale = h.separate ? A(1)
                      : h.squarings == 0 ? n.q_rest
                      : no_rest ? A(0) : row_exp(powers * n.lse_rest - n.lse_s);
  return n;
}

// The hard term (kd_math.h's hard_loss) from the sparse row's normalizer.
template <class A>
KD_HD A sparse_hard_loss(A s_y, A sum_s, int64_t n_cols, A eps, const SparseRowNorm<A>& n) {
  return hard_loss_from_lse(s_y, sum_s, n_cols, eps, n.lse_s);
}

// ---- step 2: the teacher and the bins ----
// a_i = z_i / T_t.
template <class A> KD_HD A teacher_scaled(A z, A inv_tt) { return z * inv_tt; }
// L = logaddexp(max_a + log z, tail) from the maximum of a = z_K / T_t and the sum of
// exp(a_i - max_a) (teacher_exp).
template <class A> KD_HD A teacher_exp(A a, A max_a) { return exp_nonpos(a - max_a); }
template <class A> KD_HD A teacher_log_total(A max_a, A z, A tail) {
  return log_add_exp(part_lse(max_a, z), tail);
}

// One bin's probabilities, its terms of the divergence, and the gradient's ratio:
//   kl:         term_p = p (log p - log q)
//   reverse_kl: term_q = q (log q - log p),  ratio = log q - log p
//   jsd:        term_p = p (log p - log m), term_q = q (log q - log m), ratio = log q - log m,
//               m = beta p + (1 - beta) q in log space
// with 0 log 0 = 0 (weighted): a bin empty on both sides adds nothing, not NaN.
template <class A> struct Bin { A p, q, term_p, term_q, ratio; };
template <class A>
KD_HD Bin<A> make_bin(int32_t kind, A log_p, A log_q, A log_beta, A log1m_beta) {
  Bin<A> b;
  b.p = exp_nonpos(log_p);
  b.q = exp_nonpos(log_q);
  if (kind == KIND_KL) {
    b.term_p = weighted(b.p, log_p - log_q);
    b.term_q = A(0);
    b.ratio = A(0);
  } else if (kind == KIND_REVERSE_KL) {
    b.term_p = A(0);
    b.ratio = log_q - log_p;
    b.term_q = weighted(b.q, b.ratio);
  } else {
    const A log_m = log_mixture(log_p, log_q, log_beta, log1m_beta);
    b.term_p = weighted(b.p, log_p - log_m);
    b.ratio = log_q - log_m;
    b.term_q = weighted(b.q, b.ratio);
  }
  return b;
}
// The bin of an id in K (a = z_i / T_t, s = s_i; log p_i = a - L, log q_i = s / T - lse_a)
// and the rest's bin (log P_R = tail - L, log Q_R).
template <class A>
KD_HD Bin<A> id_bin(int32_t kind, A a, A s, A log_total, const SparseRowNorm<A>& n, A log_beta, A log1m_beta) {
  return make_bin(kind, a - log_total, s * n.inv_t - n.lse_a, log_beta, log1m_beta);
}
template <class A>
KD_HD Bin<A> rest_bin(int32_t kind, A tail, A log_total, const SparseRowNorm<A>& n, A log_beta, A log1m_beta) {
  return make_bin(kind, tail - log_total, n.log_q_rest, log_beta, log1m_beta);
}
// The soft loss from the sums of the bins' terms: kl sum term_p, reverse_kl sum term_q, jsd
// beta sum term_p + (1 - beta) sum term_q.
template <class A> KD_HD A bins_soft(int32_t kind, A sum_p, A sum_q, A beta) {
  if (kind == KIND_KL) return sum_p;
  if (kind == KIND_REVERSE_KL) return sum_q;
  return jsd_soft(sum_p, sum_q, beta);
}
// reverse_kl's KL(Q||P), jsd's KL(Q||M): the mode-seeking gradients' sum_b Q_b ratio_b.
template <class A> KD_HD A bins_row_kl(A sum_q) { return sum_q; }

// ---- step 3: the gradient ----
// w_b = Q_b (g_b - gbar) of one bin: kl q - p; reverse_kl / jsd mode_weight q (ratio - row_kl)
// (mode_weight 1 / 1 - beta), as the dense soft_grad_kl / soft_grad_mode_seeking.
template <class A> KD_HD A bin_grad_weight(int32_t kind, const Bin<A>& b, A row_kl, A mode_weight) {
  if (kind == KIND_KL) return b.q - b.p;
  return weighted(b.q, mode_weight * (b.ratio - row_kl));
}
// softmax(s)_i of an id in K (k per row: an exp of its own when softmax(s) has own sums),
// or q_i itself when they share exps.
template <bool OwnSums, class A> KD_HD A hard_prob(A s, A q, const SparseRowNorm<A>& n) {
  return OwnSums ? exp_nonpos(s - n.lse_s) : q;
}
// d loss / d s_i of an id i in K: soft_g w_i plus the hard part.
template <bool OwnSums, class A>
KD_HD A bin_grad_element(A s, A w, A q, const SparseRowNorm<A>& n, GradCoefs<A> g, bool at_label) {
  return g.soft_g * w + hard_grad_from_prob(hard_prob<OwnSums>(s, q, n), g, at_label);
}
// d loss / d s_j of a column j of the rest: soft_g (q_j / Q_R) w_R plus the hard part, from
// e = q_j / Q_R = exp(s_j / T - lse_rest) <= 1 (finite even when Q_R underflows) and, when
// softmax(s) has exps of its own (Separate), e_s = exp(s_j - lse_s); else softmax(s)_j comes
// from e (rest_hard_scale).
template <int Squarings, bool Separate, class A>
KD_HD A rest_grad_from_exps(A e, A e_s, A w_rest, const SparseRowNorm<A>& n, GradCoefs<A> g, bool at_label) {
  const A r = (Separate ? e_s : hard_exp<Squarings, false>(A(0), e, A(0))) * n.rest_hard_scale;
  return g.soft_g * (e * w_rest) + hard_grad_from_prob(r, g, at_label);
}
// The same from the logit s_j itself.
template <int Squarings, bool Separate, class A>
KD_HD A rest_grad_element(A s, A w_rest, const SparseRowNorm<A>& n, GradCoefs<A> g, bool at_label) {
  const A e = exp_nonpos(s * n.inv_t - n.lse_rest);
  return rest_grad_from_exps<Squarings, Separate>(e, hard_exp<0, Separate>(s, e, n.lse_s), w_rest, n, g, at_label);
}
// The rest's exps stashed by a row loop's statistics pass (student_exps relative to a chunk's
// student_shifts) turn into rest_grad_from_exps's e and e_s with one factor per chunk:
// exp(shift - normalizer) <= 1, so the stash is never rewritten when a later chunk raises the
// row's maximum. An all -inf chunk (every column in K) gets 0: its exps are 0 already.
template <class A> struct RestChunkFactors { A a, s; };
template <class A>
KD_HD RestChunkFactors<A> rest_chunk_factors(A chunk_max, const SparseRowNorm<A>& n, HardExp h) {
  const bool empty = chunk_max == neg_inf<A>();
  const Shifts<A> sh = student_shifts(chunk_max, n.inv_t);
  RestChunkFactors<A> f;
  f.a = empty ? A(0) : exp_nonpos(sh.a - n.lse_rest);
  f.s = empty || !h.separate ? A(0) : exp_nonpos(sh.s - n.lse_s);
  return f;
}
// rest_grad_from_exps from a column's stashed exps (e_s: 0 unless Separate) and its chunk's
// factors.
template <int Squarings, bool Separate, class A>
KD_HD A rest_grad_stashed(A stashed_a, A stashed_s, RestChunkFactors<A> f, A w_rest, const SparseRowNorm<A>& n,
                          GradCoefs<A> g, bool at_label) {
  return rest_grad_from_exps<Squarings, Separate>(stashed_a * f.a, Separate ? stashed_s * f.s : A(0), w_rest, n,
                                                  g, at_label);
}

// ---- the teacher's normalizer in one pass over its k entries (the CUDA rows: each thread
// its slots, then the group's union; the CPU rows take the maximum first instead) ----
// max_a = max of a = z / T_t over the part, z = sum exp(a - max_a): merged with online
// rescaling, bitwise commutative (a butterfly all-reduce ends equal in every lane). A part
// with max_a = -inf (empty or all -inf) adds 0.
template <class A> struct TeacherPart { A max_a, z; };
template <class A> KD_HD TeacherPart<A> empty_teacher_part() { return TeacherPart<A>{neg_inf<A>(), A(0)}; }
template <class A> KD_HD A teacher_rescaled(const TeacherPart<A>& p, A max_a) {
  return p.max_a == neg_inf<A>() ? A(0) : p.z * exp_nonpos(p.max_a - max_a);
}
template <class A> KD_HD TeacherPart<A> merge_teacher_parts(const TeacherPart<A>& x, const TeacherPart<A>& y) {
  const A m = nan_max(x.max_a, y.max_a);
  return TeacherPart<A>{m, teacher_rescaled(x, m) + teacher_rescaled(y, m)};
}
// p plus one entry a = teacher_scaled(z_i, 1 / T_t).
template <class A> KD_HD TeacherPart<A> add_teacher_entry(const TeacherPart<A>& p, A a) {
  return merge_teacher_parts(p, TeacherPart<A>{a, A(1)});
}

}  // namespace math
}  // namespace kdfast
