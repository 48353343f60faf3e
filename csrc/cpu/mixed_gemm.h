// bfloat16 products summed in float32 on the CPU: MKL's mixed-precision gemm.
//
// ATen on the CPU has no bfloat16 x bfloat16 -> float32 matmul (at::mm's out_dtype is CUDA
// only), so a float32 sum of bfloat16 products over row chunks would round each chunk's
// product to bfloat16, widen it and add it: two temporaries of the sum's size per chunk. MKL's
// cblas_gemm_bf16bf16f32 multiplies bfloat16 and accumulates into a float32 C directly
// (beta = 1). libtorch_cpu exports it where torch is built with MKL (the x86-64 wheels); it is
// linked weakly, so where torch lacks it this library still loads and callers fall back.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <initializer_list>

namespace kdfast {
namespace cpu {

// True when MKL's cblas_gemm_bf16bf16f32 is present and not disabled by the environment
// variable KDFAST_MIXED_GEMM=0 (tests set it to run the fallback).
bool mixed_gemm_available();

// True when every extent fits MKL's 32-bit (LP64) integers.
bool fits_blas_int(std::initializer_list<int64_t> extents);

// c = alpha * a @ b (+ c when accumulate) for CPU bfloat16 a (M x K) and b (K x N), each
// row-major or a transposed row-major matrix (unit stride in one dimension, the leading one
// at least the row length), and a contiguous float32 c (M x N). Products and sums in float32.
// Returns false, doing nothing, when unavailable or when a dtype, layout or extent does not fit.
bool bf16_gemm(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, float alpha,
               bool accumulate);

}  // namespace cpu
}  // namespace kdfast
