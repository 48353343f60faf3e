// Host simulation of the CUDA sparse rows (csrc/cuda/sparse_rows.cuh), run by the default test
// suite (tests/test_sparse_host_sim.py), so a machine without a GPU checks what the GPU would
// compute.
//
// Runs the row code with one std::thread per simulated GPU thread and compares loss and gradient
// with the CPU rows (csrc/cpu/sparse_rows.h, baseline build, fed the sorted ids the CPU op's
// validation makes) over random configurations: both tails (renormalize; bucket) with every kind
// allowed (kl; reverse_kl and jsd with bucket), T in {1, 2, 4, 3.7, 20}, T_t = T or not, alpha in
// {0, 0.5, 1}, label smoothing, k in {1, 8, C, C + 3, random} with empty slots (-1) and empty
// rows, ignored rows, rows without target, C from 1 to 131,072 (odd ones too), the block widths
// the launch picks (32..512), float32 / bfloat16 / float16 / float64 students, int32 / int64 ids,
// misaligned rows (vector head / body / tail, gradient rows aligned unlike the student's), no /
// out-of-place / in-place gradient, and an id out of range (a device assert, nothing outside the
// rows written).
//
// The simulated group models what the GPU guarantees and nothing more: a shuffle exchanges values
// within a warp only; shared memory (group_allreduce's values and the bitmap of K) is checked for
// races: a value read in the same barrier interval as another thread wrote it, or written in the
// interval another thread read or wrote it (atomic ORs of the bitmap excepted), is reported
// whatever the host threads' timing, so a removed barrier fails deterministically
// (tests/test_sparse_host_sim.py removes each and expects the failure); a barrier not reached by
// every thread of the group (a divergent __syncthreads) fails the run after a deadline.
//
// What it cannot check: the launch configuration, vector loads on the device, the memory model
// of global memory; those need a GPU (tests/test_cuda.py).
//
// Usage: sparse_host_sim [random cases] [seed]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
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

#include "../csrc/cuda/sparse_rows.cuh"
#include "host_sim_common.h"
#include "kdfast/cpu_rows_api.h"

using namespace kdfast;
using namespace kdfast::host_sim;
using math::bf16_bits;
using math::f16_bits;

namespace {

constexpr int kWarp = 32;

// A barrier of n threads that reports a deadlock: broken row code can call barriers a different
// number of times in different threads (a divergent __syncthreads, undefined on the GPU), which
// would hang a std::barrier; this one fails the run after kDeadlineSeconds instead.
class SimBarrier {
 public:
  static constexpr int kDeadlineSeconds = 60;
  explicit SimBarrier(int n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(m_);
    const long gen = generation_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lock, std::chrono::seconds(kDeadlineSeconds), [&] { return generation_ != gen; })) {
      std::printf("FAIL: a barrier was not reached by every thread (divergent barrier, deadlock)\n");
      std::fflush(stdout);
      std::_Exit(3);
    }
  }

 private:
  int n_, arrived_ = 0;
  long generation_ = 0;
  std::mutex m_;
  std::condition_variable cv_;
};

// Who last accessed one shared-memory cell, for the race check.
struct CellLog {
  int writer = -1;
  long write_epoch = -1;
  bool atomic_write = false;
  long read_epoch = -1;
  int readers = 0;  // in read_epoch
  int reader = -1;  // the one reader, when readers == 1
};

// What the threads of one simulated block share.
struct Shared {
  int width, lanes;
  SimBarrier group_barrier;
  std::vector<std::unique_ptr<SimBarrier>> warp_barriers;
  std::vector<double> exchange;  // one shuffle slot per thread
  std::mutex mutex;
  std::vector<double> red;
  std::vector<CellLog> red_log;
  std::vector<unsigned> bits;
  std::vector<CellLog> bits_log;
  std::atomic<int> races{0};
  std::string first_race;
  Shared(int w, int l, int words)
      : width(w), lanes(l), group_barrier(w), exchange(w), red(cuda::rows::kSmemValues),
        red_log(cuda::rows::kSmemValues), bits(words), bits_log(words) {
    for (int i = 0; i < w / l; ++i) warp_barriers.emplace_back(new SimBarrier(l));
  }
  void race(const std::string& what) {
    std::lock_guard<std::mutex> lock(race_mutex);
    if (races++ == 0) first_race = what;
  }
  std::mutex race_mutex;
};

// A write of cell c by `rank` in `epoch` (atomic: an atomicOr, which may meet other atomics).
void log_write(Shared* sh, CellLog& c, int rank, long epoch, bool atomic, const char* what, int i) {
  const bool other_write = c.write_epoch == epoch && c.writer != rank && !(atomic && c.atomic_write);
  if (other_write) sh->race(std::string("two writes without a barrier in ") + what + " at " + std::to_string(i));
  if (c.read_epoch == epoch && (c.readers > 1 || c.reader != rank)) {
    sh->race(std::string("write after another thread's read without a barrier in ") + what + " at " +
             std::to_string(i));
  }
  if (c.write_epoch != epoch) c.atomic_write = atomic;
  c.atomic_write = c.atomic_write && atomic;
  c.writer = rank;
  c.write_epoch = epoch;
}
void log_read(Shared* sh, CellLog& c, int rank, long epoch, const char* what, int i) {
  if (c.write_epoch < 0) sh->race(std::string("read of unwritten ") + what + " at " + std::to_string(i));
  if (c.write_epoch == epoch && (c.writer != rank || c.atomic_write)) {
    sh->race(std::string("read of another thread's write without a barrier in ") + what + " at " + std::to_string(i));
  }
  if (c.read_epoch != epoch) c.read_epoch = epoch, c.readers = 0;
  ++c.readers;
  c.reader = rank;
}

// sparse_rows.cuh's group on host threads. `epoch` counts this thread's barriers: accesses by
// different threads are ordered only when a barrier lies between them.
template <class A>
struct SimGroup {
  int rank, width, lanes;
  Shared* sh;
  long* epoch;

  A shfl_xor(A v, int offset) const {
    const int partner = rank ^ offset;
    if (offset >= lanes || partner / lanes != rank / lanes) sh->race("shuffle outside the warp");
    SimBarrier& warp = *sh->warp_barriers[rank / lanes];
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
    std::lock_guard<std::mutex> lock(sh->mutex);
    log_write(sh, sh->red_log.at(i), rank, *epoch, false, "reduction values", i);
    std::memcpy(&sh->red.at(i), &v, sizeof(A));
  }
  A smem_load(int i) const {
    std::lock_guard<std::mutex> lock(sh->mutex);
    log_read(sh, sh->red_log.at(i), rank, *epoch, "reduction values", i);
    A out;
    std::memcpy(&out, &sh->red.at(i), sizeof(A));
    return out;
  }
  void bits_clear(int w) const {
    std::lock_guard<std::mutex> lock(sh->mutex);
    log_write(sh, sh->bits_log.at(w), rank, *epoch, false, "the bitmap", w);
    sh->bits.at(w) = 0u;
  }
  void bits_or(int w, unsigned m) const {
    std::lock_guard<std::mutex> lock(sh->mutex);
    log_write(sh, sh->bits_log.at(w), rank, *epoch, true, "the bitmap", w);
    sh->bits.at(w) |= m;
  }
  unsigned bits_load(int w) const {
    std::lock_guard<std::mutex> lock(sh->mutex);
    log_read(sh, sh->bits_log.at(w), rank, *epoch, "the bitmap", w);
    return sh->bits.at(w);
  }
};

// One launch: one block of `width` host threads walks every row (grid-stride with one block).
template <class S, class I, class Gd, class A, int V>
int simulate(const cuda::SparseKernelArgs& a, int width, std::string* race) {
  const int lanes = width < kWarp ? width : kWarp;
  Shared shared(width, lanes, cuda::sparse_rows::bitmap_words(a.n_cols));
  // Garbage in the bitmap at launch (dynamic shared memory is not zeroed).
  for (auto& w : shared.bits) w = 0xa5a5a5a5u;
  for (auto& c : shared.bits_log) c.write_epoch = -2;  // "written" before the launch
  std::vector<std::thread> threads;
  for (int r = 0; r < width; ++r) {
    threads.emplace_back([&, r] {
      long epoch = 0;
      const SimGroup<A> g{r, width, lanes, &shared, &epoch};
      int parity = 0;
      for (int64_t row = 0; row < a.n_rows; ++row) {
        cuda::sparse_rows::process_sparse_row<S, I, Gd, A, V>(a, row, g, parity);
      }
    });
  }
  for (auto& th : threads) th.join();
  if (shared.races.load() != 0 && race != nullptr && race->empty()) *race = shared.first_race;
  return shared.races.load();
}

struct Config {
  int n_rows, n_cols, k, width;
  int kind;
  bool bucket, has_target, ignored_rows, empty_rows, ids_int64;
  double empty_slots;  // fraction of -1 slots
  double temperature, teacher_temperature, alpha, beta, smoothing;
  bool scale_by_t2;
  int grad_mode;      // 0 none, 1 out of place, 2 in place
  int off_s, off_g;   // element offsets of the first row
  int pad_s, pad_g;   // row stride - C
  int bad_id_row;     // -1: none
  uint64_t seed;
};

std::string describe(const Config& c) {
  char b[512];
  std::snprintf(b, sizeof b,
                "N=%d C=%d k=%d width=%d kind=%d bucket=%d target=%d ignored=%d empty_rows=%d empty=%.2f i64=%d "
                "T=%g Tt=%g alpha=%g beta=%g eps=%g t2=%d grad=%d off=(%d,%d) pad=(%d,%d) bad_id=%d seed=%llu",
                c.n_rows, c.n_cols, c.k, c.width, c.kind, c.bucket, c.has_target, c.ignored_rows, c.empty_rows,
                c.empty_slots, c.ids_int64, c.temperature, c.teacher_temperature, c.alpha, c.beta, c.smoothing,
                c.scale_by_t2, c.grad_mode, c.off_s, c.off_g, c.pad_s, c.pad_g, c.bad_id_row,
                static_cast<unsigned long long>(c.seed));
  return b;
}

int g_failures = 0;

template <class S, class I>
void run_case(const Config& c) {
  using Gd = math::grad_storage_t<S>;
  using A = std::conditional_t<std::is_same_v<S, double>, double, float>;
  constexpr int V = 16 / static_cast<int>(sizeof(S));
  const int N = c.n_rows, C = c.n_cols, k = c.k;
  const int64_t rs = C + c.pad_s, rg = C + c.pad_g;
  std::mt19937_64 rng(c.seed);
  std::normal_distribution<double> normal(0.0, 3.0);
  std::uniform_real_distribution<double> unif(0.0, 1.0);

  // Students: two copies (CPU, simulation) and a pristine one for the gradient-free run.
  auto alloc = [](size_t bytes) { return std::vector<double>(bytes / sizeof(double) + 16); };
  auto aligned = [](std::vector<double>& v) {
    return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
  };
  const size_t s_elems = c.off_s + N * rs + 8;
  auto s_buf = alloc(s_elems * sizeof(S)), s_buf2 = alloc(s_elems * sizeof(S));
  S* s = reinterpret_cast<S*>(aligned(s_buf)) + c.off_s;
  S* s2 = reinterpret_cast<S*>(aligned(s_buf2)) + c.off_s;
  for (int64_t j = -c.off_s; j < static_cast<int64_t>(s_elems) - c.off_s; ++j) {
    s[j] = from_double<S>(std::fmax(-20.0, std::fmin(20.0, normal(rng))));
  }
  std::memcpy(s2 - c.off_s, s - c.off_s, s_elems * sizeof(S));
  std::vector<S> s3(s2 - c.off_s, s2 - c.off_s + s_elems);

  // Teacher: k slots per row, distinct ids, some -1; rows of empty slots only.
  std::vector<I> ids(static_cast<size_t>(N) * k, I(-1));
  std::vector<A> z(static_cast<size_t>(N) * k, A(0)), tail(N);
  std::vector<int> perm(C);
  for (int i = 0; i < N; ++i) {
    for (int j = 0; j < C; ++j) perm[j] = j;
    std::shuffle(perm.begin(), perm.end(), rng);
    const bool empty_row = c.empty_rows && unif(rng) < 0.3;
    int used = 0;
    for (int j = 0; j < k; ++j) {
      z[i * k + j] = static_cast<A>(normal(rng) + 2.0);
      if (empty_row || used == C || unif(rng) < c.empty_slots) continue;
      ids[i * k + j] = static_cast<I>(perm[used++]);
    }
    tail[i] = static_cast<A>(normal(rng) + std::log(static_cast<double>(C)));
  }
  if (c.bad_id_row >= 0) ids[c.bad_id_row * k + k / 2] = static_cast<I>(unif(rng) < 0.5 ? C + 2 : -5);

  std::vector<int64_t> target(N);
  for (int i = 0; i < N; ++i) {
    target[i] = static_cast<int64_t>(unif(rng) * C) % C;
    // Often a class of K, to cover the label among the bins.
    if (unif(rng) < 0.4 && ids[i * k] >= 0 && ids[i * k] < C) target[i] = ids[i * k];
    if (c.ignored_rows && unif(rng) < 0.3) target[i] = -100;
  }
  // An ignored row's ids are never read, so only a counted row's bad id can trip the assert.
  if (c.bad_id_row >= 0) target[c.bad_id_row] = 0;

  const math::Params P = math::make_params(c.kind, c.has_target, -100, c.temperature, c.alpha, c.beta, c.smoothing,
                                           c.scale_by_t2);
  // The CPU rows' inputs: each row's valid ids sorted as keys (the op's validation pass).
  std::vector<int64_t> keys(static_cast<size_t>(N) * k);
  std::vector<int32_t> n_valid(N);
  for (int i = 0; i < N; ++i) {
    int nk = 0;
    for (int j = 0; j < k; ++j) {
      const int64_t id = ids[i * k + j];
      if (id >= 0 && id < C) keys[i * k + nk++] = cpu::sparse_key(id, j);
    }
    std::sort(keys.begin() + i * k, keys.begin() + i * k + nk);
    n_valid[i] = nk;
  }

  auto g_buf = alloc((c.off_g + N * rg + 8) * sizeof(Gd)), g_buf2 = alloc((c.off_g + N * rg + 8) * sizeof(Gd));
  Gd* g_cpu = nullptr;
  Gd* g_sim = nullptr;
  int64_t g_stride = 0;
  if (c.grad_mode == 1) {
    g_cpu = reinterpret_cast<Gd*>(aligned(g_buf)) + c.off_g;
    g_sim = reinterpret_cast<Gd*>(aligned(g_buf2)) + c.off_g;
    g_stride = rg;
  } else if (c.grad_mode == 2) {
    if constexpr (std::is_same_v<S, Gd>) {
      g_cpu = s;
      g_sim = s2;
      g_stride = rs;
    }
  }
  // average_rows as the ops do it: 1 / counted rows (the CPU scales its params, CUDA a weight).
  int counted = 0;
  for (int i = 0; i < N; ++i) counted += c.has_target ? target[i] != -100 : n_valid[i] > 0;
  const double row_weight = 1.0 / std::max(counted, 1);

  std::vector<A> loss_cpu(N, A(-7)), loss_sim(N, A(-7)), loss_nograd(N, A(-7));
  if (c.bad_id_row < 0) {
    cpu::SparseRowsArgs ra{};
    ra.student = s;
    ra.student_row_stride = rs;
    ra.keys = keys.data();
    ra.n_valid = n_valid.data();
    ra.k = k;
    ra.teacher_logits = z.data();
    ra.tail = c.bucket ? tail.data() : nullptr;
    ra.target = c.has_target ? target.data() : nullptr;
    ra.target_stride = 1;
    ra.loss_rows = loss_cpu.data();
    ra.grad = g_cpu;
    ra.grad_row_stride = g_stride;
    ra.n_rows = N;
    ra.n_cols = C;
    ra.student_dtype = dtype_code<S>();
    ra.params = P;
    math::scale_params(ra.params, row_weight);
    ra.inv_teacher_temperature = 1.0 / c.teacher_temperature;
    std::vector<A> scratch(cpu::sparse_scratch_elems(C, k) + 64);
    cpu::baseline::run_sparse_rows(ra, 0, N, scratch.data());
  }

  cuda::SparseKernelArgs ka{};
  ka.student = s2;
  ka.student_row_stride = rs;
  ka.ids = ids.data();
  ka.k = k;
  ka.teacher_logits = z.data();
  ka.tail = c.bucket ? tail.data() : nullptr;
  ka.target = c.has_target ? target.data() : nullptr;
  ka.target_stride = 1;
  ka.loss_rows = loss_sim.data();
  ka.grad = g_sim;
  ka.grad_row_stride = g_stride;
  ka.n_rows = N;
  ka.n_cols = C;
  ka.params = P;
  ka.inv_teacher_temperature = 1.0 / c.teacher_temperature;
  ka.row_weight = &row_weight;
  g_assert_hits = 0;
  std::string race;
  const int races = simulate<S, I, Gd, A, V>(ka, c.width, &race);
  const int asserts = g_assert_hits.load();

  // Without a gradient the losses must be bitwise the same (same element -> thread map).
  if (c.grad_mode != 0 && c.bad_id_row < 0) {
    cuda::SparseKernelArgs kb = ka;
    kb.student = s3.data() + c.off_s;
    kb.grad = nullptr;
    kb.grad_row_stride = 0;
    kb.loss_rows = loss_nograd.data();
    simulate<S, I, Gd, A, V>(kb, c.width, nullptr);
  }

  const std::string what = std::string(dtype_name<S>()) + (c.ids_int64 ? "/i64 " : "/i32 ") + describe(c);
  auto fail = [&](const std::string& msg) {
    if (++g_failures <= 20) std::printf("FAIL %s: %s\n", what.c_str(), msg.c_str());
  };
  if (races != 0) fail("shared-memory race: " + race);
  // Nothing outside the rows may be written (the gradient rows' padding stays as allocated).
  if (c.grad_mode == 1 && c.pad_g > 0) {
    for (int i = 0; i < N; ++i) {
      for (int64_t j = C; j < rg; ++j) {
        if (to_double(g_sim[i * rg + j]) != 0.0) fail("write outside the row at [" + std::to_string(i) + "]");
      }
    }
  }
  if (c.bad_id_row >= 0) {
    if (asserts == 0) fail("no device assert for the id out of range");
    return;
  }
  if (asserts != 0) fail("unexpected device assert");

  const bool f64 = std::is_same_v<A, double>;
  const double t2 = c.scale_by_t2 ? c.temperature * c.temperature : 1.0;
  const double l_atol = f64 ? 1e-12 : 2e-5 + 2e-6 * t2, l_rtol = f64 ? 1e-10 : 2e-5;
  const double g_atol = f64 ? 1e-13 : (std::is_same_v<Gd, bf16_bits> ? 1e-6 : 2e-7);
  const double g_rtol = f64 ? 1e-10 : (std::is_same_v<Gd, bf16_bits> ? 8e-3 : 5e-5);
  const double g_row_tol = f64 ? 1e-10 : 1e-4;
  for (int i = 0; i < N; ++i) {
    if (!close(loss_sim[i], loss_cpu[i], l_atol, l_rtol)) {
      fail("loss row " + std::to_string(i) + ": sim " + std::to_string(loss_sim[i]) + " cpu " +
           std::to_string(loss_cpu[i]));
    }
    if (c.grad_mode != 0 && std::memcmp(&loss_nograd[i], &loss_sim[i], sizeof(A)) != 0) {
      fail("loss row " + std::to_string(i) + " differs without a gradient");
    }
    if (g_cpu == nullptr) continue;
    double g_max = 0.0;
    for (int j = 0; j < C; ++j) g_max = std::fmax(g_max, std::fabs(to_double(g_cpu[i * g_stride + j])));
    for (int j = 0; j < C; ++j) {
      const double x = to_double(g_sim[i * g_stride + j]), y = to_double(g_cpu[i * g_stride + j]);
      if (!close(x, y, g_atol + g_row_tol * g_max, g_rtol)) {
        fail("grad[" + std::to_string(i) + "," + std::to_string(j) + "]: sim " + std::to_string(x) + " cpu " +
             std::to_string(y) + " (target " + std::to_string(target[i]) + ")");
        break;
      }
    }
  }
}

template <class S> void run_ids(const Config& c) {
  Config cc = c;
  if (std::is_same_v<S, f16_bits> && cc.grad_mode == 2) cc.grad_mode = 1;  // f16 in place is refused
  if (c.ids_int64) return run_case<S, int64_t>(cc);
  return run_case<S, int32_t>(cc);
}

void run_config(int dtype, const Config& c) {
  switch (dtype) {
    case 0: return run_ids<float>(c);
    case 1: return run_ids<bf16_bits>(c);
    case 2: return run_ids<f16_bits>(c);
    default: return run_ids<double>(c);
  }
}

// The launch's block width for C (sparse_distill.cu: about 8 vectors per thread, 32..512).
int launch_width(int C, int V) {
  int p = 1;
  while (p < (C + 8 * V - 1) / (8 * V)) p <<= 1;
  return std::clamp(p, 32, 512);
}

}  // namespace

int main(int argc, char** argv) {
  const int n_random = argc > 1 ? std::atoi(argv[1]) : 100;
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
    const bool large = it % 25 == 7;  // a few rows of a large vocabulary
    c.n_cols = large ? pick({32000, 50257, 131071, 131072})
                     : pick({1, 2, 3, 7, 10, 33, 64, 100, 257, 1000, 1023, 1025, 4099});
    c.k = pick({1, 8, c.n_cols, c.n_cols + 3, 1 + static_cast<int>(rng() % c.n_cols)});
    if (large && c.k > 64) c.k = pick({64, 2048});
    const int dtype = it % 4;
    const int V = dtype == 3 ? 2 : dtype == 0 ? 4 : 8;
    c.width = coin(0.5) ? launch_width(c.n_cols, V) : pick({32, 64, 128});
    if (coin(0.03)) c.width = 512;
    c.n_rows = large ? 1 : pick({1, 2, 5, 9});
    c.bucket = coin(0.6);
    c.kind = c.bucket ? pick({0, 1, 2}) : 0;
    c.has_target = coin(0.75);
    c.ignored_rows = coin(0.3);
    c.empty_rows = coin(0.2);
    c.empty_slots = pick_d({0.0, 0.0, 0.3});
    c.ids_int64 = coin(0.5);
    c.temperature = pick_d({1.0, 1.0, 2.0, 4.0, 3.7, 20.0});
    c.teacher_temperature = coin(0.6) ? c.temperature : pick_d({1.0, 2.5});
    c.alpha = pick({0, 1, 2}) * 0.5;
    c.beta = pick({1, 2, 3}) * 0.25;
    c.smoothing = coin(0.4) ? 0.1 : 0.0;
    c.scale_by_t2 = coin(0.8);
    c.grad_mode = pick({0, 1, 1, 2, 2});
    const bool misaligned = coin(0.5);
    c.off_s = misaligned ? pick({0, 1, 3, 5}) : 0;
    c.off_g = misaligned ? pick({0, 1, 2}) : 0;
    c.pad_s = misaligned ? pick({0, 1, 3, 8}) : 0;
    c.pad_g = misaligned ? pick({0, 1, 4}) : 0;
    c.bad_id_row = coin(0.03) ? c.n_rows - 1 : -1;
    c.seed = rng();
    run_config(dtype, c);
    ++cases;
  }
  std::printf("host simulation of the CUDA sparse rows: %d cases, %d failures\n", cases, g_failures);
  return g_failures == 0 ? 0 : 1;
}
