// What the host simulations of the CUDA rows (cuda_host_sim.cpp, sparse_host_sim.cpp) share:
// storage conversions of the test data, dtype codes and names, and the tolerance check.
// Include after the CUDA row headers (they define the assert hook the simulations count).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../csrc/cuda/distill_rows.cuh"
#include "kdfast/cpu_rows_api.h"

namespace kdfast::host_sim {

using math::bf16_bits;
using math::f16_bits;

template <class T> T from_double(double v);
template <> float from_double<float>(double v) { return static_cast<float>(v); }
template <> double from_double<double>(double v) { return v; }
template <> bf16_bits from_double<bf16_bits>(double v) {
  bf16_bits b;
  math::store_from_acc(&b, static_cast<float>(v));
  return b;
}
// float -> half by rounding through the bit pattern (test data only: normal range, inf, NaN).
template <> f16_bits from_double<f16_bits>(double v) {
  const float f = static_cast<float>(v);
  f16_bits h;
  if (std::isnan(f)) { h.x = 0x7e00; return h; }
  if (std::isinf(f)) { h.x = f < 0 ? 0xfc00 : 0x7c00; return h; }
  // Values are kept in [-20, 20]: normal halves; round to 10 mantissa bits.
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const int exp = static_cast<int>((u >> 23) & 0xff) - 127;
  if (exp < -14) { h.x = static_cast<uint16_t>(sign); return h; }  // flush tiny values
  uint32_t mant = u & 0x7fffffu;
  uint32_t rounded = (mant + 0xfffu + ((mant >> 13) & 1u)) >> 13;
  int e = exp + 15;
  if (rounded == 0x400u) { rounded = 0; ++e; }
  h.x = static_cast<uint16_t>(sign | (static_cast<uint32_t>(e) << 10) | rounded);
  return h;
}
template <class T> double to_double(T v) { return static_cast<double>(cuda::rows::widen<double>(v)); }

template <class T> constexpr int32_t dtype_code() {
  if constexpr (std::is_same_v<T, float>) return cpu::DT_F32;
  if constexpr (std::is_same_v<T, bf16_bits>) return cpu::DT_BF16;
  if constexpr (std::is_same_v<T, f16_bits>) return cpu::DT_F16;
  return cpu::DT_F64;
}
template <class T> const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  if constexpr (std::is_same_v<T, bf16_bits>) return "bf16";
  if constexpr (std::is_same_v<T, f16_bits>) return "f16";
  return "f64";
}

// got == want within atol + rtol |want|; NaN only matches NaN, an infinity only itself.
bool close(double got, double want, double atol, double rtol) {
  if (std::isnan(want) || std::isnan(got)) return std::isnan(want) && std::isnan(got);
  if (std::isinf(want) || std::isinf(got)) return got == want;
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

}  // namespace kdfast::host_sim
