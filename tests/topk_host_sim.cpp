// Host simulation of the CUDA builder rows (csrc/cuda/topk_rows.cuh), run by the default test
// suite (tests/test_topk_host_sim.py): one std::thread per simulated GPU thread, a std::barrier
// per block and per warp, and the outputs compared with the CPU rows (csrc/cpu/topk_rows.h,
// baseline build): ids and values exactly, tails to 1e-5 relative (different summation order).
// Random configurations: C from 1 to 20,000, k from 1 to min(C, 2047), random / integer (ties)
// / partly -inf rows, float32 / bfloat16 / float16, blocks of 32..256 threads, 1..3 temperatures.
//
// What it cannot check: the launch configuration, the memory model of global memory, timing.
//
// Usage: topk_host_sim [random cases] [seed]
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "../csrc/cuda/topk_rows.cuh"
#include "kdfast/topk_rows_api.h"

using namespace kdfast;
using namespace kdfast::cuda::topk_rows;

namespace {

constexpr int kWarp = 32;

struct SimShared {
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<double> exchange;     // one shuffle slot per thread
  std::vector<unsigned> votes;      // one ballot slot per thread
  explicit SimShared(int width) : block(width), exchange(width), votes(width) {
    for (int w = 0; w < width / kWarp; ++w) warps.emplace_back(new std::barrier<>(kWarp));
  }
};

struct SimGroup {
  int r, width;
  SimShared* sh;
  int rank() const { return r; }
  int size() const { return width; }
  void barrier() const { sh->block.arrive_and_wait(); }
  unsigned ballot(bool pred) const {
    std::barrier<>& warp = *sh->warps[r / kWarp];
    sh->votes[r] = pred ? 1u : 0u;
    warp.arrive_and_wait();
    unsigned bits = 0;
    const int base = r / kWarp * kWarp;
    for (int l = 0; l < kWarp; ++l) bits |= sh->votes[base + l] << l;
    warp.arrive_and_wait();
    return bits;
  }
  template <class V> V shfl_xor(V v, int offset) const {
    std::barrier<>& warp = *sh->warps[r / kWarp];
    double slot = 0.0;
    std::memcpy(&slot, &v, sizeof(V));
    sh->exchange[r] = slot;
    warp.arrive_and_wait();
    V out;
    std::memcpy(&out, &sh->exchange[r ^ offset], sizeof(V));
    warp.arrive_and_wait();
    return out;
  }
  template <class V> V atomic_add(V* p, V v) const { return std::atomic_ref<V>(*p).fetch_add(v); }
};

template <class S> void run_block(const TopkKernelArgs& a, int width) {
  SimShared sh(width);
  auto shared = std::make_unique<Shared>();
  std::vector<std::thread> threads;
  for (int r = 0; r < width; ++r) {
    threads.emplace_back([&, r] {
      const SimGroup g{r, width, &sh};
      for (int64_t i = 0; i < a.n_rows; ++i) topk_row<SimGroup, S>(g, a, i, *shared);
    });
  }
  for (auto& t : threads) t.join();
}

uint16_t to_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// One configuration; returns the number of mismatches (printed).
int run_case(std::mt19937& rng, int case_id) {
  const int64_t sizes[] = {1, 2, 31, 63, 300, 1000, 2049, 4097, 20000};
  const int64_t C = sizes[rng() % 9];
  const int64_t max_k = std::min<int64_t>(C, 2047);
  const int64_t ks[] = {1, 2, std::min<int64_t>(64, max_k), max_k, std::max<int64_t>(1, max_k - 1),
                        1 + static_cast<int64_t>(rng() % max_k)};
  const int64_t k = std::min(ks[rng() % 6], max_k);
  const int64_t N = 1 + rng() % 3;
  const int mode = rng() % 3, dtype = rng() % 2, width = 32 << (rng() % 4);
  const int n_temps = 1 + rng() % 3;
  const double temps[3] = {1.0, 2.5, 0.3};
  if (std::getenv("TOPK_SIM_VERBOSE")) {
    std::printf("case %d: N=%ld C=%ld k=%ld mode=%d dtype=%d width=%d temps=%d\n", case_id, (long)N, (long)C,
                (long)k, mode, dtype, width, n_temps);
    std::fflush(stdout);
  }
  std::normal_distribution<float> normal(0.0f, 4.0f);
  std::vector<float> z(N * C);
  for (auto& v : z) v = mode == 1 ? static_cast<float>(static_cast<int>(rng() % 7) - 3) : normal(rng);
  if (mode == 2) {
    for (auto& v : z) if (rng() % 3 == 0) v = -INFINITY;
  }
  std::vector<uint16_t> zb(N * C);
  for (int64_t j = 0; j < N * C; ++j) {
    zb[j] = to_bf16(z[j]);
    if (dtype == 1) {
      uint32_t u = static_cast<uint32_t>(zb[j]) << 16;
      std::memcpy(&z[j], &u, 4);  // the CPU rows read the same bf16 values widened
    }
  }
  std::vector<int64_t> ids_gpu(N * k), ids_cpu(N * k);
  std::vector<float> vals_gpu(N * k), vals_cpu(N * k), tails_gpu(N * n_temps), tails_cpu(N * n_temps);

  TopkKernelArgs a{};
  a.logits = dtype == 1 ? static_cast<const void*>(zb.data()) : static_cast<const void*>(z.data());
  a.row_stride = C;
  a.n_rows = N;
  a.n_cols = C;
  a.k = k;
  a.n_temps = n_temps;
  for (int t = 0; t < n_temps; ++t) {
    a.temperature[t] = temps[t];
    a.inv_t[t] = static_cast<float>(1.0 / temps[t]);
  }
  a.indices = ids_gpu.data();
  a.values = vals_gpu.data();
  a.tails = tails_gpu.data();
  if (dtype == 1) {
    run_block<bf16_bits>(a, width);
  } else {
    run_block<float>(a, width);
  }

  cpu::TopkArgs c{};
  c.logits = z.data();
  c.row_stride = C;
  c.dtype = cpu::DT_F32;
  c.n_rows = N;
  c.n_cols = C;
  c.k = k;
  c.temperatures = temps;
  c.n_temps = n_temps;
  c.indices = ids_cpu.data();
  c.values = vals_cpu.data();
  c.tails = tails_cpu.data();
  std::vector<char> scratch(cpu::topk_scratch_bytes(C, k, n_temps));
  cpu::baseline::run_topk_rows(c, 0, N, scratch.data());

  int bad = 0;
  for (int64_t j = 0; j < N * k; ++j) {
    if (ids_gpu[j] != ids_cpu[j] || !(vals_gpu[j] == vals_cpu[j] || (std::isnan(vals_gpu[j]) && std::isnan(vals_cpu[j])))) {
      if (bad++ < 3) std::printf("case %d (C=%ld k=%ld mode=%d dtype=%d width=%d): slot %ld id %ld vs %ld\n", case_id,
                                 (long)C, (long)k, mode, dtype, width, (long)j, (long)ids_gpu[j], (long)ids_cpu[j]);
    }
  }
  for (int64_t j = 0; j < N * n_temps; ++j) {
    const double g = tails_gpu[j], r = tails_cpu[j];
    if (!(g == r || std::fabs(g - r) <= 1e-6 + 1e-5 * std::fabs(r))) {
      if (bad++ < 3) std::printf("case %d (C=%ld k=%ld mode=%d width=%d): tail %ld %.9g vs %.9g\n", case_id, (long)C,
                                 (long)k, mode, width, (long)j, g, r);
    }
  }
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 60;
  std::mt19937 rng(argc > 2 ? std::atoi(argv[2]) : 1);
  int failed = 0;
  for (int c = 0; c < cases; ++c) failed += run_case(rng, c) != 0;
  std::printf("topk host simulation: %d cases, %d failed\n", cases, failed);
  return failed != 0;
}
