// The amx level above avx512bf16 (AMX-TILE + AMX-BF16 + AVX512-BF16, Sapphire Rapids and later):
// amx::kKernels, the bf16 products on the AMX tiles (isa/bf16_kernels.inc says what runs here).
//
// Built like isa/avx512.cpp: every header first (isa/kernel_table.h), then one target region and
// namespace around the kernels; on builds without FVK_BF16_KERNELS (isa/isa_config.h) the file
// compiles to nothing and isa/isa.cpp never selects this level.
#include "isa/isa_config.h"

#if FVK_BF16_KERNELS

#include <immintrin.h>

#include "isa/kernel_table.h"

#pragma GCC push_options
// GCC 12 flags the deliberately undefined upper halves inside its own AVX-512 intrinsics
// (transpose_block's shuffles), as maybe- or plainly uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16,amx-tile,amx-bf16")

#define FVK_SIMD_AVX512 1
#define FVK_BF16_PRODUCTS 1
#define FVK_BF16_TILES 1
namespace fastvit_kernels {
namespace cpu {
namespace amx {
#include "isa/bf16_kernels.inc"
}  // namespace amx
}  // namespace cpu
}  // namespace fastvit_kernels
#undef FVK_BF16_TILES
#undef FVK_BF16_PRODUCTS
#undef FVK_SIMD_AVX512

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // FVK_BF16_KERNELS
