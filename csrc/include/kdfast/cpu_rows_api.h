// The interface between the torch-facing CPU op (csrc/cpu/distill.cpp) and the row loops,
// which are compiled once per instruction set (csrc/cpu/isa/). Plain C++: no torch types.
#pragma once

#include <stdint.h>

#include "kdfast/kd_math.h"

namespace kdfast {
namespace cpu {

enum DType : int32_t { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2, DT_F64 = 3 };

struct RowsArgs {
  const void* student;         // (N, C), unit stride along C
  int64_t student_row_stride;  // in elements
  const void* teacher;
  int64_t teacher_row_stride;
  const int64_t* target;       // (N,) or nullptr when params.has_target == 0
  int64_t target_stride;
  void* loss_rows;             // (N,) of the accumulation type: float, or double for DT_F64
  void* grad;                  // (N, C) or nullptr to skip the gradient; dtype: see run_rows
  int64_t grad_row_stride;
  int64_t n_rows, n_cols;
  int32_t student_dtype, teacher_dtype;
  math::Params params;
  // Rows with at most this many classes run one row per SIMD lane (csrc/cpu/lanes.h);
  // float accumulation only (float64 rows always take the row loops).
  int64_t lanes_max_cols;
};

// Rows per block of the one-row-per-lane loops: a 512-bit vector of floats.
constexpr int kLanes = 16;
// Default lanes_max_cols: below 64 classes the row loops spend most of their time in scalar
// remainders and per-row setup; from 64 on they win (benchmarks/NOTES.md, entry 4).
constexpr int64_t kLanesMaxCols = 63;

// Elements per chunk of the row loops: a chunk of student and teacher logits stays in L1
// between its maxima and its exps, and its gradient is buffered in L1 before being streamed.
constexpr int64_t kRowChunk = 1024;
inline int64_t row_chunks(int64_t n_cols) { return (n_cols + kRowChunk - 1) / kRowChunk; }

// Values of one chunk's records in the row loops' scratch: its PartStats and its Scales.
constexpr int64_t kPartStatsElems = sizeof(math::PartStats<float>) / sizeof(float);
constexpr int64_t kScalesElems = sizeof(math::Scales<float>) / sizeof(float);

// Elements of scratch (of the accumulation type) one thread needs for rows of n_cols: 5 rows
// plus both records per chunk for the row loops, 5 rows per lane for the lane loops.
inline int64_t scratch_elems(int64_t n_cols, int64_t lanes_max_cols) {
  if (n_cols <= lanes_max_cols) return 5 * n_cols * kLanes;
  return 5 * n_cols + (kPartStatsElems + kScalesElems) * row_chunks(n_cols);
}

// The sparse op's rows (csrc/cpu/sparse_rows.h). Each row's valid teacher ids come sorted,
// packed as (id << 32) | slot (sparse_key), from the op's validation pass, which also
// rejected ids out of range and duplicates: the rows trust them.
struct SparseRowsArgs {
  const void* student;           // (N, C), unit stride along C
  int64_t student_row_stride;    // in elements
  const int64_t* keys;           // (N, k): row i's n_valid[i] valid ids, sorted, then unused
  const int32_t* n_valid;        // (N,)
  int64_t k;
  const void* teacher_logits;    // (N, k) contiguous, of the accumulation type (slot-indexed)
  const void* tail;              // (N,) of the accumulation type, or nullptr (P_R = 0)
  const int64_t* target;         // (N,) or nullptr when params.has_target == 0
  int64_t target_stride;
  void* loss_rows;               // (N,) of the accumulation type
  void* grad;                    // (N, C) or nullptr; dtype grad_storage_t of the student's
  int64_t grad_row_stride;
  int64_t n_rows, n_cols;
  int32_t student_dtype;         // DT_F64 means float64 accumulation (the op widens the rest)
  math::Params params;
  double inv_teacher_temperature;
};
constexpr int64_t sparse_key(int64_t id, int64_t slot) { return (id << 32) | slot; }
constexpr int64_t sparse_key_id(int64_t key) { return key >> 32; }
constexpr int64_t sparse_key_slot(int64_t key) { return key & 0xffffffffLL; }
// The sparse rows' stash of one row's exps: n_cols elements, rounded up to whole cache lines
// of floats so a second stash after it starts aligned.
inline int64_t sparse_stash_row_elems(int64_t n_cols) { return (n_cols + 15) / 16 * 16; }
// Elements of scratch (of the accumulation type) one thread needs for the sparse rows: two
// stashed rows (the second only when softmax(s) has exps of its own), one maximum per chunk,
// and 3 k for K's gathered logits, weights and q_i.
inline int64_t sparse_scratch_elems(int64_t n_cols, int64_t k) {
  return 2 * sparse_stash_row_elems(n_cols) + row_chunks(n_cols) + 3 * k;
}

// Processes rows [begin, end). Returns -1 on success, the index of the first row whose target
// is outside [0, C) and not ignore_index, or -2 for an unsupported dtype pair (float64 must be
// paired with float64).
// exp_probe: reps passes of the row loops' exp over n in-cache floats (buf is overwritten);
// `kdfast bench` times it as the machine's vectorized exp rate for the roofline.
#define KDFAST_DECLARE_ISA(ns)                                                                \
  namespace ns {                                                                               \
  int64_t run_rows(const RowsArgs& args, int64_t begin, int64_t end, void* scratch);          \
  float exp_probe(float* buf, int64_t n, int64_t reps);                                        \
  int64_t run_sparse_rows(const SparseRowsArgs& args, int64_t begin, int64_t end, void* scratch); \
  }
KDFAST_DECLARE_ISA(baseline)
KDFAST_DECLARE_ISA(avx2)
KDFAST_DECLARE_ISA(avx512)
#undef KDFAST_DECLARE_ISA

}  // namespace cpu
}  // namespace kdfast
