// Row loops for AVX-512 (F, DQ, BW, VL) CPUs, with 512-bit vectors. See avx2.cpp.
#if defined(__x86_64__) && !defined(__AVX512F__)
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c,prefer-vector-width=512")
#endif
#define KDFAST_ISA avx512
#include "../rows.h"
#include "../sparse_rows.h"
