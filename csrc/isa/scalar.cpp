// Every op's kernels for the portable scalar C++ path (1 fp32 lane): scalar::kKernels. Compiled
// with the default target flags, so this is the fallback for any CPU (and the only path on
// non-x86 or non-GCC builds). Built like isa/avx512.cpp, without a target region.
#include "isa/kernel_table.h"

#define FVK_SIMD_SCALAR 1
namespace fastvit_kernels {
namespace cpu {
namespace scalar {
#include "isa/kernels.inc"
}  // namespace scalar
}  // namespace cpu
}  // namespace fastvit_kernels
#undef FVK_SIMD_SCALAR
