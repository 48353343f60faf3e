// CPU loops for rows with few classes (MNIST's C = 10): one row per SIMD lane.
//
// rows.h vectorizes along a row, which leaves a C = 10 row to scalar remainder loops and
// spends its time on per-row setup and horizontal reductions. Here a block of kLanes rows is
// transposed into scratch ([class][lane]), every pass loops over classes with the rows in
// the vector lanes, and the row reductions (max, exp sums, losses) become element-wise.
// The per-element math is kd_math.h's, as in rows.h and the CUDA kernels.
//
// Included by rows.h inside its ISA namespace (see rows.h for the compilation rules).
#pragma once

#include "kdfast/cpu_rows_api.h"
#include "kdfast/kd_math.h"

#include <cstring>
#include <type_traits>

// GCC 12's jump threading turned the select of kd_math.h's exp into a branch in one variant of
// the lane exps (kl with softmax(s) = q: T == 1 or no hard term), which then did not vectorize
// ("control flow in loop"): 3x slower. Off for the lane loops only.
#pragma GCC push_options
#pragma GCC optimize("no-thread-jumps")
namespace kdfast {
namespace cpu {
namespace KDFAST_ISA {
namespace {

using namespace ::kdfast::math;

// One block's row normalizers, structure of arrays so the lane loops load them as vectors.
struct LaneNorms {
  float max_a[kLanes], max_b[kLanes], max_s[kLanes];
  float lse_a[kLanes], lse_b[kLanes], lse_s[kLanes];
  float inv_za[kLanes], inv_zb[kLanes], inv_zs[kLanes], lse_gap[kLanes];

  void set(int r, const RowNorm<float>& n) {
    max_a[r] = n.max_a, max_b[r] = n.max_b, max_s[r] = n.max_s;
    lse_a[r] = n.lse_a, lse_b[r] = n.lse_b, lse_s[r] = n.lse_s;
    inv_za[r] = n.inv_za, inv_zb[r] = n.inv_zb, inv_zs[r] = n.inv_zs, lse_gap[r] = n.lse_gap;
  }
  RowNorm<float> at(int r, float inv_t) const {
    RowNorm<float> n;
    n.inv_t = inv_t;
    n.max_a = max_a[r], n.max_b = max_b[r], n.max_s = max_s[r];
    n.lse_a = lse_a[r], n.lse_b = lse_b[r], n.lse_s = lse_s[r];
    n.inv_za = inv_za[r], n.inv_zb = inv_zb[r], n.inv_zs = inv_zs[r], n.lse_gap = lse_gap[r];
    return n;
  }
};

// Pass 2 of a block: exps, their sums and the cross sum, the rows in the lanes. Kind and the
// hard term's exps are compile-time, so each loop does only its call's work (a generic lambda
// here left GCC's vectorizer with "control flow" in the kl, T == 1 variant: 3x slower).
template <int32_t Kind, bool Separate>
__attribute__((always_inline)) inline void lane_exps(int64_t C, const float* s_t, const float* t_t, float inv_t,
                                                     const float* sh_a, const float* sh_b, const float* sh_s,
                                                     float* e_a, float* e_b, float* e_s_own, float* z_a, float* z_b,
                                                     float* z_s, float* cross) {
  constexpr int L = kLanes;
  constexpr bool teacher_exps = Kind != KIND_LOGIT_MSE;
  for (int64_t k = 0; k < C; ++k) {
#pragma omp simd
    for (int r = 0; r < L; ++r) {
      const ElemExps<float> e = kind_exps<Kind, 0, Separate>(s_t[k * L + r], t_t[k * L + r], inv_t,
                                                             Shifts<float>{sh_a[r], sh_b[r], sh_s[r]});
      e_a[k * L + r] = e.ea;
      if (teacher_exps) e_b[k * L + r] = e.eb;
      z_a[r] += e.ea;
      if (teacher_exps) z_b[r] += e.eb;
      if (Separate) e_s_own[k * L + r] = e.es, z_s[r] += e.es;
      if (Kind == KIND_KL || Kind == KIND_REVERSE_KL) cross[r] += cross_term<Kind>(e);
    }
  }
  if (!Separate) std::memcpy(z_s, z_a, L * sizeof(float));
}

// Rows [begin, end) in blocks of kLanes; scratch holds lanes_scratch_elems(C) floats.
// Returns -1, or the first row whose target is out of range (as run_rows_typed).
// The same steps as rows.h (kd_math.h), with the whole row as one part: pass 1 takes the row
// maxima, so pass 2's exps need no rescaling.
template <class S, class Tt, class G>
int64_t run_rows_lanes(const RowsArgs& g, int64_t begin, int64_t end, float* scratch) {
  constexpr int L = kLanes;
  const Params& P = g.params;
  const int64_t C = g.n_cols;
  float* s_t = scratch;           // [C][L] student logits
  float* t_t = s_t + C * L;       // [C][L] teacher logits
  float* e_a = t_t + C * L;       // exp(s/T - max), later the gradient
  float* e_b = e_a + C * L;       // exp(t/T - max); jsd: then its gradient ratio
  float* e_s_own = e_b + C * L;   // exp(s - max s), only when softmax(s) has exps of its own
  const float inv_t = static_cast<float>(P.inv_temperature);
  const float eps = static_cast<float>(P.smoothing);
  const GradCoefs<float> gc = grad_coefs(P, C, 1.0f);
  const bool need_hard = P.hard_coef != 0.0;
  const bool logit_mse = P.kind == KIND_LOGIT_MSE;
  // One row per lane leaves no per-element loop to specialize: softmax(s) gets exps of its
  // own whenever T != 1 (no squarings here).
  const HardExp hx{0, need_hard && !P.same_scale};
  const float* e_s = hx.separate ? e_s_own : e_a;
  float* out_loss = static_cast<float*>(g.loss_rows);
  LaneNorms nm;

  for (int64_t b0 = begin; b0 < end; b0 += L) {
    int rows = static_cast<int>(end - b0 < L ? end - b0 : L);
    // Labels: -1 marks "no label element" (no target, ignored row, padding lane). int32, as
    // wide as the float lanes, so the compares vectorize with them (C is small here).
    int32_t label[L];
    int32_t counted[L];
    for (int r = 0; r < L; ++r) label[r] = -1, counted[r] = r < rows;
    int64_t bad_row = -1;  // like the row loops: finish the rows before it, then report it
    for (int r = 0; r < rows && P.has_target; ++r) {
      const int64_t y = g.target[(b0 + r) * g.target_stride];
      if (y == P.ignore_index) {
        counted[r] = 0;
      } else if (y < 0 || y >= C) {
        bad_row = b0 + r;
        for (int q = r; q < L; ++q) counted[q] = 0;
        rows = r;
        break;
      } else {
        label[r] = static_cast<int32_t>(y);
      }
    }
    // Transpose the block in; padding lanes get zeros (finite, ignored at the end).
    for (int r = 0; r < L; ++r) {
      if (r < rows) {
        const S* s = static_cast<const S*>(g.student) + (b0 + r) * g.student_row_stride;
        const Tt* t = static_cast<const Tt*>(g.teacher) + (b0 + r) * g.teacher_row_stride;
        for (int64_t k = 0; k < C; ++k) {
          s_t[k * L + r] = to_acc<float>(s[k]);
          t_t[k * L + r] = to_acc<float>(t[k]);
        }
      } else {
        for (int64_t k = 0; k < C; ++k) s_t[k * L + r] = t_t[k * L + r] = 0.0f;
      }
    }
    float s_y[L];
    for (int r = 0; r < L; ++r) s_y[r] = label[r] >= 0 ? s_t[label[r] * L + r] : 0.0f;

    // Pass 1: maxima and (label smoothing, logit_mse) logit sums.
    float max_s[L], max_t[L], sum_s[L], sum_t[L];
    for (int r = 0; r < L; ++r) max_s[r] = max_t[r] = neg_inf<float>(), sum_s[r] = sum_t[r] = 0.0f;
    for (int64_t k = 0; k < C; ++k) {
#pragma omp simd
      for (int r = 0; r < L; ++r) {
        max_s[r] = kd_max(max_s[r], s_t[k * L + r]);
        max_t[r] = kd_max(max_t[r], t_t[k * L + r]);
        sum_s[r] += s_t[k * L + r];
      }
    }
    if (logit_mse) {
      for (int64_t k = 0; k < C; ++k) {
#pragma omp simd
        for (int r = 0; r < L; ++r) sum_t[r] += t_t[k * L + r];
      }
    }

    // Pass 2: exps, their sums and the cross sum (kd_math.h step 1, the row as one part).
    float z_a[L], z_b[L], z_s[L], cross[L];
    float sh_a[L], sh_b[L], sh_s[L];  // the lanes' Shifts, structure of arrays for the vectors
#pragma omp simd
    for (int r = 0; r < L; ++r) {
      z_a[r] = z_b[r] = z_s[r] = cross[r] = 0.0f;
      const Shifts<float> sh = shifts_of(max_s[r], max_t[r], inv_t);
      sh_a[r] = sh.a, sh_b[r] = sh.b, sh_s[r] = sh.s;
    }
    with_kind(P.kind, [&](auto kind_c) {
      constexpr int32_t kKind = decltype(kind_c)::value;
      if (hx.separate) {
        lane_exps<kKind, true>(C, s_t, t_t, inv_t, sh_a, sh_b, sh_s, e_a, e_b, e_s_own, z_a, z_b, z_s, cross);
      } else {
        lane_exps<kKind, false>(C, s_t, t_t, inv_t, sh_a, sh_b, sh_s, e_a, e_b, e_s_own, z_a, z_b, z_s, cross);
      }
    });
    // Across the lanes, so the normalizers' logs are vector logs (libmvec).
#pragma omp simd
    for (int r = 0; r < L; ++r) nm.set(r, row_norm(inv_t, max_s[r], max_t[r], z_a[r], z_b[r], z_s[r]));

    // The soft loss: kl / reverse_kl from the cross sum; jsd from a pass of its terms (its
    // gradient ratio replaces e_b); logit_mse from a pass of its centred gaps.
    float soft[L], row_kl[L];
    MseRow<float> mse[L];
    if (P.kind == KIND_KL || P.kind == KIND_REVERSE_KL) {
#pragma omp simd
      for (int r = 0; r < L; ++r) soft[r] = row_kl[r] = soft_from_cross(P.kind, cross[r], z_a[r], z_b[r]);
    } else if (logit_mse) {
      float sq[L];
      for (int r = 0; r < L; ++r) mse[r] = mse_row(sum_s[r], sum_t[r], C), sq[r] = row_kl[r] = 0.0f;
      for (int64_t k = 0; k < C; ++k) {
#pragma omp simd
        for (int r = 0; r < L; ++r) sq[r] += mse_terms(s_t[k * L + r], t_t[k * L + r], mse[r]).sq;
      }
      for (int r = 0; r < L; ++r) soft[r] = mse_soft(sq[r], mse[r]);
    } else {
      const float log_beta = static_cast<float>(P.log_beta);
      const float log1m_beta = static_cast<float>(P.log1m_beta);
      float kl_pm[L];
      for (int r = 0; r < L; ++r) kl_pm[r] = row_kl[r] = 0.0f;
      for (int64_t k = 0; k < C; ++k) {
#pragma GCC ivdep
        for (int r = 0; r < L; ++r) {
          const JsdTerms<float> j = jsd_terms(s_t[k * L + r], t_t[k * L + r], e_a[k * L + r], e_b[k * L + r],
                                              nm.at(r, inv_t), log_beta, log1m_beta);
          kl_pm[r] += j.pm;
          row_kl[r] += j.qm;
          e_b[k * L + r] = j.ratio;
        }
      }
      for (int r = 0; r < L; ++r) soft[r] = jsd_soft(kl_pm[r], row_kl[r], static_cast<float>(P.beta));
    }

    // The gradient, into e_a's slots (each is read before it is overwritten).
    if (g.grad) {
      with_kind(P.kind, [&](auto kind_c) {
        constexpr int32_t kKind = decltype(kind_c)::value;
        for (int64_t k = 0; k < C; ++k) {
          const int32_t k32 = static_cast<int32_t>(k);
          float* slot = e_a + k * L;
          const float* eb_k = e_b + k * L;
          const float* es_k = e_s + k * L;
#pragma GCC ivdep
          for (int r = 0; r < L; ++r) {
            const RowNorm<float> n = nm.at(r, inv_t);
            float gk;
            if constexpr (kKind == KIND_LOGIT_MSE) {
              const float gap = mse_terms(s_t[k * L + r], t_t[k * L + r], mse[r]).gap;
              gk = grad_mse_element(gap, es_k[r], n, mse[r], gc, label[r] == k32);
            } else {
              const float ratio =
                  kKind == KIND_REVERSE_KL ? reverse_kl_ratio(s_t[k * L + r], t_t[k * L + r], n) : eb_k[r];
              gk = grad_element(kKind, slot[r], eb_k[r], ratio, row_kl[r], es_k[r], n, gc, label[r] == k32);
            }
            slot[r] = counted[r] ? gk : 0.0f;
          }
        }
      });
      for (int r = 0; r < rows; ++r) {
        G* grad_row = static_cast<G*>(g.grad) + (b0 + r) * g.grad_row_stride;
        for (int64_t k = 0; k < C; ++k) store_from_acc(grad_row + k, e_a[k * L + r]);
      }
    }

    for (int r = 0; r < rows; ++r) {
      float hard = 0.0f;
      if (need_hard && counted[r]) hard = hard_loss(s_y[r], sum_s[r], C, eps, nm.at(r, inv_t));
      out_loss[b0 + r] = counted[r] ? row_loss(soft[r], hard, P) : 0.0f;
    }
    if (bad_row >= 0) return bad_row;
  }
  return -1;
}

}  // namespace
}  // namespace KDFAST_ISA
}  // namespace cpu
}  // namespace kdfast
#pragma GCC pop_options
