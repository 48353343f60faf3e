// Row loops for AVX2 + FMA CPUs. The pragma comes before every include so all code in this
// file, and only this file, may use AVX2; the dispatcher calls it only where the CPU has it.
#if defined(__x86_64__) && !defined(__AVX2__)
#pragma GCC target("avx2,fma,f16c")
#endif
#define KDFAST_ISA avx2
#include "../rows.h"
#include "../sparse_rows.h"
