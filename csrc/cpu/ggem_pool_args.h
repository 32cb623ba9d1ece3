// Plain-data interface between the torch-facing code (ggem_pool.cpp) and the ISA-specific kernels
// (ggem_pool_{avx512,avx2,scalar}.cpp). No torch or intrinsics headers on purpose: the kernels are
// compiled with per-file target options and see only raw pointers, element strides and sizes.
#pragma once

#include <cstdint>

#include "elem_type.h"

namespace fastvit_kernels {
namespace cpu {

// What forward and backward both read. Tokens [prefix, N) of each batch are pooled.
struct GGeMPoolInputs {
  int64_t B, N, C, prefix;
  ElemType dtype;  // of x, y and dx (all the same); everything else the kernels touch is fp32
  float eps;
  float log_count;  // ln(N - prefix)
  // p of each channel's group, fp32 [C] contiguous: the kernels never see the channel layout.
  const float* p;
  // x in [b, n, c] element strides; the channel stride is 1 (the caller copies otherwise).
  const void* x; int64_t x_stride_b, x_stride_n;
  // Work split: task t covers batch b = t / c_tasks and channels
  // [(t % c_tasks) * c_block, min(C, ... + c_block)); c_block is a multiple of kGGeMChannelAlign.
  int64_t c_block, c_tasks;
};

// Channel blocks are whole numbers of vectors for every ISA (16 fp32 lanes at most).
constexpr int64_t kGGeMChannelAlign = 16;

struct GGeMPoolFwdArgs : GGeMPoolInputs {
  void* y;          // [B, C] contiguous, x's dtype
  float* log_mean;  // [B, C] contiguous: ln((1/M) Σ_n max(x, eps)^p)
};

struct GGeMPoolBwdArgs : GGeMPoolInputs {
  const float* grad_y;    // [B, C] contiguous fp32
  const float* log_mean;  // [B, C] contiguous, from the forward
  void* dx;               // [B, N, C] contiguous, x's dtype (prefix rows are written as zeros)
  float* dydp;            // [B, C] contiguous: grad_y · dy/dp_c, summed into dp by the caller
};

// Entry points, one set per ISA: run tasks [task_begin, task_end).
#define FVK_DECLARE_GGEM_POOL_KERNELS(isa)                                                      \
  namespace isa {                                                                              \
  void ggem_pool_forward(const GGeMPoolFwdArgs& args, int64_t task_begin, int64_t task_end);   \
  void ggem_pool_backward(const GGeMPoolBwdArgs& args, int64_t task_begin, int64_t task_end);  \
  }

FVK_DECLARE_GGEM_POOL_KERNELS(scalar)
FVK_DECLARE_GGEM_POOL_KERNELS(avx2)
FVK_DECLARE_GGEM_POOL_KERNELS(avx512)

#undef FVK_DECLARE_GGEM_POOL_KERNELS

}  // namespace cpu
}  // namespace fastvit_kernels
