#include "mixed_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

// MKL's declaration (mkl_cblas.h) with LP64 integers and its CBLAS enums as int; weak, so the
// library loads where libtorch_cpu does not carry it and the address is then null.
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k,
                                       float alpha, const std::uint16_t* a, int lda,
                                       const std::uint16_t* b, int ldb, float beta, float* c,
                                       int ldc) __attribute__((weak));

namespace kdfast {
namespace cpu {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS enum values

// A bfloat16 (rows x cols) operand as row-major BLAS sees it: its transpose flag and leading
// dimension, or ld = 0 when its strides are no BLAS layout.
struct Operand {
  int trans = kNoTrans;
  int64_t ld = 0;
};

Operand blas_operand(const at::Tensor& t) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.stride(1) == 1 && (rows <= 1 || t.stride(0) >= cols)) {
    return {kNoTrans, std::max<int64_t>({t.stride(0), cols, 1})};
  }
  if (t.stride(0) == 1 && (cols <= 1 || t.stride(1) >= rows)) {
    return {kTrans, std::max<int64_t>({t.stride(1), rows, 1})};
  }
  return {};
}

}  // namespace

bool mixed_gemm_available() {
  if (cblas_gemm_bf16bf16f32 == nullptr) return false;
  const char* env = std::getenv("KDFAST_MIXED_GEMM");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

bool fits_blas_int(std::initializer_list<int64_t> extents) {
  return std::all_of(extents.begin(), extents.end(), [](int64_t v) {
    return v >= 0 && v <= std::numeric_limits<int>::max();
  });
}

bool bf16_gemm(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, float alpha,
               bool accumulate) {
  if (!mixed_gemm_available() || !a.is_cpu() || !b.is_cpu() || !c.is_cpu() ||
      a.scalar_type() != at::kBFloat16 || b.scalar_type() != at::kBFloat16 ||
      c.scalar_type() != at::kFloat || a.dim() != 2 || b.dim() != 2 || c.dim() != 2 ||
      !c.is_contiguous()) {
    return false;
  }
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  TORCH_CHECK(b.size(0) == k && c.size(0) == m && c.size(1) == n, "bf16_gemm: shapes ",
              a.sizes(), " @ ", b.sizes(), " into ", c.sizes());
  const Operand oa = blas_operand(a), ob = blas_operand(b);
  if (oa.ld == 0 || ob.ld == 0 || !fits_blas_int({m, n, k, oa.ld, ob.ld})) return false;
  if (m == 0 || n == 0) return true;
  if (k == 0) {  // an empty sum: MKL would still scale c by beta
    if (!accumulate) c.zero_();
    return true;
  }
  cblas_gemm_bf16bf16f32(kRowMajor, oa.trans, ob.trans, int(m), int(n), int(k), alpha,
                         reinterpret_cast<const std::uint16_t*>(a.const_data_ptr()), int(oa.ld),
                         reinterpret_cast<const std::uint16_t*>(b.const_data_ptr()), int(ob.ld),
                         accumulate ? 1.0f : 0.0f, c.mutable_data_ptr<float>(),
                         int(std::max<int64_t>(n, 1)));
  return true;
}

}  // namespace cpu
}  // namespace kdfast
