// The Python module fastvit_kernels._C: what the build and the CPU provide, and the choice of the
// CPU ISA. The ops themselves are registered with PyTorch's dispatcher by their own files
// (ops/<op>.cpp); loading this module runs those registrations, and Python calls them as
// torch.ops.fastvit_kernels.<op>_forward / _backward.
//
// Only pybind11 here (no torch/extension.h: nothing takes or returns a tensor). A c10::Error from
// set_cpu_isa still reaches Python as the right exception through the translator torch registers
// with pybind11 for every module.
#include <string>
#include <vector>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/version.h>

#include "isa/isa.h"

namespace py = pybind11;

// Flags the build system passes as comma-separated tokens (no quoting survives every build
// tool), e.g. -DFVK_CXX_FLAGS=-O3,-fopenmp; see setup.py / CMakeLists.txt.
#define FVK_STRINGIFY_ARGS(...) #__VA_ARGS__
#define FVK_STRINGIFY(...) FVK_STRINGIFY_ARGS(__VA_ARGS__)
#ifndef FVK_CXX_FLAGS
#define FVK_CXX_FLAGS
#endif
#ifndef FVK_BUILD_SYSTEM
#define FVK_BUILD_SYSTEM unknown
#endif

namespace {

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start < s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

py::dict build_info() {
  py::dict info;
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  info["compiler"] = std::string("msvc ") + std::to_string(_MSC_VER);
#else
  info["compiler"] = std::string("unknown");
#endif
  info["cxx_flags"] = split_commas(FVK_STRINGIFY(FVK_CXX_FLAGS));
  info["build_system"] = std::string(FVK_STRINGIFY(FVK_BUILD_SYSTEM));
  info["cplusplus"] = static_cast<long>(__cplusplus);
#if defined(_OPENMP)
  info["openmp"] = static_cast<long>(_OPENMP);
#else
  info["openmp"] = py::none();
#endif
#if defined(TORCH_VERSION)
  info["torch_version"] = std::string(TORCH_VERSION);
#endif
  info["compiled_isas"] = fastvit_kernels::cpu::compiled_isas();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace fc = fastvit_kernels::cpu;
  m.doc() = "fastvit_kernels native CPU kernels: build and ISA information (the ops are "
            "torch.ops.fastvit_kernels.*)";
  m.def("cpu_isa", [] { return std::string(fc::isa_name(fc::current_cpu_isa())); },
        "The CPU ISA the kernels will use now (amx, avx512bf16, avx512, avx2 or scalar)");
  m.def("compiled_isas", &fc::compiled_isas, "CPU ISAs with kernels in this build, best first");
  m.def("supported_isas", &fc::supported_isas, "CPU ISAs this machine can run, best first");
  m.def("set_cpu_isa", &fc::set_cpu_isa, py::arg("name"),
        "Force the CPU ISA ('amx', 'avx512bf16', 'avx512', 'avx2', 'scalar'), or 'auto' to restore the default; "
        "overrides FASTVIT_KERNELS_CPU_ISA");
  m.def("build_info", &build_info, "Compiler, flags and ISAs of this build");
}
