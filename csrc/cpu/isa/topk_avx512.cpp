// kdfast::topk_targets' row loops for AVX-512 (F, DQ, BW, VL) CPUs. See avx512.cpp.
#if defined(__x86_64__) && !defined(__AVX512F__)
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c,prefer-vector-width=512")
#endif
#define KDFAST_ISA avx512
#include "../topk_rows.h"
