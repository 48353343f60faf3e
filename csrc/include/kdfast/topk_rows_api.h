// The interface between the torch-facing CPU op (csrc/cpu/topk_targets.cpp) and its row loops
// (csrc/cpu/topk_rows.h), compiled once per instruction set (csrc/cpu/isa/topk_*.cpp). Plain
// C++: no torch types.
#pragma once

#include <stdint.h>

#include "kdfast/cpu_rows_api.h"

namespace kdfast {
namespace cpu {

struct TopkArgs {
  const void* logits;           // (N, C), unit stride along C; dtype: DT_F32 / DT_BF16 / DT_F16
  int64_t row_stride;           // in elements
  int32_t dtype;
  int64_t n_rows, n_cols, k;    // 1 <= k <= C < 2^32 - 1
  const double* temperatures;   // n_temps values > 0
  int64_t n_temps;
  int64_t* indices;             // (N, k) contiguous
  float* values;                // (N, k) contiguous
  float* tails;                 // (N, n_temps) contiguous
  // When set, pass 2 of row i prefetches row i + 1 into L2 while its exps run (NOTES.md 18).
  int32_t prefetch_next_row;
};

// Candidates of the selection buffer: the k + 1 kept plus room for newcomers between two
// compactions (at least as many again, so a compaction is amortized over >= k + 1 entries).
inline int64_t topk_capacity(int64_t n_cols, int64_t k) {
  const int64_t keep = k + 1 < n_cols ? k + 1 : n_cols;
  return keep + (keep > 256 ? keep : 256);
}
// Bytes of scratch one thread needs: the candidate buffer (uint64 ranks), one widened row
// (float), a double sum and a float 1/T per temperature, and room to align each to 64 bytes.
inline int64_t topk_scratch_bytes(int64_t n_cols, int64_t k, int64_t n_temps) {
  return topk_capacity(n_cols, k) * 8 + n_cols * 4 + n_temps * 12 + 4 * 64;
}

// Processes rows [begin, end). Returns -1, or the first row there with a NaN or +inf entry
// (its outputs are then unspecified but written in bounds), or -2 for an unsupported dtype.
#define KDFAST_DECLARE_TOPK_ISA(ns) \
  namespace ns {                    \
  int64_t run_topk_rows(const TopkArgs& args, int64_t begin, int64_t end, void* scratch); \
  }
KDFAST_DECLARE_TOPK_ISA(baseline)
KDFAST_DECLARE_TOPK_ISA(avx2)
KDFAST_DECLARE_TOPK_ISA(avx512)
#undef KDFAST_DECLARE_TOPK_ISA

}  // namespace cpu
}  // namespace kdfast
