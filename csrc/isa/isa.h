// Runtime choice of the CPU kernel ISA (op-independent).
//
// By default the best ISA this CPU supports runs; FASTVIT_KERNELS_CPU_ISA=amx|avx512bf16|avx512|avx2|scalar
// (read at every call, so tests may set it at run time) or set_cpu_isa() (which takes precedence)
// forces a lower one, which is how the tests cover every path on one machine. Asking for an ISA
// that was not compiled in or that the CPU lacks raises ValueError.
//
// amx and avx512bf16 (above avx512) change only how bf16 inputs of the attention ops are
// multiplied: bf16 products with fp32 accumulation, on the AMX tiles (isa/amx.cpp) or with
// vdpbf16ps (isa/avx512bf16.cpp). fp32 and fp16 inputs, and the other ops, run the avx512 kernels
// there.
#pragma once

#include <string>
#include <vector>

namespace fastvit_kernels {
namespace cpu {

enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3, kAvx512Bf16 = 4 };

const char* isa_name(CpuIsa isa);

// ISAs with kernels in this build / ISAs this CPU (and OS) can run, best first.
std::vector<std::string> compiled_isas();
std::vector<std::string> supported_isas();

// The ISA the kernels will use now (override, else env var, else best supported).
CpuIsa current_cpu_isa();

// "auto" clears the override; anything else must be compiled and supported.
void set_cpu_isa(const std::string& name);

}  // namespace cpu
}  // namespace fastvit_kernels
