// kdfast::topk_targets' row loops for any x86-64 (SSE2) or non-x86 CPU: the portable fallback.
#define KDFAST_ISA baseline
#include "../topk_rows.h"
