// The op schemas (defined once, here) and the Python module kdfast._C.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/cpu_isa.h"

#ifndef KDFAST_CUDA_ARCHS
#define KDFAST_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(kdfast, m) {
  // Row losses (N,) in float32 (float64 for float64 inputs) and the per-row gradient of
  // loss_i with respect to student_logits (N, C), unnormalized by the reduction; the gradient
  // is empty when compute_grad is false. See kdfast/ops.py for the full contract.
  m.def(
      "distill_fwd(Tensor student_logits, Tensor teacher_logits, Tensor? target, "
      "float temperature, float alpha, str kind, float beta, int ignore_index, "
      "float label_smoothing, bool scale_by_t2, bool compute_grad) -> (Tensor, Tensor)");
  // Same, but the gradient overwrites student_logits (saves one N x C buffer).
  m.def(
      "distill_fwd_inplace(Tensor(a!) student_logits, Tensor teacher_logits, Tensor? target, "
      "float temperature, float alpha, str kind, float beta, int ignore_index, "
      "float label_smoothing, bool scale_by_t2) -> Tensor");
}

namespace py = pybind11;

// kdfast._C: importing it loads this library, whose static initializers register the ops.
PYBIND11_MODULE(_C, m) {
  m.doc() = "kdfast compiled ops (registered as torch.ops.kdfast.*)";
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
