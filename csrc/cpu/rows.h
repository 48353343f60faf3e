// CPU row loops of the fused distillation loss, over raw pointers.
//
// This header is compiled once per instruction set (csrc/cpu/isa/*.cpp set `#pragma GCC
// target` and KDFAST_ISA before including it), so it must not include torch or any header
// with non-inline code whose instantiation could leak one ISA's code into another. The loops
// are written for GCC's vectorizer: `omp simd` reductions (no -ffast-math, so -inf and NaN
// keep IEEE meaning).
#pragma once

#include "kdfast/cpu_rows_api.h"
#include "kdfast/kd_math.h"

#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// float rows use kd_math.h's polynomial exp/log (plain arithmetic, vectorized in line); double
// rows (gradcheck, tests) call libm, whose SIMD variants libmvec provides.
extern "C" double exp(double) noexcept __attribute__((simd("notinbranch")));
extern "C" double log1p(double) noexcept __attribute__((simd("notinbranch")));
// lanes.h takes the row normalizers' logs across rows: libmvec's vector logf.
extern "C" float logf(float) noexcept __attribute__((simd("notinbranch")));

namespace kdfast {
namespace cpu {
namespace KDFAST_ISA {
namespace {

using namespace ::kdfast::math;

template <class A> KD_HD A widen(float v) { return v; }
template <class A> KD_HD A widen(double v) { return static_cast<A>(v); }
template <class A> KD_HD A widen(bf16_bits v) { return to_acc_float(v); }
template <class A> KD_HD A widen(f16_bits v) { return to_acc_float(v); }

// Rows already in the accumulation type are read in place; others are widened into scratch
// chunk by chunk as pass 2 reaches them (the prefetched reads; the widened chunk stays in L1
// for the maxima and exps): into the row's own slots when pass 3 reads the whole row again,
// else into one reused chunk (kl: no row-sized buffer streams through L2).
template <class A, class S>
const A* acc_row(const S*, A* buf) { return buf; }
template <class A>
const A* acc_row(const A* src, A*) { return src; }
// Elements [k0, k1) of the row in the accumulation type, at the returned pointer.
template <class A, class S>
const A* chunk_as_acc(const S* src, A* buf, int64_t k0, int64_t k1) {
#pragma omp simd
  for (int64_t k = k0; k < k1; ++k) buf[k - k0] = widen<A>(src[k]);
  return buf;
}
template <class A>
const A* chunk_as_acc(const A* src, A*, int64_t k0, int64_t) { return src + k0; }

// Writes a finished gradient chunk (at most kRowChunk elements). float and bfloat16 rows
// bypass the cache (non-temporal stores): the gradient is not read again while the rows run,
// and an ordinary store would first read every line of it from DRAM (write-allocate), a third
// of the row loops' memory traffic for float rows.
template <class G, class A>
void write_grad_row(G* dst, const A* src, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) store_from_acc(dst + k, src[k]);
}

#if defined(__x86_64__)
// Copies n bytes with non-temporal stores for the vector-aligned part of dst.
inline void stream_bytes(void* dst, const void* src, int64_t n) {
#if defined(__AVX512F__)
  constexpr int64_t kWidth = 64;
#elif defined(__AVX__)
  constexpr int64_t kWidth = 32;
#else
  constexpr int64_t kWidth = 16;
#endif
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  int64_t head = static_cast<int64_t>((kWidth - reinterpret_cast<uintptr_t>(d) % kWidth) % kWidth);
  if (head > n) head = n;
  std::memcpy(d, s, static_cast<size_t>(head));
  int64_t k = head;
  for (; k + kWidth <= n; k += kWidth) {
#if defined(__AVX512F__)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + k), _mm512_loadu_si512(s + k));
#elif defined(__AVX__)
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + k), v);
#else
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + k));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + k), v);
#endif
  }
  std::memcpy(d + k, s + k, static_cast<size_t>(n - k));
}
void write_grad_row(float* dst, const float* src, int64_t n) {
  stream_bytes(dst, src, n * int64_t(sizeof(float)));
}
void write_grad_row(bf16_bits* dst, const float* src, int64_t n) {
  alignas(64) bf16_bits rounded[kRowChunk];
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) store_from_acc(rounded + k, src[k]);
  stream_bytes(dst, rounded, n * int64_t(sizeof(bf16_bits)));
}
// Non-temporal stores are weakly ordered: fence them before the rows are handed back.
inline void stream_fence() { _mm_sfence(); }
#else
inline void stream_fence() {}
#endif

// Rows are processed in chunks of kRowChunk elements (cpu_rows_api.h). Pass 2 reads each
// chunk of the logits once: its maxima first (which brings the chunk into L1), then its exps
// relative to those chunk maxima, stashed along with the chunk's sums. The row maxima are
// known only after the last chunk, so a chunk's exps carry a scale r = exp(chunk max - row
// max), which the gradient passes fold into the normalizers (chunk_norm) instead of rewriting
// the stash: the logits come from memory once, not twice (benchmarks/NOTES.md, entry 9).

// The exps are compute-bound and wait on memory whenever a chunk's first read misses (the
// hardware prefetcher stops at each 4 KiB page: a chunk of floats). So each block of
// kPrefetchBlock exps is followed by prefetches of the logits a little further on (into the
// next row at the row's end): small bursts, spread over the compute. Rows of several chunks
// prefetch 1.5 chunks ahead with a low locality hint (prefetcht2: 7 % faster than prefetcht0
// at (1024, 32000) here); one-chunk rows prefetch the next row one chunk ahead into L1, which
// was 8 % faster there (NOTES.md, entry 13).
constexpr int64_t kPrefetchBlock = 256;
constexpr int64_t kPrefetchAheadLong = kRowChunk + kRowChunk / 2;
constexpr int64_t kPrefetchAheadShort = kRowChunk;

// Prefetches elements [j0, j1) of row i's logits, past the row's end into row i + 1's (also
// when row i ends this call's block: the next block is often this thread's, and a prefetch
// only reads), with __builtin_prefetch's locality hint. always_inline: as a function of its
// own, GCC's pure-const analysis finds no side effect in it and deletes every call (the
// kernel ran without a single prefetch until NOTES.md entry 13; tests/test_build_prefetch.py
// checks the binary).
template <class S, class Tt, int Locality>
__attribute__((always_inline)) inline void prefetch_logits(const RowsArgs& g, int64_t i, int64_t j0,
                                                           int64_t j1) {
  const int64_t C = g.n_cols;
  for (int64_t row = i; row < g.n_rows && row <= i + 1 && j0 < j1; ++row, j0 -= C, j1 -= C) {
    const int64_t a = j0 > 0 ? j0 : 0, b = j1 < C ? j1 : C;
    const char* s = reinterpret_cast<const char*>(static_cast<const S*>(g.student) + row * g.student_row_stride);
    const char* t = reinterpret_cast<const char*>(static_cast<const Tt*>(g.teacher) + row * g.teacher_row_stride);
    for (int64_t x = a * int64_t(sizeof(S)); x < b * int64_t(sizeof(S)); x += 64) {
      __builtin_prefetch(s + x, 0, Locality);
    }
    for (int64_t x = a * int64_t(sizeof(Tt)); x < b * int64_t(sizeof(Tt)); x += 64) {
      __builtin_prefetch(t + x, 0, Locality);
    }
  }
}

// One past the last element of chunk c of a row of n_cols.
inline int64_t chunk_end(int64_t c, int64_t n_cols) {
  return (c + 1) * kRowChunk < n_cols ? (c + 1) * kRowChunk : n_cols;
}

// The shift of a chunk's exps: finite, so an all -inf chunk (masked vocabulary) has exps of 0.
template <class A> A chunk_shift(A chunk_max) { return chunk_max == neg_inf<A>() ? A(0) : chunk_max; }

// The row's normalizers as seen by one chunk's stashed exps.
template <class A> RowNorm<A> chunk_norm(RowNorm<A> n, A r_a, A r_b, A r_s) {
  n.inv_za *= r_a;
  n.inv_zb *= r_b;
  n.inv_zs *= r_s;
  return n;
}

// exp(s - chunk max) at k: stashed (e_s), or e_a squared once or twice (T = 2, 4: exact).
template <class A> A hard_exp_at(const A* e_a, const A* e_s, int64_t k, int squarings) {
  const A ea2 = e_a[k] * e_a[k];
  return squarings == 0 ? e_s[k] : squarings == 1 ? ea2 : ea2 * ea2;
}

// Squarings: 1 or 2 when exp(s - max s) is e_a squared once or twice (T = 2 or 4), else 0.
// A template parameter, so the exp loops and the gradient loop carry no run-time select of it
// (-3 to -14 % per row, NOTES.md entry 14); run_rows_for dispatches on the call's value.
template <class S, class Tt, class G, class A, int Squarings>
int64_t run_rows_typed(const RowsArgs& g, int64_t begin, int64_t end, A* scratch) {
  const Params& P = g.params;
  const int64_t C = g.n_cols;
  const int64_t n_chunks = row_chunks(C);
  A* s_buf = scratch;
  A* t_buf = scratch + C;
  A* e_a = scratch + 2 * C;  // exp(a - chunk max a)
  A* e_b = scratch + 3 * C;  // exp(b - chunk max b); later the per-element log ratio
  A* e_s_own = scratch + 4 * C;  // exp(s - chunk max s), only when T is not 1, 2 or 4
  // Per chunk: maxima and sums from pass 2; the maxima's slots then hold the chunk's scales.
  A* chunk_max_s = scratch + 5 * C;  // then r_a
  A* chunk_max_t = chunk_max_s + n_chunks;  // then r_b
  A* chunk_z_a = chunk_max_t + n_chunks;
  A* chunk_z_b = chunk_z_a + n_chunks;
  A* chunk_z_s = chunk_z_b + n_chunks;  // then r_s
  A* chunk_cross = chunk_z_s + n_chunks;
  const A inv_t = static_cast<A>(P.inv_temperature);
  const A eps = static_cast<A>(P.smoothing);
  const A eps_over_c = eps / static_cast<A>(C);
  const A soft_g = static_cast<A>(P.soft_grad_coef);
  const A hard_g = static_cast<A>(P.hard_coef);
  const bool need_hard = P.hard_coef != 0.0;
  const bool need_logit_sum = need_hard && eps != A(0);
  const bool separate_hard_exp = need_hard && !P.same_scale;
  // softmax(s) from e_a (T == 1 or no hard term: a harmless stand-in), e_a squared, or its own
  // exps.
  constexpr int squarings = Squarings;
  const A* e_s = separate_hard_exp && squarings == 0 ? e_s_own : e_a;
  A* out_loss = static_cast<A*>(g.loss_rows);

  for (int64_t i = begin; i < end; ++i) {
    G* grad_row = g.grad ? static_cast<G*>(g.grad) + i * g.grad_row_stride : nullptr;
    int64_t y = -1;
    if (P.has_target) {
      y = g.target[i * g.target_stride];
      if (y == P.ignore_index) {
        out_loss[i] = A(0);
        if (grad_row) {
          for (int64_t k = 0; k < C; ++k) store_from_acc(grad_row + k, A(0));
        }
        continue;
      }
      if (y < 0 || y >= C) {
        stream_fence();
        return i;
      }
    }
    const S* s_src = static_cast<const S*>(g.student) + i * g.student_row_stride;
    const Tt* t_src = static_cast<const Tt*>(g.teacher) + i * g.teacher_row_stride;
    const A* s = acc_row(s_src, s_buf);
    const A* t = acc_row(t_src, t_buf);
    // Read before any gradient store: in-place mode writes the gradient over the student row.
    const A s_y = need_hard ? widen<A>(s_src[y]) : A(0);

    // Pass 2, chunk by chunk: maxima, then exps stashed for pass 3, and the chunk's sums.
    // 3 exps per element; 2 when the hard term reuses softmax(s/T) (T == 1), squares it
    // (T == 2 or 4), or there is none. cross = sum_k e_b[k] (x_b[k] - x_a[k]) over the exps'
    // arguments x = logit/T - max: log p_k - log q_k = x_b[k] - x_a[k] + log z_a - log z_b,
    // so kl's soft loss is cross / z_b + log z_a - log z_b and kl needs no later pass over the
    // logits. Relative to the maxima nothing large cancels (huge logits included). weighted: a
    // -inf (masked) teacher entry adds 0.
    A sum_s = A(0);  // the logit sum label smoothing needs
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t k0 = c * kRowChunk, k1 = chunk_end(c, C);
      const int64_t slot = P.kind == KIND_KL ? 0 : k0;
      const A* sc = chunk_as_acc(s_src, s_buf + slot, k0, k1);
      const A* tc = chunk_as_acc(t_src, t_buf + slot, k0, k1);
      A cm_s = neg_inf<A>(), cm_t = neg_inf<A>();
#pragma omp simd reduction(max : cm_s, cm_t)
      for (int64_t k = k0; k < k1; ++k) {
        cm_s = kd_max(cm_s, sc[k - k0]);
        cm_t = kd_max(cm_t, tc[k - k0]);
      }
      if (need_logit_sum) {
#pragma omp simd reduction(+ : sum_s)
        for (int64_t k = k0; k < k1; ++k) sum_s += sc[k - k0];
      }
      const A sh_s = chunk_shift(cm_s);
      const A sh_a = sh_s * inv_t, sh_b = chunk_shift(cm_t) * inv_t;
      A z_a = A(0), z_b = A(0), z_s = A(0), cross = A(0);
      for (int64_t kb = k0; kb < k1; kb += kPrefetchBlock) {
        const int64_t kb1 = kb + kPrefetchBlock < k1 ? kb + kPrefetchBlock : k1;
        if (squarings > 0) {
          const bool twice = squarings == 2;
#pragma omp simd reduction(+ : z_a, z_b, z_s, cross)
          for (int64_t k = kb; k < kb1; ++k) {
            const A xa = sc[k - k0] * inv_t - sh_a, xb = tc[k - k0] * inv_t - sh_b;
            const A ea = exp_nonpos(xa);
            const A eb = exp_nonpos(xb);
            cross += weighted(eb, xb - xa);
            const A ea2 = ea * ea;
            e_a[k] = ea;
            e_b[k] = eb;
            z_a += ea;
            z_b += eb;
            z_s += twice ? ea2 * ea2 : ea2;
          }
        } else if (separate_hard_exp) {
#pragma omp simd reduction(+ : z_a, z_b, z_s, cross)
          for (int64_t k = kb; k < kb1; ++k) {
            const A xa = sc[k - k0] * inv_t - sh_a, xb = tc[k - k0] * inv_t - sh_b;
            const A ea = exp_nonpos(xa);
            const A eb = exp_nonpos(xb);
            cross += weighted(eb, xb - xa);
            const A es = exp_nonpos(sc[k - k0] - sh_s);
            e_a[k] = ea;
            e_b[k] = eb;
            e_s_own[k] = es;
            z_a += ea;
            z_b += eb;
            z_s += es;
          }
        } else {
#pragma omp simd reduction(+ : z_a, z_b, cross)
          for (int64_t k = kb; k < kb1; ++k) {
            const A xa = sc[k - k0] * inv_t - sh_a, xb = tc[k - k0] * inv_t - sh_b;
            const A ea = exp_nonpos(xa);
            const A eb = exp_nonpos(xb);
            cross += weighted(eb, xb - xa);
            e_a[k] = ea;
            e_b[k] = eb;
            z_a += ea;
            z_b += eb;
          }
        }
        if (n_chunks > 1) {
          prefetch_logits<S, Tt, 1>(g, i, kb + kPrefetchAheadLong, kb1 + kPrefetchAheadLong);
        } else {
          prefetch_logits<S, Tt, 3>(g, i, kb + kPrefetchAheadShort, kb1 + kPrefetchAheadShort);
        }
      }
      if (!separate_hard_exp) z_s = z_a;
      chunk_max_s[c] = cm_s;
      chunk_max_t[c] = cm_t;
      chunk_z_a[c] = z_a;
      chunk_z_b[c] = z_b;
      chunk_z_s[c] = z_s;
      chunk_cross[c] = cross;
    }

    // The row's maxima and sums from the chunks'. A chunk's exps relative to the row maxima
    // are its stash times r = exp(d), d = chunk max/T - row max/T: 0 for an all -inf chunk,
    // NaN when the whole row is -inf (as softmax of it is).
    A max_s = neg_inf<A>(), max_t = neg_inf<A>();
    for (int64_t c = 0; c < n_chunks; ++c) {
      max_s = kd_max(max_s, chunk_max_s[c]);
      max_t = kd_max(max_t, chunk_max_t[c]);
    }
    const A max_a = max_s * inv_t, max_b = max_t * inv_t;
    A z_a = A(0), z_b = A(0), z_s = A(0), cross = A(0);
    for (int64_t c = 0; c < n_chunks; ++c) {
      const A d_a = chunk_max_s[c] * inv_t - max_a, d_b = chunk_max_t[c] * inv_t - max_b;
      const A r_a = exp_nonpos(d_a), r_b = exp_nonpos(d_b);
      const A r_a2 = r_a * r_a;
      const A r_s = squarings == 1 ? r_a2
                  : squarings == 2 ? r_a2 * r_a2
                  : separate_hard_exp ? exp_nonpos(chunk_max_s[c] - max_s) : r_a;
      z_a += r_a * chunk_z_a[c];
      z_b += r_b * chunk_z_b[c];
      z_s += r_s * chunk_z_s[c];
      // sum over the chunk of e_b r_b (x_b + d_b - x_a - d_a)
      cross += weighted(r_b, chunk_cross[c]) + weighted(r_b * chunk_z_b[c], d_b - d_a);
      chunk_max_s[c] = r_a;
      chunk_max_t[c] = r_b;
      chunk_z_s[c] = r_s;
    }
    const A* r_a = chunk_max_s;
    const A* r_b = chunk_max_t;
    const A* r_s = chunk_z_s;
    const RowNorm<A> n = row_norm(inv_t, max_s, max_t, z_a, z_b, z_s);
    const int64_t chunk_y = need_hard ? y / kRowChunk : -1;
    const RowNorm<A> n_y = need_hard ? chunk_norm(n, r_a[chunk_y], r_b[chunk_y], r_s[chunk_y]) : n;

    // Pass 3 (reverse_kl, jsd): their gradient needs a row sum over the logits first (kl's
    // soft loss came from pass 2's cross sum). The per-element log ratio replaces e_b.
    const A ea_y = need_hard ? e_a[y] : A(0);
    const A es_y = need_hard ? hard_exp_at(e_a, e_s, y, squarings) : A(0);
    A soft = A(0), grad_kl = A(0);
    if (P.kind == KIND_KL) {
      soft = cross * n.inv_zb + (kd_log(z_a) - kd_log(z_b));
    } else if (P.kind == KIND_REVERSE_KL) {
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t k0 = c * kRowChunk, k1 = chunk_end(c, C);
        const A inv_za = n.inv_za * r_a[c];
#pragma omp simd reduction(+ : soft)
        for (int64_t k = k0; k < k1; ++k) {
          const A log_q_over_p = -log_ratio_pq(s[k], t[k], n);
          e_b[k] = log_q_over_p;
          soft += weighted(e_a[k] * inv_za, log_q_over_p);
        }
      }
      grad_kl = soft;
    } else {  // jsd, in log space
      const A log_beta = static_cast<A>(P.log_beta), log1m_beta = static_cast<A>(P.log1m_beta);
      A kl_pm = A(0), kl_qm = A(0);
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t k0 = c * kRowChunk, k1 = chunk_end(c, C);
        const A inv_za = n.inv_za * r_a[c], inv_zb = n.inv_zb * r_b[c];
#pragma omp simd reduction(+ : kl_pm, kl_qm)
        for (int64_t k = k0; k < k1; ++k) {
          const A log_p = t[k] * inv_t - n.lse_b;
          const A log_q = s[k] * inv_t - n.lse_a;
          const A log_m = log_mixture(log_p, log_q, log_beta, log1m_beta);
          kl_pm += weighted(e_b[k] * inv_zb, log_p - log_m);
          kl_qm += weighted(e_a[k] * inv_za, log_q - log_m);
          e_b[k] = log_q - log_m;
        }
      }
      const A beta = static_cast<A>(P.beta);
      soft = beta * kl_pm + (A(1) - beta) * kl_qm;
      grad_kl = kl_qm;
    }

    // Pass 4: the gradient from the stashed exps only (so it is stored after every read of
    // the student row, which in-place mode overwrites), chunk by chunk into an L1 buffer (the
    // label's element, rounded once, put in place) and streamed out past the cache.
    if (grad_row) {
      const A weight = P.kind == KIND_JSD ? A(1) - static_cast<A>(P.beta) : A(1);
      const bool kl = P.kind == KIND_KL;
      A grad_y = A(0);
      if (need_hard) {
        grad_y = hard_g * (hard_grad(es_y, eps_over_c, n_y) - (A(1) - eps)) +
                 soft_g * (kl ? soft_grad_kl(ea_y, e_b[y], n_y)
                              : soft_grad_mode_seeking(ea_y, e_b[y], grad_kl, weight, n_y));
      }
      alignas(64) A chunk[kRowChunk];
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t k0 = c * kRowChunk, k1 = chunk_end(c, C);
        const RowNorm<A> nc = chunk_norm(n, r_a[c], r_b[c], r_s[c]);
        if (kl) {
#pragma omp simd
          for (int64_t k = k0; k < k1; ++k) {
            chunk[k - k0] = soft_g * soft_grad_kl(e_a[k], e_b[k], nc) +
                            hard_g * hard_grad(hard_exp_at(e_a, e_s, k, squarings), eps_over_c, nc);
          }
        } else {
#pragma omp simd
          for (int64_t k = k0; k < k1; ++k) {
            chunk[k - k0] = soft_g * soft_grad_mode_seeking(e_a[k], e_b[k], grad_kl, weight, nc) +
                            hard_g * hard_grad(hard_exp_at(e_a, e_s, k, squarings), eps_over_c, nc);
          }
        }
        if (c == chunk_y) chunk[y - k0] = grad_y;
        write_grad_row(grad_row + k0, chunk, k1 - k0);
      }
    }

    const A hard = need_hard ? hard_loss(s_y, sum_s, C, eps, n) : A(0);
    out_loss[i] = row_loss(soft, hard, P);
  }
  stream_fence();
  return -1;
}

template <class S, class Tt, class G, class A>
int64_t run_rows_for(const RowsArgs& g, int64_t begin, int64_t end, A* scratch) {
  const Params& P = g.params;
  const bool separate_hard_exp = P.hard_coef != 0.0 && !P.same_scale;
  switch (separate_hard_exp ? P.hard_exp_squarings : 0) {
    case 1: return run_rows_typed<S, Tt, G, A, 1>(g, begin, end, scratch);
    case 2: return run_rows_typed<S, Tt, G, A, 2>(g, begin, end, scratch);
    default: return run_rows_typed<S, Tt, G, A, 0>(g, begin, end, scratch);
  }
}

}  // namespace
}  // namespace KDFAST_ISA
}  // namespace cpu
}  // namespace kdfast

#include "lanes.h"

namespace kdfast {
namespace cpu {
namespace KDFAST_ISA {

float exp_probe(float* buf, int64_t n, int64_t reps) {
  float acc = 0.0f;
  for (int64_t r = 0; r < reps; ++r) {
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < n; ++k) {
      const float e = exp_nonpos(-buf[k]);
      buf[k] = e;  // feeds the next repeat, so the work cannot be hoisted
      acc += e;
    }
  }
  return acc;
}

int64_t run_rows(const RowsArgs& g, int64_t begin, int64_t end, void* scratch) {
  // The gradient is stored in the student's dtype, except fp16 students: their unnormalized
  // gradient underflows fp16, so it stays float32 (see cpu_rows_api.h).
  using F = float;
  using B = bf16_bits;
  using H = f16_bits;
  F* sf = static_cast<F*>(scratch);
  const bool lanes = g.n_cols <= g.lanes_max_cols;
#define KD_CASE(SD, TD, S, T, G)                                   \
  if (g.student_dtype == SD && g.teacher_dtype == TD)              \
    return lanes ? run_rows_lanes<S, T, G>(g, begin, end, sf)      \
                 : run_rows_for<S, T, G, F>(g, begin, end, sf);
  KD_CASE(DT_F32, DT_F32, F, F, F)
  KD_CASE(DT_F32, DT_BF16, F, B, F)
  KD_CASE(DT_F32, DT_F16, F, H, F)
  KD_CASE(DT_BF16, DT_F32, B, F, B)
  KD_CASE(DT_BF16, DT_BF16, B, B, B)
  KD_CASE(DT_BF16, DT_F16, B, H, B)
  KD_CASE(DT_F16, DT_F32, H, F, F)
  KD_CASE(DT_F16, DT_BF16, H, B, F)
  KD_CASE(DT_F16, DT_F16, H, H, F)
#undef KD_CASE
  if (g.student_dtype == DT_F64 && g.teacher_dtype == DT_F64)
    return run_rows_for<double, double, double, double>(g, begin, end, static_cast<double*>(scratch));
  return -2;
}

}  // namespace KDFAST_ISA
}  // namespace cpu
}  // namespace kdfast
