// Varlen-attention kernels for the portable scalar C++ path (1 fp32 lane). Compiled with the default
// target flags, so this is the fallback for any CPU (and the only path on non-x86 or non-GCC
// builds). See varlen_attention_avx512.cpp for the structure shared by the three ISA files.

// 1. Every header the kernel uses, before any ISA region.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>

#include "varlen_attention_args.h"

// 2. The generic kernel in this ISA's namespace.
namespace fastvit_kernels {
namespace cpu {
namespace scalar {

#define FVK_SIMD_SCALAR 1
namespace {  // internal linkage: nothing here can collide with another ISA's copy
#include "simd.h"
#include "varlen_attention_kernel.h"
}  // namespace
#undef FVK_SIMD_SCALAR

// 3. Entry points.
void varlen_attention_forward(const VarlenAttentionFwdArgs& args, int64_t task_begin, int64_t task_end) {
  forward_kernel(args, task_begin, task_end);
}

void varlen_attention_backward(const VarlenAttentionBwdArgs& args, int64_t task_begin, int64_t task_end) {
  backward_kernel(args, task_begin, task_end);
}

}  // namespace scalar
}  // namespace cpu
}  // namespace fastvit_kernels
