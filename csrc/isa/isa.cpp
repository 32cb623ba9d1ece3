// Runtime choice of the CPU kernel ISA (op-independent). See isa.h.
#include "isa/isa.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>
#include <vector>

#include <c10/util/Exception.h>

#include "isa/isa_config.h"

namespace fastvit_kernels {
namespace cpu {
namespace {

constexpr int kAuto = -1;
std::atomic<int> g_override{kAuto};  // set by set_cpu_isa()

constexpr CpuIsa kBestFirst[] = {CpuIsa::kAvx512, CpuIsa::kAvx2, CpuIsa::kScalar};

bool is_compiled(CpuIsa isa) {
  return isa == CpuIsa::kScalar || FVK_X86_KERNELS;
}

// CPUID plus OS support of the register state (libgcc checks XGETBV for YMM / ZMM).
bool cpu_supports(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar:
      return true;
#if FVK_X86_KERNELS
    case CpuIsa::kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case CpuIsa::kAvx512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    default:
      return false;
  }
}

bool is_usable(CpuIsa isa) { return is_compiled(isa) && cpu_supports(isa); }

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// Parses "avx512" / "avx2" / "scalar" (any case, surrounding blanks ignored) into an ISA that
// this build and CPU can run; "auto" and "" give kAuto. `source` names the origin for errors.
int parse_isa(std::string name, const char* source) {
  name.erase(std::remove_if(name.begin(), name.end(), [](unsigned char c) { return std::isspace(c); }),
             name.end());
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (name.empty() || name == "auto") return kAuto;
  for (CpuIsa isa : kBestFirst) {
    if (name != isa_name(isa)) continue;
    TORCH_CHECK_VALUE(is_compiled(isa), source, " asks for CPU ISA '", name,
                      "', but this build of fastvit_kernels has kernels only for: ",
                      join(compiled_isas()));
    TORCH_CHECK_VALUE(cpu_supports(isa), source, " asks for CPU ISA '", name,
                      "', but this CPU supports only: ", join(supported_isas()));
    return static_cast<int>(isa);
  }
  TORCH_CHECK_VALUE(false, source, " must be one of 'auto', 'avx512', 'avx2', 'scalar'; got '",
                    name, "'");
  return kAuto;
}

}  // namespace

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (CpuIsa isa : kBestFirst)
    if (is_compiled(isa)) out.emplace_back(isa_name(isa));
  return out;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (CpuIsa isa : kBestFirst)
    if (is_usable(isa)) out.emplace_back(isa_name(isa));
  return out;
}

CpuIsa current_cpu_isa() {
  const int forced = g_override.load(std::memory_order_relaxed);
  if (forced != kAuto) return static_cast<CpuIsa>(forced);
  // Read on every call (cheap) so a test can change the variable at run time.
  if (const char* env = std::getenv("FASTVIT_KERNELS_CPU_ISA")) {
    const int from_env = parse_isa(env, "FASTVIT_KERNELS_CPU_ISA");
    if (from_env != kAuto) return static_cast<CpuIsa>(from_env);
  }
  for (CpuIsa isa : kBestFirst)
    if (is_usable(isa)) return isa;
  return CpuIsa::kScalar;
}

void set_cpu_isa(const std::string& name) {
  g_override.store(parse_isa(name, "set_cpu_isa"), std::memory_order_relaxed);
}

}  // namespace cpu
}  // namespace fastvit_kernels
