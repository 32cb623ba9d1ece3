// Python bindings of fastvit_kernels._C: the native ops and what the build / CPU provide.
// Ops release the GIL: they only touch tensors and run their own thread pool.
#include <string>
#include <vector>

#include <torch/extension.h>
#include <torch/version.h>

#include "cpu/bias_attention.h"
#include "cpu/ggem_pool.h"
#include "cpu/isa.h"
#include "cpu/policy_attention.h"
#include "cpu/qna_attention.h"
#include "cpu/varlen_attention.h"

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
  m.doc() = "fastvit_kernels native CPU kernels";

  // ---- ops (contract: fastvit_kernels/reference/<op>.py) ----
  m.def("bias_attention_forward", &fc::bias_attention_forward, py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("table"), py::arg("index"), py::arg("scale"),
        py::arg("activation"), py::arg("save_pre_activation"),
        py::call_guard<py::gil_scoped_release>(),
        "Fused biased attention forward -> (out, o_pre, lse); see reference/bias_attention.py");
  m.def("bias_attention_backward", &fc::bias_attention_backward, py::arg("grad_out"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("table"), py::arg("index"),
        py::arg("o_pre"), py::arg("lse"), py::arg("scale"), py::arg("activation"),
        py::call_guard<py::gil_scoped_release>(),
        "Fused biased attention backward -> (dq, dk, dv, dtable); see reference/bias_attention.py");
  m.def("qna_attention_forward", &fc::qna_attention_forward, py::arg("cost"), py::arg("v"),
        py::arg("rpe"), py::arg("attn_scale"), py::arg("kernel_size"), py::arg("stride"),
        py::call_guard<py::gil_scoped_release>(),
        "QnA local attention forward -> (out, lse); see reference/qna_attention.py");
  m.def("qna_attention_backward", &fc::qna_attention_backward, py::arg("grad_out"),
        py::arg("cost"), py::arg("v"), py::arg("rpe"), py::arg("attn_scale"), py::arg("lse"),
        py::arg("kernel_size"), py::arg("stride"), py::call_guard<py::gil_scoped_release>(),
        "QnA local attention backward -> (dcost, dv, drpe, dattn_scale); see "
        "reference/qna_attention.py");
  m.def("policy_attention_forward", &fc::policy_attention_forward, py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("policy"), py::arg("scale"), py::arg("eps"),
        py::call_guard<py::gil_scoped_release>(),
        "DynamicViT policy attention forward -> (out, row_max, denom, row_argmax); see "
        "reference/policy_attention.py");
  m.def("policy_attention_backward", &fc::policy_attention_backward, py::arg("grad_out"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("policy"), py::arg("out"),
        py::arg("row_max"), py::arg("denom"), py::arg("row_argmax"), py::arg("scale"),
        py::arg("eps"), py::arg("need_dpolicy"), py::call_guard<py::gil_scoped_release>(),
        "DynamicViT policy attention backward -> (dq, dk, dv, dpolicy); see "
        "reference/policy_attention.py");
  m.def("ggem_pool_forward", &fc::ggem_pool_forward, py::arg("x"), py::arg("p"), py::arg("groups"),
        py::arg("eps"), py::arg("interleaved"), py::arg("num_prefix_tokens"),
        py::call_guard<py::gil_scoped_release>(),
        "GGeM pooling forward -> (y, log_mean); see reference/ggem_pool.py");
  m.def("ggem_pool_backward", &fc::ggem_pool_backward, py::arg("grad_y"), py::arg("x"), py::arg("p"),
        py::arg("log_mean"), py::arg("groups"), py::arg("eps"), py::arg("interleaved"),
        py::arg("num_prefix_tokens"), py::call_guard<py::gil_scoped_release>(),
        "GGeM pooling backward -> (dx, dp); see reference/ggem_pool.py");
  m.def("varlen_attention_forward", &fc::varlen_attention_forward, py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("cu_seqlens"), py::arg("max_seqlen"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>(),
        "Packed variable-length attention forward -> (out, lse); see "
        "reference/varlen_attention.py");
  m.def("varlen_attention_backward", &fc::varlen_attention_backward, py::arg("grad_out"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
        py::arg("cu_seqlens"), py::arg("max_seqlen"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>(),
        "Packed variable-length attention backward -> (dq, dk, dv); see "
        "reference/varlen_attention.py");

  // ---- build and CPU capabilities ----
  m.def("cpu_isa", [] { return std::string(fc::isa_name(fc::current_cpu_isa())); },
        "The CPU ISA the kernels will use now (avx512, avx2 or scalar)");
  m.def("compiled_isas", &fc::compiled_isas, "CPU ISAs with kernels in this build, best first");
  m.def("supported_isas", &fc::supported_isas, "CPU ISAs this machine can run, best first");
  m.def("set_cpu_isa", &fc::set_cpu_isa, py::arg("name"),
        "Force the CPU ISA ('avx512', 'avx2', 'scalar'), or 'auto' to restore the default; "
        "overrides FASTVIT_KERNELS_CPU_ISA");
  m.def("build_info", &build_info, "Compiler, flags and ISAs of this build");
}
