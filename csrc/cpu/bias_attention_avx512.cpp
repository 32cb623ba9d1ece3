// Bias-attention kernels for the AVX-512 (16 fp32 lanes) path.
//
// Structure (the same in every ISA file): (1) include every std / intrinsics header first, so no
// library inline function is compiled under this file's target options; (2) open the
// `#pragma GCC target` region and include simd.h and the generic kernel inside an ISA-specific
// namespace, so each ISA gets its own, privately named copy; (3) define the entry points declared
// in bias_attention_args.h. No torch headers here: the kernels see only raw pointers.
// On compilers / architectures without x86 target pragmas the file compiles to nothing and isa.cpp
// never selects it.

#include "isa_config.h"

#if FVK_X86_KERNELS

// 1. Every header the kernel uses, before the ISA region.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "bias_attention_args.h"

// 2. The generic kernel compiled for this ISA, in this ISA's namespace.
#pragma GCC push_options
// GCC 12 flags the deliberately undefined upper halves inside its own AVX-512 intrinsics.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

namespace fastvit_kernels {
namespace cpu {
namespace avx512 {

#define FVK_SIMD_AVX512 1
namespace {  // internal linkage: nothing here can collide with another ISA's copy
#include "simd.h"
#include "bias_attention_kernel.h"
}  // namespace
#undef FVK_SIMD_AVX512

// 3. Entry points.
void bias_attention_forward(const BiasAttentionFwdArgs& args, int64_t task_begin, int64_t task_end) {
  forward_kernel(args, task_begin, task_end);
}

void bias_attention_backward(const BiasAttentionBwdArgs& args, int64_t task_begin, int64_t task_end) {
  backward_kernel(args, task_begin, task_end);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace fastvit_kernels

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // FVK_X86_KERNELS
