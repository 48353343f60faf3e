// Host simulation of the CUDA row kernels, run by the default test suite
// (tests/test_cuda_host_sim.py), so a machine without a GPU checks what the GPU would compute.
//
// Runs csrc/cuda/distill_rows.cuh (the per-row passes and the group reductions the CUDA
// kernels run, compiled here as host C++) with one std::thread per simulated GPU thread, and
// compares loss and gradient with the CPU rows (csrc/cpu/rows.h, baseline build) over random
// configurations: every dtype pair, C from 1 to 131,072, sub-warp groups of 4..32 lanes and
// block groups of 64..1024 threads, the four kinds (logit_mse at T = 1 only), T in {1, 2, 4,
// 3.7, 20}, alpha in {0, 0.5, 1}, targets with ignored rows, label smoothing, no/out-of-place/in-place gradient, contiguous
// and misaligned rows (vector head/body/tail and the scalar fallback), -inf teacher entries,
// +-inf and NaN inputs.
//
// The simulated group models what the GPU guarantees and nothing more: a shuffle exchanges
// values within a warp only (the lanes wait for each other, as __shfl_xor_sync does); shared
// memory is checked for races: a value read in the same barrier interval as another thread
// wrote it, or overwritten in the interval another thread read it, is reported, whatever the
// host threads' timing. So a removed __syncthreads (barrier()) fails deterministically
// (tests/test_cuda_host_sim.py removes it and expects the failure).
//
// What it cannot check: the shuffle masks' bits, the launch configuration, vector loads on the
// device and the memory model of global memory; those need a GPU (tests/test_cuda.py).
//
// Usage: cuda_host_sim [random cases] [seed]
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

static std::atomic<int> g_assert_hits{0};
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) \
  do {                                    \
    if (!(cond)) ++g_assert_hits;         \
  } while (0)

#include "../csrc/cuda/distill_rows.cuh"
#include "kdfast/cpu_rows_api.h"
#include "host_sim_common.h"

using namespace kdfast;
using namespace kdfast::host_sim;
using math::bf16_bits;
using math::f16_bits;

namespace {

constexpr int kWarp = 32;

// One shared-memory value and what the race check needs to know of its last accesses.
struct SmemCell {
  double value = 0.0;
  int writer = -1;
  long write_epoch = -1;
  long read_epoch = -1;
  int readers = 0;  // in read_epoch
  int reader = -1;  // the one reader, when readers == 1
};

// What the threads of one simulated group share.
struct Shared {
  int width, lanes;
  std::barrier<> group_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<double> exchange;  // one shuffle slot per thread
  std::mutex smem_mutex;
  std::vector<SmemCell> smem;
  std::atomic<int> races{0};
  std::string first_race;
  Shared(int w, int l) : width(w), lanes(l), group_barrier(w), exchange(w), smem(cuda::rows::kSmemValues) {
    for (int i = 0; i < w / l; ++i) warp_barriers.emplace_back(new std::barrier<>(l));
  }
  void race(const std::string& what) {
    if (races++ == 0) first_race = what;
  }
};

// The group interface of distill_rows.cuh on host threads. `epoch` counts this thread's
// barriers: two accesses by different threads are ordered only when a barrier lies between.
template <class A>
struct SimGroup {
  int rank, width, lanes;
  Shared* sh;
  long* epoch;

  A shfl_xor(A v, int offset) const {
    const int partner = rank ^ offset;
    if (offset >= lanes || partner / lanes != rank / lanes) sh->race("shuffle outside the warp");
    std::barrier<>& warp = *sh->warp_barriers[rank / lanes];
    double slot = 0.0;
    std::memcpy(&slot, &v, sizeof(A));
    sh->exchange[rank] = slot;
    warp.arrive_and_wait();
    A out;
    std::memcpy(&out, &sh->exchange[partner], sizeof(A));
    warp.arrive_and_wait();
    return out;
  }
  void barrier() const {
    sh->group_barrier.arrive_and_wait();
    ++*epoch;
  }
  void smem_store(int i, A v) const {
    std::lock_guard<std::mutex> lock(sh->smem_mutex);
    SmemCell& c = sh->smem.at(i);
    if (c.write_epoch == *epoch && c.writer != rank) sh->race("two writes without a barrier at " + std::to_string(i));
    if (c.read_epoch == *epoch && (c.readers > 1 || c.reader != rank)) {
      sh->race("write after another thread's read without a barrier at " + std::to_string(i));
    }
    std::memcpy(&c.value, &v, sizeof(A));
    c.writer = rank;
    c.write_epoch = *epoch;
  }
  A smem_load(int i) const {
    std::lock_guard<std::mutex> lock(sh->smem_mutex);
    SmemCell& c = sh->smem.at(i);
    if (c.write_epoch < 0) sh->race("read of unwritten shared memory at " + std::to_string(i));
    if (c.write_epoch == *epoch && c.writer != rank) {
      sh->race("read of another thread's write without a barrier at " + std::to_string(i));
    }
    if (c.read_epoch != *epoch) c.read_epoch = *epoch, c.readers = 0;
    ++c.readers;
    c.reader = rank;
    A out;
    std::memcpy(&out, &c.value, sizeof(A));
    return out;
  }
  // Sub-warp groups: __syncwarp. Block groups: nothing (their reduction has the barrier).
  void sync() const {
    if (width <= lanes) sh->warp_barriers[rank / lanes]->arrive_and_wait();
  }
};

// Runs `body(unit, group, parity)` for units [0, n_units) with one group of `width` host threads
// (a grid-stride loop with one group), as one kernel launch does. Returns the races found.
template <class A, class Body>
int simulate_launch(int64_t n_units, int width, std::string* race, Body body) {
  const int lanes = width < kWarp ? width : kWarp;
  Shared shared(width, lanes);
  std::vector<std::thread> threads;
  for (int r = 0; r < width; ++r) {
    threads.emplace_back([&, r] {
      long epoch = 0;
      const SimGroup<A> grp{r, width, lanes, &shared, &epoch};
      int parity = 0;
      for (int64_t unit = 0; unit < n_units; ++unit) body(unit, grp, parity);
    });
  }
  for (auto& th : threads) th.join();
  if (shared.races.load() != 0 && race != nullptr && race->empty()) *race = shared.first_race;
  return shared.races.load();
}

// The kernels of one call: process_row per row, or (ka.splits > 1) the three stages of rows
// split across groups, each a launch of its own.
template <class S, class T, class Gd, class A, int V>
int simulate_rows(const cuda::KernelArgs& ka, int width, std::string* race) {
  using cuda::rows::process_row;
  if (ka.splits <= 1) {
    return simulate_launch<A>(ka.n_rows, width, race, [&](int64_t row, const auto& grp, int& parity) {
      process_row<S, T, Gd, A, V>(ka, row, grp, parity);
    });
  }
  const int64_t units = ka.n_rows * ka.splits;
  int races = simulate_launch<A>(units, width, race, [&](int64_t unit, const auto& grp, int& parity) {
    cuda::rows::split_stats<S, T, Gd, A, V>(ka, unit, grp, parity);
  });
  if (ka.params.kind == math::KIND_JSD || ka.params.kind == math::KIND_LOGIT_MSE) {
    races += simulate_launch<A>(units, width, race, [&](int64_t unit, const auto& grp, int& parity) {
      cuda::rows::split_soft<S, T, Gd, A, V>(ka, unit, grp, parity);
    });
  }
  races += simulate_launch<A>(units, width, race, [&](int64_t unit, const auto& grp, int&) {
    cuda::rows::split_finish<S, T, Gd, A, V>(ka, unit, grp);
  });
  return races;
}

struct Config {
  int n_rows, n_cols, width;
  int split_cols;  // 0: one group per row; else the rows are split into segments of this many
  int kind;
  bool has_target, ignored_rows, nan_input, masked_teacher, inf_input;
  double temperature, alpha, beta, smoothing;
  bool scale_by_t2;
  int grad_mode;  // 0 none, 1 out of place, 2 in place
  int off_s, off_t, off_g;  // element offsets of the first row
  int pad_s, pad_t, pad_g;  // row stride - C
  int bad_target_row;       // -1: none
  uint64_t seed;
};

std::string describe(const Config& c) {
  char b[512];
  std::snprintf(b, sizeof b,
                "N=%d C=%d split=%d width=%d kind=%d target=%d ignored=%d nan=%d inf=%d masked=%d T=%g alpha=%g beta=%g "
                "eps=%g t2=%d grad=%d off=(%d,%d,%d) pad=(%d,%d,%d) bad=%d seed=%llu",
                c.n_rows, c.n_cols, c.split_cols, c.width, c.kind, c.has_target, c.ignored_rows, c.nan_input, c.inf_input,
                c.masked_teacher, c.temperature, c.alpha, c.beta, c.smoothing, c.scale_by_t2,
                c.grad_mode, c.off_s, c.off_t, c.off_g, c.pad_s, c.pad_t, c.pad_g, c.bad_target_row,
                static_cast<unsigned long long>(c.seed));
  return b;
}

int g_failures = 0;

template <class S, class T, class Gd, class A>
void run_case(const Config& c) {
  constexpr int V = 16 / static_cast<int>(sizeof(S) > sizeof(T) ? sizeof(S) : sizeof(T));
  const int N = c.n_rows, C = c.n_cols;
  const int64_t rs = C + c.pad_s, rt = C + c.pad_t, rg = C + c.pad_g;
  std::mt19937_64 rng(c.seed);
  std::normal_distribution<double> normal(0.0, 3.0);
  std::uniform_real_distribution<double> unif(0.0, 1.0);

  // 64-byte aligned buffers; offsets then set each row's (mis)alignment.
  auto alloc = [](size_t bytes) { return std::vector<double>(bytes / sizeof(double) + 16); };
  auto aligned = [](std::vector<double>& v) {
    return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
  };
  auto s_buf = alloc((c.off_s + N * rs + 8) * sizeof(S));
  auto s_buf2 = alloc((c.off_s + N * rs + 8) * sizeof(S));
  auto t_buf = alloc((c.off_t + N * rt + 8) * sizeof(T));
  S* s = reinterpret_cast<S*>(aligned(s_buf)) + c.off_s;
  S* s2 = reinterpret_cast<S*>(aligned(s_buf2)) + c.off_s;
  T* t = reinterpret_cast<T*>(aligned(t_buf)) + c.off_t;
  for (int i = 0; i < N; ++i) {
    for (int k = 0; k < C; ++k) {
      double sv = std::fmax(-20.0, std::fmin(20.0, normal(rng)));
      double tv = std::fmax(-20.0, std::fmin(20.0, normal(rng)));
      if (c.masked_teacher && unif(rng) < 0.2) tv = -INFINITY;
      if (c.nan_input && i == 1 && k == C / 2) (unif(rng) < 0.5 ? sv : tv) = NAN;
      if (c.inf_input && i == 0 && k == C / 3) (unif(rng) < 0.5 ? sv : tv) = unif(rng) < 0.5 ? INFINITY : -INFINITY;
      s[i * rs + k] = from_double<S>(sv);
      t[i * rt + k] = from_double<T>(tv);
    }
  }
  std::memcpy(s2 - c.off_s, s - c.off_s, (c.off_s + N * rs + 8) * sizeof(S));
  std::vector<int64_t> target(N);
  for (int i = 0; i < N; ++i) {
    target[i] = static_cast<int64_t>(unif(rng) * C) % C;
    if (c.ignored_rows && unif(rng) < 0.3) target[i] = -100;
  }
  if (c.bad_target_row >= 0) target[c.bad_target_row] = C + 3;

  const math::Params P = math::make_params(c.kind, c.has_target, -100, c.temperature, c.alpha, c.beta,
                                           c.smoothing, c.scale_by_t2);

  // Gradient buffers: the CPU's and the simulation's (in place: the student copies themselves).
  auto g_buf = alloc((c.off_g + N * rg + 8) * sizeof(Gd));
  auto g_buf2 = alloc((c.off_g + N * rg + 8) * sizeof(Gd));
  Gd* g_cpu = nullptr;
  Gd* g_sim = nullptr;
  int64_t g_stride = 0;
  if (c.grad_mode == 1) {
    g_cpu = reinterpret_cast<Gd*>(aligned(g_buf)) + c.off_g;
    g_sim = reinterpret_cast<Gd*>(aligned(g_buf2)) + c.off_g;
    g_stride = rg;
  } else if (c.grad_mode == 2) {
    if constexpr (std::is_same_v<S, Gd>) {
      g_cpu = s;   // CPU in place on s, simulation in place on s2
      g_sim = s2;
      g_stride = rs;
    }
  }

  // CPU reference (baseline ISA: the row loops, or one row per lane for small C).
  std::vector<A> loss_cpu(N, A(-7)), loss_sim(N, A(-7));
  cpu::RowsArgs ra{};
  ra.student = s;
  ra.student_row_stride = rs;
  ra.teacher = t;
  ra.teacher_row_stride = rt;
  ra.target = c.has_target ? target.data() : nullptr;
  ra.target_stride = 1;
  ra.loss_rows = loss_cpu.data();
  ra.grad = g_cpu;
  ra.grad_row_stride = g_stride;
  ra.n_rows = N;
  ra.n_cols = C;
  ra.student_dtype = dtype_code<S>();
  ra.teacher_dtype = dtype_code<T>();
  ra.params = P;
  ra.lanes_max_cols = cpu::kLanesMaxCols;
  std::vector<A> scratch(cpu::scratch_elems(C, ra.lanes_max_cols) + 64);
  const int64_t cpu_bad = cpu::baseline::run_rows(ra, 0, N, scratch.data());

  // A pristine student copy for the gradient-free run below (in place overwrites s2).
  std::vector<S> s3(s2 - c.off_s, s2 - c.off_s + (c.off_s + N * rs + 8));

  // Simulation: one group of `width` host threads walks the rows (grid-stride with one group).
  cuda::KernelArgs ka{};
  ka.student = s2;
  ka.student_row_stride = rs;
  ka.teacher = t;
  ka.teacher_row_stride = rt;
  ka.target = c.has_target ? target.data() : nullptr;
  ka.target_stride = 1;
  ka.loss_rows = loss_sim.data();
  ka.grad = g_sim;
  ka.grad_row_stride = g_stride;
  ka.n_rows = N;
  ka.n_cols = C;
  ka.params = P;
  std::vector<A> records;
  ka.splits = 1;
  ka.split_cols = C;
  if (c.split_cols > 0) {
    ka.split_cols = c.split_cols;
    ka.splits = (C + c.split_cols - 1) / c.split_cols;
    records.assign(static_cast<size_t>(N) * ka.splits * cuda::rows::kRecordValues, A(0));
    ka.records = records.data();
  }
  g_assert_hits = 0;
  std::string race;
  const int races = simulate_rows<S, T, Gd, A, V>(ka, c.width, &race);

  // Same rows without a gradient: the losses must be bitwise equal (same element -> thread map
  // and reduction order whatever the gradient's alignment, in place or not).
  std::vector<A> loss_nograd(N, A(-7));
  if (c.grad_mode != 0 && c.bad_target_row < 0) {
    cuda::KernelArgs kb = ka;
    kb.student = s3.data() + c.off_s;
    kb.grad = nullptr;
    kb.grad_row_stride = 0;
    kb.loss_rows = loss_nograd.data();
    simulate_rows<S, T, Gd, A, V>(kb, c.width, nullptr);
  }

  const std::string what = std::string(dtype_name<S>()) + "/" + dtype_name<T>() + " " + describe(c);
  auto fail = [&](const std::string& msg) {
    if (++g_failures <= 20) std::printf("FAIL %s: %s\n", what.c_str(), msg.c_str());
  };
  if (races != 0) fail("shared-memory race: " + race);
  if (c.bad_target_row >= 0) {
    if (cpu_bad != c.bad_target_row) fail("CPU did not report the bad target");
    if (g_assert_hits.load() == 0) fail("no device assert for the bad target");
  } else if (cpu_bad != -1) {
    fail("CPU rows failed: " + std::to_string(cpu_bad));
    return;
  } else if (g_assert_hits.load() != 0) {
    fail("unexpected device assert");
  }

  const bool f64 = std::is_same_v<A, double>;
  // The soft loss is a difference of log normalizers (~log C each): float rounding there, times
  // T^2 (400 at T = 20), differs between two summation orders.
  const double t2 = c.scale_by_t2 ? c.temperature * c.temperature : 1.0;
  const double l_atol = f64 ? 1e-12 : 2e-5 + 2e-6 * t2, l_rtol = f64 ? 1e-10 : 2e-5;
  const double g_atol = f64 ? 1e-13 : (std::is_same_v<Gd, bf16_bits> ? 1e-6 : 2e-7);
  const double g_rtol = f64 ? 1e-10 : (std::is_same_v<Gd, bf16_bits> ? 8e-3 : 5e-5);
  // reverse_kl / jsd gradients are q_k * (ratio_k - row_kl): a difference of terms as large as
  // the row's largest gradient, so float summation order shows at that scale.
  const double g_row_tol = f64 ? 1e-10 : 1e-4;
  for (int i = 0; i < N; ++i) {
    if (c.bad_target_row == i) continue;
    if (!close(loss_sim[i], loss_cpu[i], l_atol, l_rtol)) {
      fail("loss row " + std::to_string(i) + ": sim " + std::to_string(loss_sim[i]) + " cpu " +
           std::to_string(loss_cpu[i]));
    }
    if (c.grad_mode != 0 && c.bad_target_row < 0 && std::memcmp(&loss_nograd[i], &loss_sim[i], sizeof(A)) != 0) {
      fail("loss row " + std::to_string(i) + " differs without a gradient: " + std::to_string(loss_nograd[i]) +
           " vs " + std::to_string(loss_sim[i]));
    }
    if (g_cpu == nullptr) continue;
    double g_max = 0.0;
    for (int k = 0; k < C; ++k) {
      const double b = std::fabs(to_double(g_cpu[i * g_stride + k]));
      if (std::isfinite(b)) g_max = std::fmax(g_max, b);
    }
    for (int k = 0; k < C; ++k) {
      const double a = to_double(g_sim[i * g_stride + k]);
      const double b = to_double(g_cpu[i * g_stride + k]);
      if (!close(a, b, g_atol + g_row_tol * g_max, g_rtol)) {
        fail("grad[" + std::to_string(i) + "," + std::to_string(k) + "]: sim " + std::to_string(a) +
             " cpu " + std::to_string(b) + " (target " + std::to_string(target[i]) + ")");
        break;
      }
    }
  }
  // Nothing outside the rows may be written (padding of the gradient rows stays as allocated).
  if (c.grad_mode == 1 && c.pad_g > 0) {
    for (int i = 0; i < N; ++i) {
      for (int k = C; k < rg; ++k) {
        if (to_double(g_sim[i * rg + k]) != 0.0) {
          fail("write outside the row at [" + std::to_string(i) + "," + std::to_string(k) + "]");
        }
      }
    }
  }
}

template <class S, class T>
void run_pair(const Config& c) {
  using Gd = math::grad_storage_t<S>;
  using A = std::conditional_t<std::is_same_v<S, double>, double, float>;
  Config cc = c;
  if (std::is_same_v<S, f16_bits> && cc.grad_mode == 2) cc.grad_mode = 1;  // f16 in place is refused
  run_case<S, T, Gd, A>(cc);
}

void run_config(int pair, const Config& c) {
  switch (pair) {
    case 0: return run_pair<float, float>(c);
    case 1: return run_pair<float, bf16_bits>(c);
    case 2: return run_pair<float, f16_bits>(c);
    case 3: return run_pair<bf16_bits, float>(c);
    case 4: return run_pair<bf16_bits, bf16_bits>(c);
    case 5: return run_pair<bf16_bits, f16_bits>(c);
    case 6: return run_pair<f16_bits, float>(c);
    case 7: return run_pair<f16_bits, bf16_bits>(c);
    case 8: return run_pair<f16_bits, f16_bits>(c);
    default: return run_pair<double, double>(c);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int n_random = argc > 1 ? std::atoi(argv[1]) : 300;
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1234;
  std::mt19937_64 rng(seed);
  auto pick = [&](std::initializer_list<int> xs) {
    return *(xs.begin() + std::uniform_int_distribution<size_t>(0, xs.size() - 1)(rng));
  };
  auto pick_d = [&](std::initializer_list<double> xs) {
    return *(xs.begin() + std::uniform_int_distribution<size_t>(0, xs.size() - 1)(rng));
  };
  auto coin = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
  int cases = 0;
  for (int it = 0; it < n_random; ++it) {
    Config c{};
    // The launch's choices (distill.cu): sub-warps of 4..32 lanes for C <= 1024, blocks of
    // 128..512 threads above; blocks of 64 and 1024 too, which the group code must also take.
    const bool large = coin(0.03);
    c.n_cols = large ? pick({32000, 50257, 131072}) : pick({1, 2, 3, 7, 10, 16, 33, 64, 100, 257, 1000, 1024, 1025, 1500, 4099});
    c.width = c.n_cols > 1024 ? pick({64, 128, 256, 512}) : pick({4, 8, 16, 32, 32, 64});
    if (coin(0.02)) c.width = 1024;
    c.n_rows = large ? pick({1, 2}) : pick({1, 2, 5, 9});
    // Rows split across groups (the launch splits large rows when N is small): segments of a
    // multiple of 16 classes, here small ones so that rows of a few thousand have several.
    if (c.n_cols > 1024 && coin(0.4)) {
      c.split_cols = pick({16, 48, 512, 1024, 4096});
      const int at_most_64 = (c.n_cols + 63) / 64;  // as the launch: at most 64 splits per row
      if (c.split_cols < at_most_64) c.split_cols = (at_most_64 + 15) / 16 * 16;
      if (c.width > 128) c.width = 128;  // 3 launches of up to 64 units a row: keep it quick
      if (c.n_rows > 3) c.n_rows = 3;
    }
    if (c.n_cols <= 4099 && c.width > 128 && !coin(0.3)) c.width = 128;  // wide groups cost host threads
    c.kind = pick({0, 1, 2, 3});
    c.has_target = coin(0.75);
    c.ignored_rows = coin(0.4);
    c.nan_input = coin(0.08) && c.n_rows > 1;
    c.inf_input = coin(0.05);
    // -inf teacher entries: kl's and jsd's masked vocabulary (reverse_kl is +inf there and
    // logit_mse NaN, which the inf inputs cover).
    c.masked_teacher = (c.kind == math::KIND_KL || c.kind == math::KIND_JSD) && coin(0.25);
    c.temperature = c.kind == math::KIND_LOGIT_MSE ? 1.0 : pick_d({1.0, 1.0, 2.0, 4.0, 3.7, 20.0});
    c.alpha = pick({0, 1, 2}) * 0.5;  // 0, 0.5, 1
    c.beta = pick({1, 2, 3}) * 0.25;
    c.smoothing = coin(0.4) ? 0.1 : 0.0;
    c.scale_by_t2 = coin(0.8);
    c.grad_mode = pick({0, 1, 1, 2, 2});
    const bool misaligned = coin(0.5);
    c.off_s = misaligned ? pick({0, 1, 2, 3, 5}) : 0;
    c.off_t = misaligned ? (coin(0.5) ? c.off_s : pick({0, 1, 3})) : 0;
    c.off_g = misaligned ? pick({0, 1, 2}) : 0;
    c.pad_s = misaligned ? pick({0, 1, 3, 8}) : 0;
    c.pad_t = misaligned ? (coin(0.5) ? c.pad_s : pick({0, 2})) : 0;
    c.pad_g = misaligned ? pick({0, 1, 4}) : 0;
    c.bad_target_row = (c.has_target && coin(0.03)) ? c.n_rows - 1 : -1;
    c.seed = rng();
    for (int pair = 0; pair < 10; ++pair) {
      if (pair != 9 && pair != static_cast<int>(it % 9) && !coin(large ? 0.0 : 0.1)) continue;  // f64 always
      run_config(pair, c);
      ++cases;
    }
  }
  std::printf("host simulation of the CUDA rows: %d cases, %d failures\n", cases, g_failures);
  return g_failures == 0 ? 0 : 1;
}
