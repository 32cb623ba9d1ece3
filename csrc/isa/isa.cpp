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

#if FVK_BF16_KERNELS
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastvit_kernels {
namespace cpu {
namespace {

constexpr int kAuto = -1;
std::atomic<int> g_override{kAuto};  // set by set_cpu_isa()

// amx first, so it is the default where the CPU has it: it passes every parity test (bf16 errors
// within the tests' 2x-PyTorch-bf16 bound, fp32 / fp16 bitwise the avx512 level's) and was faster
// than avx512 on every shape measured (python -m fastvit_kernels.bench.cpu_isa: 1.25x to 1.9x,
// LeViT stage-1 bias attention and DeiT-S policy / varlen attention, batch 1 and 32, one thread,
// Sapphire Rapids). avx512bf16 next, for CPUs with AVX512-BF16 but no AMX: the same parity, and
// faster than avx512 on the same shapes (1.24x to 1.64x, one thread, AMD Zen 4; benchmarks/README.md,
// "A second machine"). Forcing "avx512" keeps bf16 products in fp32.
constexpr CpuIsa kBestFirst[] = {CpuIsa::kAmx, CpuIsa::kAvx512Bf16, CpuIsa::kAvx512, CpuIsa::kAvx2,
                                 CpuIsa::kScalar};

bool is_compiled(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar: return true;
    case CpuIsa::kAvx2:
    case CpuIsa::kAvx512: return FVK_X86_KERNELS;
    default: return FVK_BF16_KERNELS;
  }
}

#if FVK_BF16_KERNELS
// CPUID leaf 7: subleaf 1 EAX bit 5 = AVX512_BF16; subleaf 0 EDX bit 22 = AMX-BF16, bit 24 =
// AMX-TILE.
bool cpuid_bit(unsigned subleaf, int reg, int bit) {
  unsigned r[4] = {0, 0, 0, 0};
  if (!__get_cpuid_count(7, subleaf, &r[0], &r[1], &r[2], &r[3])) return false;
  return (r[reg] >> bit) & 1u;
}

// The tile state must be enabled by the OS (XCR0 bits 17 XTILECFG and 18 XTILEDATA), and Linux
// (5.16+) hands out the tile data only to a process that asks for it once, before the first tile
// instruction: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). Asked once per process (the
// permission covers every thread); without it the amx level is unsupported.
bool os_grants_tiles() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if (((lo >> 17) & 3u) != 3u) return false;
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

bool cpu_has_avx512bf16() {
  static const bool has = cpuid_bit(1, 0, 5);
  return has;
}

bool cpu_has_amx_bf16() {
  static const bool has = cpuid_bit(0, 3, 22) && cpuid_bit(0, 3, 24) && os_grants_tiles();
  return has;
}
#endif

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
#if FVK_BF16_KERNELS
    case CpuIsa::kAmx:  // AVX512-BF16 for the operand conversions (vcvtne2ps2bf16)
      return cpu_supports(CpuIsa::kAvx512) && cpu_has_avx512bf16() && cpu_has_amx_bf16();
    case CpuIsa::kAvx512Bf16:
      return cpu_supports(CpuIsa::kAvx512) && cpu_has_avx512bf16();
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

// Parses "amx" / "avx512bf16" / "avx512" / "avx2" / "scalar" (any case, surrounding blanks
// ignored) into an ISA that this build and CPU can run; "auto" and "" give kAuto. `source` names
// the origin for errors.
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
  TORCH_CHECK_VALUE(false, source,
                    " must be one of 'auto', 'amx', 'avx512bf16', 'avx512', 'avx2', 'scalar'; got '",
                    name, "'");
  return kAuto;
}

}  // namespace

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAmx: return "amx";
    case CpuIsa::kAvx512Bf16: return "avx512bf16";
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
