// Reuse of large CPU output buffers (the N x C gradients) across calls.
//
// A fresh 131 MB buffer costs the kernel zeroing every page on first touch (6 ms of a 18 ms
// step at (1024, 32000) float32, 30 ms without huge pages) because glibc returns blocks this
// large to the OS on free. The gradient buffer is handed to autograd as `.grad` and freed when
// the optimizer zeroes gradients, just before the next step needs one of the same size: the
// pool keeps the freed block and hands it out again, already mapped.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace kdfast {
namespace cpu {

// An uninitialized CPU tensor. Blocks of at least kPoolMinBytes come from the pool (2 MiB
// aligned, huge pages requested); smaller ones from at::empty.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

struct PoolStats {
  int64_t cached_blocks = 0;
  int64_t cached_bytes = 0;
  int64_t hits = 0;    // allocations served from the pool
  int64_t misses = 0;  // allocations that mapped new memory
};
PoolStats pool_stats();

// Returns every cached block to the OS (buffers in use are unaffected).
void release_pooled_buffers();

}  // namespace cpu
}  // namespace kdfast
