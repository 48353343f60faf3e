#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace kdfast {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    out.push_back(Isa::kAvx512);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    out.push_back(Isa::kAvx2);
#endif
  out.push_back(Isa::kBaseline);
  return out;
}

Isa selected_isa() {
  static const std::vector<Isa> supported = supported_isas();
  const char* forced = std::getenv("KDFAST_CPU_ISA");
  if (forced == nullptr || forced[0] == '\0' || std::strcmp(forced, "auto") == 0) return supported.front();
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kBaseline}) {
    if (std::strcmp(forced, isa_name(isa)) != 0) continue;
    for (Isa have : supported)
      if (have == isa) return isa;
    TORCH_CHECK_VALUE(false, "KDFAST_CPU_ISA=", forced, " but this CPU cannot run it; supported: ",
                      isa_name(supported.front()), " and below");
  }
  TORCH_CHECK_VALUE(false, "KDFAST_CPU_ISA must be one of auto, avx512, avx2, baseline; got '",
                    forced, "'");
}

}  // namespace cpu
}  // namespace kdfast
