// Every op's kernels for the AVX-512 path (16 fp32 lanes): avx512::kKernels.
//
// (1) Every header the kernels use first (isa/kernel_table.h), so that no library inline function
// is compiled with this file's target options; (2) one `#pragma GCC target` region and this ISA's
// namespace around isa/kernels.inc, which compiles every op's kernel. On compilers /
// architectures without x86 target pragmas (isa/isa_config.h) the file compiles to nothing and
// isa/isa.cpp never selects it.
#include "isa/isa_config.h"

#if FVK_X86_KERNELS

#include <immintrin.h>

#include "isa/kernel_table.h"

#pragma GCC push_options
// GCC 12 flags the deliberately undefined upper halves inside its own AVX-512 intrinsics
// (transpose_block's shuffles), as maybe- or plainly uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

#define FVK_SIMD_AVX512 1
namespace fastvit_kernels {
namespace cpu {
namespace avx512 {
#include "isa/kernels.inc"
}  // namespace avx512
}  // namespace cpu
}  // namespace fastvit_kernels
#undef FVK_SIMD_AVX512

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // FVK_X86_KERNELS
