// Every op's kernels for the AVX2 + FMA + F16C path (8 fp32 lanes): avx2::kKernels. Built like
// isa/avx512.cpp: headers first, then one target region and namespace around isa/kernels.inc.
#include "isa/isa_config.h"

#if FVK_X86_KERNELS

#include <immintrin.h>

#include "isa/kernel_table.h"

#pragma GCC push_options
// GCC 12 flags the deliberately undefined upper halves inside its own intrinsics.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx2,fma,f16c")

#define FVK_SIMD_AVX2 1
namespace fastvit_kernels {
namespace cpu {
namespace avx2 {
#include "isa/kernels.inc"
}  // namespace avx2
}  // namespace cpu
}  // namespace fastvit_kernels
#undef FVK_SIMD_AVX2

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // FVK_X86_KERNELS
