// kdfast::topk_targets' row loops for AVX2 + FMA CPUs. See avx2.cpp.
#if defined(__x86_64__) && !defined(__AVX2__)
#pragma GCC target("avx2,fma,f16c")
#endif
#define KDFAST_ISA avx2
#include "../topk_rows.h"
