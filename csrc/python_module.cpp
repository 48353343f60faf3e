// The Python module kdfast._C. Importing it loads this library, whose static initializers
// register the ops (csrc/ops.cpp) and their kernels. Not part of the LibTorch (CMake) build.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "cpu/buffer_pool.h"
#include "cpu/cpu_isa.h"
#include "cpu/mixed_gemm.h"

#ifndef KDFAST_CUDA_ARCHS
#define KDFAST_CUDA_ARCHS ""
#endif

namespace py = pybind11;

// kdfast._C: importing it loads this library, whose static initializers register the ops.
PYBIND11_MODULE(_C, m) {
  m.def("exp_rate", &kdfast::cpu::exp_rate, py::arg("seconds") = 0.2,
        py::call_guard<py::gil_scoped_release>(),
        "Vectorized exps per second of the CPU row loops' exp (selected ISA, all torch threads), "
        "on in-cache data: the exp term of kdfast bench's roofline.");
  m.doc() = "kdfast compiled ops (registered as torch.ops.kdfast.*)";
  m.def(
      "buffer_pool_stats",
      [] {
        const auto s = kdfast::cpu::pool_stats();
        py::dict d;
        d["cached_blocks"] = s.cached_blocks;
        d["cached_bytes"] = s.cached_bytes;
        d["hits"] = s.hits;
        d["misses"] = s.misses;
        return d;
      },
      "The CPU gradient-buffer pool: blocks and bytes cached now, allocations served / not.");
  m.def("release_buffers", &kdfast::cpu::release_pooled_buffers,
        "Returns the CPU gradient buffers kdfast keeps for reuse to the OS.");
  m.def(
      "build_info",
      [] {
        py::dict info;
        py::list backends;
        backends.append("cpu");
#ifdef KDFAST_WITH_CUDA
        backends.append("cuda");
#endif
        info["backends"] = backends;
        info["cuda_archs"] = std::string(KDFAST_CUDA_ARCHS);
        info["cpu_isas_compiled"] = std::vector<std::string>{"avx512", "avx2", "baseline"};
        std::vector<std::string> supported;
        for (auto isa : kdfast::cpu::supported_isas()) supported.emplace_back(kdfast::cpu::isa_name(isa));
        info["cpu_isas_supported"] = supported;
        info["cpu_isa_selected"] = std::string(kdfast::cpu::isa_name(kdfast::cpu::selected_isa()));
        // bfloat16 output-layer gradients summed in float32 by MKL (kdfast/linear.py)
        info["mixed_bf16_gemm"] = kdfast::cpu::mixed_gemm_available();
#ifdef _OPENMP
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        return info;
      },
      "Compiled backends, CPU instruction sets (compiled, supported by this CPU, selected now; "
      "KDFAST_CPU_ISA forces one) and the CUDA architectures compiled for.");
}
