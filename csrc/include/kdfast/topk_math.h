// Per-element math of the sparse-cache builder (kdfast::topk_targets), shared by the CPU rows
// (csrc/cpu/topk_rows.h) and the CUDA kernel: the one definition of the selection order and of
// the tail's log-sum-exp. The backends own only their loops and reductions;
// tests/test_shared_math.py checks that they write no exp, log or order rule of their own.
//
// One row z of C float32 logits (wider dtypes are read as float32), k ids, temperatures T_j:
//   1. Selection: the k + 1 largest (value, id) pairs in the order "larger value first, equal
//      values by smaller id" (a stable descending sort). A candidate is one 64-bit rank
//      (rank_of): larger rank = earlier, so the selection is an integer top-(k+1).
//   2. kth = the k-th value, tail_max = the (k+1)-th: the largest element outside the top k.
//   3. Tail sum at each T_j: every element below kth contributes exp((z - tail_max) / T_j)
//      (tail_term); elements equal to kth that were not selected are counted, each exp(0) = 1
//      (they exist only when tail_max == kth). The largest term is 1: no overflow, no underflow
//      of the sum, and no Z - sum_K cancellation.
//   4. tail_logsumexp = tail_max / T_j + log(sum); -inf when the tail is empty or all -inf.
#pragma once

#include <math.h>
#include <stdint.h>

#include "kdfast/kd_math.h"

namespace kdfast {
namespace topk {

// A float's position in a total order, as an unsigned key: larger float -> larger key, -0.0
// and +0.0 equal (-0.0 + 0.0 is +0.0), NaN above +inf (or below -inf when negative). A total
// order even for the NaN rows the checks refuse, so a sort of ranks stays well-defined.
KD_HD uint32_t order_key(float z) {
  const uint32_t b = math::float_to_bits(z + 0.0f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
KD_HD float key_value(uint32_t key) {
  return math::bits_to_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// One candidate (value, id) as a single integer: a larger rank comes first in the result
// (larger value; equal values: smaller id). ids are < 2^32 - 1 (the op checks C).
KD_HD uint64_t rank_of(float z, uint32_t id) {
  return (static_cast<uint64_t>(order_key(z)) << 32) | static_cast<uint64_t>(0xffffffffu - id);
}
KD_HD uint32_t rank_id(uint64_t rank) { return 0xffffffffu - static_cast<uint32_t>(rank); }
KD_HD float rank_value(uint64_t rank) { return key_value(static_cast<uint32_t>(rank >> 32)); }

// Whether an element can still enter a top list whose last kept value is `threshold`: every
// later element has a larger id, so it must be strictly larger (an equal one loses the tie).
KD_HD bool beats_threshold(float z, float threshold) { return z > threshold; }

// NaN or +inf: a row the sparse target of which is undefined (the op reports it).
KD_HD bool invalid_logit(float z) { return !(z < static_cast<float>(INFINITY)); }

// The tail's term of one element at inv_t = 1/T: exp((z - tail_max) / T) for z below the k-th
// value (z <= tail_max there, so the argument is <= 0); 0 for the others (the selected ones,
// and the unselected ties at kth, which tail_sum_with_ties counts).
KD_HD float tail_term(float z, float kth, float tail_max, float inv_t) {
  const float x = z < kth ? (z - tail_max) * inv_t : -static_cast<float>(INFINITY);
  return math::exp_nonpos(x);
}

// Whether the tail has a term at all: k < C and its largest element is not -inf (then every
// term is exp(-inf) = 0 and the log-sum-exp is -inf; skipping it avoids -inf - -inf = NaN).
KD_HD bool tail_is_empty(bool has_tail, float tail_max) {
  return !has_tail || tail_max == -static_cast<float>(INFINITY);
}

// The sum of tail_term over the row plus the unselected ties at kth, each exp(0) = 1.
KD_HD double tail_sum_with_ties(double term_sum, int64_t ties_in_row, int64_t ties_selected) {
  return term_sum + static_cast<double>(ties_in_row - ties_selected);
}

// log sum_{tail} exp(z / T) from the shifted sum (>= 1: the tail maximum's own term).
KD_HD float tail_logsumexp(bool empty, float tail_max, double temperature, double sum) {
  if (empty) return -static_cast<float>(INFINITY);
  return static_cast<float>(static_cast<double>(tail_max) / temperature + log(sum));
}

}  // namespace topk
}  // namespace kdfast
