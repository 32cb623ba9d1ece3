// The kernels' entry points, one table per ISA: what an ISA translation unit (isa/avx512.cpp,
// isa/avx2.cpp, isa/scalar.cpp, isa/amx.cpp, isa/avx512bf16.cpp) defines and the ops call through
// ops/dispatch.h. Plain data, no torch, no intrinsics.
//
// It also includes every standard header the kernels use: they include nothing themselves (see
// kernels/simd.h), and an ISA file includes this header before its target region, so that no
// library inline function is compiled with that ISA's options.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

// The ops' interfaces (args structs) only: FVK_KERNEL_BODIES is not defined here.
#include "kernels/bias_attention.h"
#include "kernels/ggem_pool.h"
#include "kernels/policy_attention.h"
#include "kernels/qna_attention.h"
#include "kernels/varlen_attention.h"

namespace fastvit_kernels {
namespace cpu {

// The kernels' scratch memory (kernels/attention_gemm.h, AlignedBuffer), from PyTorch's CPU
// allocator (isa/scratch.cpp) so that the profiler's memory view, and with it the benchmarks' peak
// memory, counts it. Returns `bytes` aligned to 64 bytes; *owner is what scratch_free takes.
void* scratch_allocate(size_t bytes, void** owner);
void scratch_free(void* owner);

// Runs tasks [task_begin, task_end) of `args` (each args struct says what a task covers).
template <class Args>
using KernelFn = void (*)(const Args& args, int64_t task_begin, int64_t task_end);

struct KernelTable {
  KernelFn<BiasAttentionFwdArgs> bias_attention_forward;
  KernelFn<BiasAttentionBwdArgs> bias_attention_backward;
  KernelFn<QnaAttentionFwdArgs> qna_attention_forward;
  KernelFn<QnaAttentionBwdArgs> qna_attention_backward;
  KernelFn<PolicyAttentionFwdArgs> policy_attention_forward;
  KernelFn<PolicyAttentionBwdArgs> policy_attention_backward;
  KernelFn<VarlenAttentionFwdArgs> varlen_attention_forward;
  KernelFn<VarlenAttentionBwdArgs> varlen_attention_backward;
  KernelFn<GGeMPoolFwdArgs> ggem_pool_forward;
  KernelFn<GGeMPoolBwdArgs> ggem_pool_backward;
};

// Defined by isa/scalar.cpp, isa/avx2.cpp and isa/avx512.cpp (the last two only where
// FVK_X86_KERNELS, see isa/isa_config.h), and by isa/amx.cpp and
// isa/avx512bf16.cpp (only where FVK_BF16_KERNELS).
namespace scalar {
extern const KernelTable kKernels;
}
namespace avx2 {
extern const KernelTable kKernels;
}
namespace avx512 {
extern const KernelTable kKernels;
}
namespace amx {
extern const KernelTable kKernels;
}
namespace avx512bf16 {
extern const KernelTable kKernels;
}

}  // namespace cpu
}  // namespace fastvit_kernels
