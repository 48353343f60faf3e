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
#include <type_traits>

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

// Rows already in the accumulation type are read in place; others are widened into scratch
// chunk by chunk as pass 2 reaches them (the prefetched reads; the widened chunk stays in L1
// for the maxima and exps): into the row's own slots when a later pass reads the row again
// (reverse_kl's gradient, jsd), else into one reused chunk (kl: no row-sized buffer streams
// through L2).
template <class A, class S>
const A* acc_row(const S*, A* buf) { return buf; }
template <class A>
const A* acc_row(const A* src, A*) { return src; }
// Elements [k0, k1) of the row in the accumulation type, at the returned pointer.
template <class A, class S>
const A* chunk_as_acc(const S* src, A* buf, int64_t k0, int64_t k1) {
#pragma omp simd
  for (int64_t k = k0; k < k1; ++k) buf[k - k0] = to_acc<A>(src[k]);
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
// max), which the gradient passes fold into the normalizers (part_norm) instead of rewriting
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

// Calls f(std::integral_constant<int32_t, kind>) for the call's kind, so the loops carry no
// run-time select between the kinds' formulas.
template <class F> __attribute__((always_inline)) inline void with_kind(int32_t kind, F&& f) {
  if (kind == KIND_KL) {
    f(std::integral_constant<int32_t, KIND_KL>{});
  } else if (kind == KIND_REVERSE_KL) {
    f(std::integral_constant<int32_t, KIND_REVERSE_KL>{});
  } else if (kind == KIND_JSD) {
    f(std::integral_constant<int32_t, KIND_JSD>{});
  } else {
    f(std::integral_constant<int32_t, KIND_LOGIT_MSE>{});
  }
}

// Running sums of one chunk's pass 2 (the vectorizer wants scalars for its reductions).
template <class A> struct ChunkSums { A z_a, z_b, z_s, cross; };

// Pass 2's exps for elements [kb, kb1) of a chunk starting at k0 (sc, tc: the chunk in the
// accumulation type), stashed for the gradient pass: e_a, e_b, and e_s when softmax(s) has
// exps of its own. Kind and the hard term's exps are compile-time here so each loop carries
// only the work its call needs (jsd: no cross sum; T == 1 or no hard term: no z_s; logit_mse:
// softmax(s)'s exps only).
template <int Kind, int Squarings, bool Separate, class A>
__attribute__((always_inline)) inline void chunk_exps(const A* sc, const A* tc, int64_t k0, int64_t kb,
                                                      int64_t kb1, A inv_t, Shifts<A> sh, A* e_a, A* e_b,
                                                      A* e_s_own, ChunkSums<A>& sums) {
  constexpr bool own_z_s = Squarings > 0 || Separate;
  constexpr bool teacher_exps = Kind != KIND_LOGIT_MSE;
  A z_a = sums.z_a, z_b = sums.z_b, z_s = sums.z_s, cross = sums.cross;
#pragma omp simd reduction(+ : z_a, z_b, z_s, cross)
  for (int64_t k = kb; k < kb1; ++k) {
    const ElemExps<A> e = kind_exps<Kind, Squarings, Separate>(sc[k - k0], tc[k - k0], inv_t, sh);
    e_a[k] = e.ea;
    if (teacher_exps) e_b[k] = e.eb;
    if (Separate) e_s_own[k] = e.es;
    z_a += e.ea;
    if (teacher_exps) z_b += e.eb;
    if (own_z_s) z_s += e.es;
    if (Kind == KIND_KL || Kind == KIND_REVERSE_KL) cross += cross_term<Kind>(e);
  }
  sums = ChunkSums<A>{z_a, z_b, own_z_s ? z_s : z_a, cross};
}

// softmax(s)'s exp at k relative to its chunk's shift: stashed in e_s (its own exps, or e_a
// itself when e_s aliases it), or e_a squared once or twice (T = 2, 4: hard_exp).
template <int Squarings, class A> A stashed_hard_exp(const A* e_a, const A* e_s, int64_t k) {
  if constexpr (Squarings == 0) {
    return e_s[k];
  } else {
    return hard_exp<Squarings, false>(A(0), e_a[k], A(0));
  }
}

// Per-row scratch of the row loops (5 rows of C plus two records per chunk, see scratch_elems).
template <class A> struct RowScratch {
  A* s_buf;    // the student row in the accumulation type (when it is not already)
  A* t_buf;    // the teacher row likewise
  A* e_a;      // exp(a - chunk shift a)
  A* e_b;      // exp(b - chunk shift b); jsd: then its gradient ratio
  A* e_s_own;  // exp(s - chunk shift s), only when softmax(s) has exps of its own
  PartStats<A>* parts;  // per chunk: pass 2's statistics
  Scales<A>* scales;    // per chunk: its scales to the row maxima
};
template <class A> RowScratch<A> row_scratch(A* scratch, int64_t C) {
  const int64_t n_chunks = row_chunks(C);
  A* records = scratch + 5 * C;
  return RowScratch<A>{scratch, scratch + C, scratch + 2 * C, scratch + 3 * C, scratch + 4 * C,
                       reinterpret_cast<PartStats<A>*>(records),
                       reinterpret_cast<Scales<A>*>(records + n_chunks * kPartStatsElems)};
}

// logit_mse's second read of the row (the stashed s and t): its soft sum over the centred gaps
// and, with grad_row, the gradient, chunk by chunk as for the other kinds. Without grad_row the
// chunks' gradients are computed all the same and dropped, so the sum is bitwise the one of a
// call with a gradient. y: the label, or -1 without a hard term. Returns the soft term.
template <int Squarings, class A, class G>
A logit_mse_pass(const A* s, const A* t, const RowScratch<A>& w, const A* e_s, const RowNorm<A>& n,
                 const MseRow<A>& m, const GradCoefs<A>& gc, int64_t C, int64_t y, G* grad_row) {
  const int64_t chunk_y = y >= 0 ? y / kRowChunk : -1;
  alignas(64) A chunk[kRowChunk];
  A sq = A(0);
  for (int64_t c = 0; c < row_chunks(C); ++c) {
    const int64_t k0 = c * kRowChunk, k1 = chunk_end(c, C);
    const RowNorm<A> nc = part_norm(n, w.scales[c]);
#pragma omp simd reduction(+ : sq)
    for (int64_t k = k0; k < k1; ++k) {
      const MseTerms<A> d = mse_terms(s[k], t[k], m);
      sq += d.sq;
      chunk[k - k0] = grad_mse_element(d.gap, stashed_hard_exp<Squarings>(w.e_a, e_s, k), nc, m, gc, false);
    }
    if (c == chunk_y) {
      const A es_y = stashed_hard_exp<Squarings>(w.e_a, e_s, y);
      chunk[y - k0] = grad_mse_element(mse_terms(s[y], t[y], m).gap, es_y, nc, m, gc, true);
    }
    if (grad_row) write_grad_row(grad_row + k0, chunk, k1 - k0);
  }
  return mse_soft(sq, m);
}

// Squarings: 1 or 2 when exp(s - max s) is e_a squared once or twice (T = 2 or 4), else 0.
// A template parameter, so the exp loops and the gradient loop carry no run-time select of it
// (-3 to -14 % per row, NOTES.md entry 14); run_rows_for dispatches on the call's value.
template <class S, class Tt, class G, class A, int Squarings>
int64_t run_rows_typed(const RowsArgs& g, int64_t begin, int64_t end, A* scratch) {
  const Params& P = g.params;
  const int64_t C = g.n_cols;
  const int64_t n_chunks = row_chunks(C);
  const RowScratch<A> w = row_scratch(scratch, C);
  const A inv_t = static_cast<A>(P.inv_temperature);
  const A eps = static_cast<A>(P.smoothing);
  const GradCoefs<A> gc = grad_coefs(P, C, A(1));
  const bool need_hard = P.hard_coef != 0.0;
  const bool logit_mse = P.kind == KIND_LOGIT_MSE;
  const bool need_logit_sum = (need_hard && eps != A(0)) || logit_mse;
  const HardExp hx = hard_exp_mode(P);
  const bool separate = hx.separate;  // Squarings == hx.squarings (run_rows_for)
  const A* e_s = separate ? w.e_s_own : w.e_a;
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
    const A* s = acc_row(s_src, w.s_buf);
    const A* t = acc_row(t_src, w.t_buf);
    // Read before any gradient store: in-place mode writes the gradient over the student row.
    const A s_y = need_hard ? to_acc<A>(s_src[y]) : A(0);

    // Pass 2, chunk by chunk: maxima (which bring the chunk into L1), then exps relative to
    // them, stashed for the gradient, and the chunk's statistics (kd_math.h step 1). 3 exps
    // per element; 2 when the hard term reuses softmax(s/T) (T == 1), squares it (T == 2 or
    // 4), or there is none.
    for (int64_t c = 0; c < n_chunks; ++c) {
      const int64_t k0 = c * kRowChunk, k1 = chunk_end(c, C);
      // kl reads the logits only here: one reused L1 chunk; the others read them again.
      const int64_t slot = P.kind == KIND_KL ? 0 : k0;
      const A* sc = chunk_as_acc(s_src, w.s_buf + slot, k0, k1);
      const A* tc = chunk_as_acc(t_src, w.t_buf + slot, k0, k1);
      A cm_s = neg_inf<A>(), cm_t = neg_inf<A>();
#pragma omp simd reduction(max : cm_s, cm_t)
      for (int64_t k = k0; k < k1; ++k) {
        cm_s = kd_max(cm_s, sc[k - k0]);
        cm_t = kd_max(cm_t, tc[k - k0]);
      }
      A sum_s = A(0), sum_t = A(0);
      if (need_logit_sum) {
#pragma omp simd reduction(+ : sum_s)
        for (int64_t k = k0; k < k1; ++k) sum_s += sc[k - k0];
      }
      if (logit_mse) {
#pragma omp simd reduction(+ : sum_t)
        for (int64_t k = k0; k < k1; ++k) sum_t += tc[k - k0];
      }
      const Shifts<A> sh = shifts_of(cm_s, cm_t, inv_t);
      ChunkSums<A> sums{A(0), A(0), A(0), A(0)};
      // In blocks of kPrefetchBlock exps, each followed by its prefetches.
      auto exps = [&](auto kind_c, auto squarings_c, auto separate_c) {
        constexpr int32_t kKind = decltype(kind_c)::value;
        for (int64_t kb = k0; kb < k1; kb += kPrefetchBlock) {
          const int64_t kb1 = kb + kPrefetchBlock < k1 ? kb + kPrefetchBlock : k1;
          chunk_exps<kKind, decltype(squarings_c)::value, decltype(separate_c)::value>(
              sc, tc, k0, kb, kb1, inv_t, sh, w.e_a, w.e_b, w.e_s_own, sums);
          if (n_chunks > 1) {
            prefetch_logits<S, Tt, 1>(g, i, kb + kPrefetchAheadLong, kb1 + kPrefetchAheadLong);
          } else {
            prefetch_logits<S, Tt, 3>(g, i, kb + kPrefetchAheadShort, kb1 + kPrefetchAheadShort);
          }
        }
      };
      with_kind(P.kind, [&](auto kind_c) {
        if (Squarings > 0) {
          exps(kind_c, std::integral_constant<int, Squarings>{}, std::false_type{});
        } else if (separate) {
          exps(kind_c, std::integral_constant<int, 0>{}, std::true_type{});
        } else {
          exps(kind_c, std::integral_constant<int, 0>{}, std::false_type{});
        }
      });
      w.parts[c] = PartStats<A>{cm_s, cm_t, sums.z_a, sums.z_b, sums.z_s, sums.cross, sum_s, sum_t};
    }

    // The row's statistics from the chunks' (kd_math.h step 2); each chunk's scales are kept
    // for the gradient, which reads its exps as stashed.
    PartStats<A> row = empty_part<A>();
    for (int64_t c = 0; c < n_chunks; ++c) {
      row.max_s = nan_max(row.max_s, w.parts[c].max_s);
      row.max_t = nan_max(row.max_t, w.parts[c].max_t);
    }
    for (int64_t c = 0; c < n_chunks; ++c) {
      w.scales[c] = part_scales(w.parts[c].max_s, w.parts[c].max_t, row.max_s, row.max_t, inv_t, hx);
      add_scaled(row, w.parts[c], w.scales[c], P.kind);
    }
    const RowNorm<A> n = row_norm(inv_t, row.max_s, row.max_t, row.z_a, row.z_b, row.z_s);

    // The soft loss: kl and reverse_kl from the cross sum; jsd needs the finished normalizers
    // inside its log mixture, so a pass over the stashed row (its ratio replaces e_b);
    // logit_mse needs the row means, so its sum comes with the gradient below.
    A soft = A(0), row_kl = A(0);
    if (P.kind == KIND_KL || P.kind == KIND_REVERSE_KL) {
      soft = row_kl = soft_from_cross(P.kind, row.cross, row.z_a, row.z_b);
    } else if (P.kind == KIND_JSD) {
      const A log_beta = static_cast<A>(P.log_beta), log1m_beta = static_cast<A>(P.log1m_beta);
      A kl_pm = A(0), kl_qm = A(0);
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t k0 = c * kRowChunk, k1 = chunk_end(c, C);
        const RowNorm<A> nc = part_norm(n, w.scales[c]);
#pragma omp simd reduction(+ : kl_pm, kl_qm)
        for (int64_t k = k0; k < k1; ++k) {
          const JsdTerms<A> j = jsd_terms(s[k], t[k], w.e_a[k], w.e_b[k], nc, log_beta, log1m_beta);
          kl_pm += j.pm;
          kl_qm += j.qm;
          w.e_b[k] = j.ratio;
        }
      }
      soft = jsd_soft(kl_pm, kl_qm, static_cast<A>(P.beta));
      row_kl = kl_qm;
    }

    // The gradient from the stash only (so it is stored after every read of the student row,
    // which in-place mode overwrites), chunk by chunk into an L1 buffer (the label's element
    // put in place) and streamed out past the cache.
    if (logit_mse) {
      soft = logit_mse_pass<Squarings>(s, t, w, e_s, n, mse_row(row.sum_s, row.sum_t, C), gc, C,
                                       need_hard ? y : -1, grad_row);
    } else if (grad_row) {
      const int64_t chunk_y = need_hard ? y / kRowChunk : -1;
      alignas(64) A chunk[kRowChunk];
      for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t k0 = c * kRowChunk, k1 = chunk_end(c, C);
        const RowNorm<A> nc = part_norm(n, w.scales[c]);
        if (P.kind == KIND_KL) {
#pragma omp simd
          for (int64_t k = k0; k < k1; ++k) {
            const A es = stashed_hard_exp<Squarings>(w.e_a, e_s, k);
            chunk[k - k0] = grad_kl_element(w.e_a[k], w.e_b[k], es, nc, gc, false);
          }
        } else if (P.kind == KIND_REVERSE_KL) {
#pragma omp simd
          for (int64_t k = k0; k < k1; ++k) {
            const A es = stashed_hard_exp<Squarings>(w.e_a, e_s, k);
            chunk[k - k0] = grad_mode_seeking_element(w.e_a[k], reverse_kl_ratio(s[k], t[k], nc), row_kl,
                                                      es, nc, gc, false);
          }
        } else {
#pragma omp simd
          for (int64_t k = k0; k < k1; ++k) {
            const A es = stashed_hard_exp<Squarings>(w.e_a, e_s, k);
            chunk[k - k0] = grad_mode_seeking_element(w.e_a[k], w.e_b[k], row_kl, es,
                                                      nc, gc, false);
          }
        }
        if (c == chunk_y) {
          const A ratio_y = P.kind == KIND_REVERSE_KL ? reverse_kl_ratio(s[y], t[y], nc) : w.e_b[y];
          const A es_y = stashed_hard_exp<Squarings>(w.e_a, e_s, y);
          chunk[y - k0] = grad_element(P.kind, w.e_a[y], w.e_b[y], ratio_y, row_kl, es_y, nc, gc, true);
        }
        write_grad_row(grad_row + k0, chunk, k1 - k0);
      }
    }

    const A hard = need_hard ? hard_loss(s_y, row.sum_s, C, eps, n) : A(0);
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
  using F = float;
  using B = bf16_bits;
  using H = f16_bits;
  F* sf = static_cast<F*>(scratch);
  const bool lanes = g.n_cols <= g.lanes_max_cols;
  // The gradient's storage: grad_storage_t, the rule of kd_math.h (float16 students: float32).
#define KD_CASE(SD, TD, S, T)                                                          \
  if (g.student_dtype == SD && g.teacher_dtype == TD)                                  \
    return lanes ? run_rows_lanes<S, T, grad_storage_t<S>>(g, begin, end, sf)          \
                 : run_rows_for<S, T, grad_storage_t<S>, F>(g, begin, end, sf);
  KD_CASE(DT_F32, DT_F32, F, F)
  KD_CASE(DT_F32, DT_BF16, F, B)
  KD_CASE(DT_F32, DT_F16, F, H)
  KD_CASE(DT_BF16, DT_F32, B, F)
  KD_CASE(DT_BF16, DT_BF16, B, B)
  KD_CASE(DT_BF16, DT_F16, B, H)
  KD_CASE(DT_F16, DT_F32, H, F)
  KD_CASE(DT_F16, DT_BF16, H, B)
  KD_CASE(DT_F16, DT_F16, H, H)
#undef KD_CASE
  if (g.student_dtype == DT_F64 && g.teacher_dtype == DT_F64)
    return run_rows_for<double, double, double, double>(g, begin, end, static_cast<double*>(scratch));
  return -2;
}

}  // namespace KDFAST_ISA
}  // namespace cpu
}  // namespace kdfast
