// CPU loops for rows with few classes (MNIST's C = 10): one row per SIMD lane.
//
// rows.h vectorizes along a row, which leaves a C = 10 row to scalar remainder loops and
// spends its time on per-row setup and horizontal reductions. Here a block of kLanes rows is
// transposed into scratch ([class][lane]), every pass loops over classes with the rows in
// the vector lanes, and the row reductions (max, exp sums, losses) become element-wise.
// The per-element math is the same kd_math.h code as rows.h and the CUDA kernels.
//
// Included by rows.h inside its ISA namespace (see rows.h for the compilation rules).
#pragma once

#include "kdfast/cpu_rows_api.h"
#include "kdfast/kd_math.h"

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

  RowNorm<float> at(int r, float inv_t) const {
    RowNorm<float> n;
    n.inv_t = inv_t;
    n.max_a = max_a[r];
    n.max_b = max_b[r];
    n.max_s = max_s[r];
    n.lse_a = lse_a[r];
    n.lse_b = lse_b[r];
    n.lse_s = lse_s[r];
    n.inv_za = inv_za[r];
    n.inv_zb = inv_zb[r];
    n.inv_zs = inv_zs[r];
    n.lse_gap = lse_gap[r];
    return n;
  }
};

// Rows [begin, end) in blocks of kLanes; scratch holds lanes_scratch_elems(C) floats.
// Returns -1, or the first row whose target is out of range (as run_rows_typed).
template <class S, class Tt, class G>
int64_t run_rows_lanes(const RowsArgs& g, int64_t begin, int64_t end, float* scratch) {
  constexpr int L = kLanes;
  const Params& P = g.params;
  const int64_t C = g.n_cols;
  float* s_t = scratch;           // [C][L] student logits
  float* t_t = s_t + C * L;       // [C][L] teacher logits
  float* e_a = t_t + C * L;       // exp(s/T - max), later the gradient
  float* e_b = e_a + C * L;       // exp(t/T - max), later the per-element log ratio
  float* e_s_own = e_b + C * L;   // exp(s - max s), only when T != 1
  const float inv_t = static_cast<float>(P.inv_temperature);
  const float eps = static_cast<float>(P.smoothing);
  const float eps_over_c = eps / static_cast<float>(C);
  const float soft_g = static_cast<float>(P.soft_grad_coef);
  const float hard_g = static_cast<float>(P.hard_coef);
  const bool need_hard = P.hard_coef != 0.0;
  const bool separate_hard_exp = need_hard && !P.same_scale;
  const float* e_s = separate_hard_exp ? e_s_own : e_a;
  const float mode_weight = P.kind == KIND_JSD ? 1.0f - static_cast<float>(P.beta) : 1.0f;
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
          s_t[k * L + r] = widen<float>(s[k]);
          t_t[k * L + r] = widen<float>(t[k]);
        }
      } else {
        for (int64_t k = 0; k < C; ++k) s_t[k * L + r] = t_t[k * L + r] = 0.0f;
      }
    }
    float s_y[L];
    for (int r = 0; r < L; ++r) s_y[r] = label[r] >= 0 ? s_t[label[r] * L + r] : 0.0f;

    // Pass 1: maxima and (label smoothing) logit sums.
    float max_s[L], max_t[L], sum_s[L];
    for (int r = 0; r < L; ++r) max_s[r] = max_t[r] = neg_inf<float>(), sum_s[r] = 0.0f;
    for (int64_t k = 0; k < C; ++k) {
#pragma omp simd
      for (int r = 0; r < L; ++r) {
        max_s[r] = kd_max(max_s[r], s_t[k * L + r]);
        max_t[r] = kd_max(max_t[r], t_t[k * L + r]);
        sum_s[r] += s_t[k * L + r];
      }
    }

    // Pass 2: exps and their sums.
    float z_a[L], z_b[L], z_s[L];
    for (int r = 0; r < L; ++r) {
      z_a[r] = z_b[r] = z_s[r] = 0.0f;
      nm.max_a[r] = max_s[r] * inv_t;
      nm.max_b[r] = max_t[r] * inv_t;
    }
    for (int64_t k = 0; k < C; ++k) {
#pragma omp simd
      for (int r = 0; r < L; ++r) {
        const float ea = exp_nonpos(s_t[k * L + r] * inv_t - nm.max_a[r]);
        const float eb = exp_nonpos(t_t[k * L + r] * inv_t - nm.max_b[r]);
        e_a[k * L + r] = ea;
        e_b[k * L + r] = eb;
        z_a[r] += ea;
        z_b[r] += eb;
      }
      if (separate_hard_exp) {
#pragma omp simd
        for (int r = 0; r < L; ++r) {
          const float es = exp_nonpos(s_t[k * L + r] - max_s[r]);
          e_s_own[k * L + r] = es;
          z_s[r] += es;
        }
      }
    }
#pragma omp simd
    for (int r = 0; r < L; ++r) {
      const RowNorm<float> n = row_norm(inv_t, max_s[r], max_t[r], z_a[r], z_b[r],
                                        separate_hard_exp ? z_s[r] : z_a[r]);
      nm.max_s[r] = n.max_s;
      nm.lse_a[r] = n.lse_a;
      nm.lse_b[r] = n.lse_b;
      nm.lse_s[r] = n.lse_s;
      nm.inv_za[r] = n.inv_za;
      nm.inv_zb[r] = n.inv_zb;
      nm.inv_zs[r] = n.inv_zs;
      nm.lse_gap[r] = n.lse_gap;
    }

    // Pass 3: the soft loss (reverse_kl and jsd stash their per-element log ratio in e_b).
    float soft[L], row_kl[L];
    for (int r = 0; r < L; ++r) soft[r] = row_kl[r] = 0.0f;
    if (P.kind == KIND_KL) {
      for (int64_t k = 0; k < C; ++k) {
#pragma GCC ivdep
        for (int r = 0; r < L; ++r) {
          const RowNorm<float> n = nm.at(r, inv_t);
          soft[r] += weighted(e_b[k * L + r] * n.inv_zb, log_ratio_pq(s_t[k * L + r], t_t[k * L + r], n));
        }
      }
    } else if (P.kind == KIND_REVERSE_KL) {
      for (int64_t k = 0; k < C; ++k) {
#pragma GCC ivdep
        for (int r = 0; r < L; ++r) {
          const RowNorm<float> n = nm.at(r, inv_t);
          const float log_q_over_p = -log_ratio_pq(s_t[k * L + r], t_t[k * L + r], n);
          soft[r] += weighted(e_a[k * L + r] * n.inv_za, log_q_over_p);
          e_b[k * L + r] = log_q_over_p;
        }
      }
      for (int r = 0; r < L; ++r) row_kl[r] = soft[r];
    } else {  // jsd, in log space
      const float log_beta = static_cast<float>(P.log_beta);
      const float log1m_beta = static_cast<float>(P.log1m_beta);
      const float beta = static_cast<float>(P.beta);
      float kl_pm[L];
      for (int r = 0; r < L; ++r) kl_pm[r] = 0.0f;
      for (int64_t k = 0; k < C; ++k) {
#pragma GCC ivdep
        for (int r = 0; r < L; ++r) {
          const RowNorm<float> n = nm.at(r, inv_t);
          const float log_p = t_t[k * L + r] * inv_t - n.lse_b;
          const float log_q = s_t[k * L + r] * inv_t - n.lse_a;
          const float log_m = log_mixture(log_p, log_q, log_beta, log1m_beta);
          kl_pm[r] += weighted(e_b[k * L + r] * n.inv_zb, log_p - log_m);
          row_kl[r] += weighted(e_a[k * L + r] * n.inv_za, log_q - log_m);
          e_b[k * L + r] = log_q - log_m;
        }
      }
      for (int r = 0; r < L; ++r) soft[r] = beta * kl_pm[r] + (1.0f - beta) * row_kl[r];
    }

    // Pass 4: the gradient, into e_a's slots (each is read before it is overwritten). Without
    // a hard term hard_g is 0 and e_s aliases e_a: the hard part adds exactly 0.
    if (g.grad) {
      const float one_m_eps = 1.0f - eps;
      for (int64_t k = 0; k < C; ++k) {
        const int32_t k32 = static_cast<int32_t>(k);
        float* slot = e_a + k * L;
        const float* eb_k = e_b + k * L;
        const float* es_k = e_s + k * L;
        if (P.kind == KIND_KL) {
#pragma GCC ivdep
          for (int r = 0; r < L; ++r) {
            const RowNorm<float> n = nm.at(r, inv_t);
            const float one_hot = label[r] == k32 ? one_m_eps : 0.0f;
            const float gk = soft_g * soft_grad_kl(slot[r], eb_k[r], n) +
                             hard_g * (hard_grad(es_k[r], eps_over_c, n) - one_hot);
            slot[r] = counted[r] ? gk : 0.0f;
          }
        } else {
#pragma GCC ivdep
          for (int r = 0; r < L; ++r) {
            const RowNorm<float> n = nm.at(r, inv_t);
            const float one_hot = label[r] == k32 ? one_m_eps : 0.0f;
            const float gk = soft_g * soft_grad_mode_seeking(slot[r], eb_k[r], row_kl[r], mode_weight, n) +
                             hard_g * (hard_grad(es_k[r], eps_over_c, n) - one_hot);
            slot[r] = counted[r] ? gk : 0.0f;
          }
        }
      }
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
