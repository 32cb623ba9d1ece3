// Plain-data interface between the torch-facing code (bias_attention.cpp) and the ISA-specific
// kernels (bias_attention_{avx512,avx2,scalar}.cpp). No torch or intrinsics headers on purpose:
// the kernels are compiled with per-file target options and see only raw pointers, element
// strides and sizes.
#pragma once

#include <cstdint>

#include "elem_type.h"

namespace fastvit_kernels {
namespace cpu {

enum class Activation : int { kNone = 0, kHardswish = 1 };

// The bias is pre-gathered by the caller as fp32 rows of `bias_ld` floats: row (h, i) starts at
// bias + h * bias_h_stride + i * bias_i_stride. Columns [Nk, bias_ld) hold -inf, which masks the
// kernels' vector padding for free. bias_ld is a multiple of kBiasRowAlign, so any ISA whose
// vector width divides it can read whole vectors. Without a table, a single row of zeros (then
// -inf) is used with both strides 0.
constexpr int64_t kBiasRowAlign = 16;

// What forward and backward both read: sizes, the op's settings, q / k / v and the dense bias.
struct BiasAttentionInputs {
  int64_t B, H, Nq, Nk, Dk, Dv;
  ElemType dtype;  // of q, k, v, grad_out, o_pre and the outputs (all the same)
  Activation activation;
  float scale;
  // Element strides in [b, h, n, d] order (any values).
  const void* q; int64_t q_stride[4];
  const void* k; int64_t k_stride[4];
  const void* v; int64_t v_stride[4];
  const float* bias; int64_t bias_h_stride, bias_i_stride, bias_ld;
};

struct BiasAttentionFwdArgs : BiasAttentionInputs {
  // Outputs. out / o_pre must have d-stride 1; o_pre may be null (not saved).
  void* out; int64_t out_stride[4];
  void* o_pre; int64_t o_pre_stride[4];
  float* lse; int64_t lse_stride[3];
  // Work split: task t covers (b, h) = divmod(t / q_blocks, H) and query rows
  // [(t % q_blocks) * q_block, ...). Tasks of one (b, h) are consecutive, so a thread repacks
  // k and v only when its (b, h) changes.
  int64_t q_block, q_blocks;
};

struct BiasAttentionBwdArgs : BiasAttentionInputs {
  const void* grad_out; int64_t grad_out_stride[4];
  const void* o_pre; int64_t o_pre_stride[4];
  const float* lse; int64_t lse_stride[3];
  // Dense validated index [Nq, Nk] (values in [0, T)) and the per-task dtable partial sums
  // [tasks, 2, T], zero-initialised by the caller; both null when there is no table.
  const int32_t* index; int64_t T; float* dtable_partial;
  // Outputs with d-stride 1.
  void* dq; int64_t dq_stride[4];
  void* dk; int64_t dk_stride[4];
  void* dv; int64_t dv_stride[4];
  // Task t covers head h = t % H and batches [c * b_chunk, (c + 1) * b_chunk) with c = t / H, so
  // dk / dv rows have one owner and dS is summed densely over the chunk before the dtable
  // scatter. b_chunk depends only on the shapes, which keeps dtable bitwise reproducible for any
  // thread count. Query rows are processed in blocks of q_block.
  int64_t b_chunk;
  int64_t q_block;
};

// Entry points, one set per ISA: run tasks [task_begin, task_end).
#define FVK_DECLARE_BIAS_ATTENTION_KERNELS(isa)                                                \
  namespace isa {                                                                              \
  void bias_attention_forward(const BiasAttentionFwdArgs& args, int64_t task_begin,            \
                              int64_t task_end);                                               \
  void bias_attention_backward(const BiasAttentionBwdArgs& args, int64_t task_begin,           \
                               int64_t task_end);                                              \
  }

FVK_DECLARE_BIAS_ATTENTION_KERNELS(scalar)
FVK_DECLARE_BIAS_ATTENTION_KERNELS(avx2)
FVK_DECLARE_BIAS_ATTENTION_KERNELS(avx512)

#undef FVK_DECLARE_BIAS_ATTENTION_KERNELS

}  // namespace cpu
}  // namespace fastvit_kernels
