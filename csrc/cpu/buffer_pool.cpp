#include "buffer_pool.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdfast {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kPoolMinBytes = size_t(4) << 20;
// At most this many free blocks are kept (a training step needs one or two gradient buffers;
// more would only hold memory for shapes that no longer occur).
constexpr size_t kMaxCachedBlocks = 2;

struct Block {
  void* ptr;
  size_t bytes;
};

struct Pool {
  std::mutex mutex;
  std::deque<Block> free_blocks;  // most recently freed last
  PoolStats stats;
};

// Never destroyed: a tensor freed during interpreter shutdown may still return its block.
Pool& pool() {
  static Pool* instance = new Pool();
  return *instance;
}

// KDFAST_CPU_BUFFER_POOL=0 turns the pool off (every buffer is mapped fresh and unmapped on
// free); read per call so tests can compare both.
bool pool_enabled() {
  const char* env = std::getenv("KDFAST_CPU_BUFFER_POOL");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "1") == 0) return true;
  TORCH_CHECK_VALUE(std::strcmp(env, "0") == 0, "KDFAST_CPU_BUFFER_POOL must be 0 or 1, got '", env, "'");
  return false;
}

void* map_block(size_t bytes) {
  void* ptr = std::aligned_alloc(kHugePage, bytes);
  if (ptr == nullptr) {
    release_pooled_buffers();  // cached blocks may be what is missing
    ptr = std::aligned_alloc(kHugePage, bytes);
  }
  TORCH_CHECK(ptr != nullptr, "kdfast: out of memory allocating a ", bytes, "-byte CPU buffer");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(ptr, bytes, MADV_HUGEPAGE);  // advice only: without THP the pages stay 4 KiB
#endif
  return ptr;
}

void return_block(Block block) {
  Pool& p = pool();
  std::deque<Block> evicted;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    p.free_blocks.push_back(block);
    p.stats.cached_bytes += static_cast<int64_t>(block.bytes);
    while (p.free_blocks.size() > kMaxCachedBlocks) {
      evicted.push_back(p.free_blocks.front());
      p.stats.cached_bytes -= static_cast<int64_t>(p.free_blocks.front().bytes);
      p.free_blocks.pop_front();
    }
    p.stats.cached_blocks = static_cast<int64_t>(p.free_blocks.size());
  }
  for (const Block& b : evicted) std::free(b.ptr);
}

// A cached block of exactly this rounded size (the same shape as a recent step), or nullptr.
void* take_block(size_t bytes) {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  for (auto it = p.free_blocks.rbegin(); it != p.free_blocks.rend(); ++it) {
    if (it->bytes != bytes) continue;
    void* ptr = it->ptr;
    p.free_blocks.erase(std::next(it).base());
    p.stats.cached_bytes -= static_cast<int64_t>(bytes);
    p.stats.cached_blocks = static_cast<int64_t>(p.free_blocks.size());
    ++p.stats.hits;
    return ptr;
  }
  ++p.stats.misses;
  return nullptr;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (nbytes < kPoolMinBytes || !pool_enabled()) return at::empty(sizes, options);
  const size_t bytes = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
  void* ptr = take_block(bytes);
  if (ptr == nullptr) ptr = map_block(bytes);
  return at::from_blob(
      ptr, sizes, [bytes](void* data) { return_block(Block{data, bytes}); }, options);
}

PoolStats pool_stats() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  return p.stats;
}

void release_pooled_buffers() {
  Pool& p = pool();
  std::deque<Block> blocks;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    blocks.swap(p.free_blocks);
    p.stats.cached_bytes = 0;
    p.stats.cached_blocks = 0;
  }
  for (const Block& b : blocks) std::free(b.ptr);
}

}  // namespace cpu
}  // namespace kdfast
