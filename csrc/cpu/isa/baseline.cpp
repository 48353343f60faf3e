// Row loops for any x86-64 (SSE2) or non-x86 CPU: the portable fallback.
#define KDFAST_ISA baseline
#include "../rows.h"
#include "../sparse_rows.h"
