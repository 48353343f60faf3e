// Run-time choice of the CPU instruction set for the row loops.
#pragma once

#include <string>
#include <vector>

namespace kdfast {
namespace cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

const char* isa_name(Isa isa);
// Instruction sets this CPU can run, best first.
std::vector<Isa> supported_isas();
// The best supported one, or the one KDFAST_CPU_ISA names (baseline, avx2, avx512; auto or
// unset = best). Read on every call so tests can switch paths within one process; naming an
// instruction set this CPU lacks raises instead of crashing with SIGILL.
Isa selected_isa();

// Vectorized exps per second of the row loops' exp on in-cache data, all torch threads at once.
double exp_rate(double seconds);

}  // namespace cpu
}  // namespace kdfast
