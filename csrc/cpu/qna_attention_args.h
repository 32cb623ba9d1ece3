// Plain-data interface between the torch-facing code (qna_attention.cpp) and the ISA-specific
// kernels (qna_attention_{avx512,avx2,scalar}.cpp). No torch or intrinsics headers on purpose:
// the kernels are compiled with per-file target options and see only raw pointers, element
// strides and sizes.
#pragma once

#include <cstdint>

#include "bias_attention_args.h"  // ElemType, the element types every op's kernels share

namespace fastvit_kernels {
namespace cpu {

// What forward and backward both read. Shapes: cost [B, Hi, Wi, Q, H], v [B, Hi, Wi, H, D];
// output pixel (oy, ox) reads the window of input pixels (oy * stride - pad + ty,
// ox * stride - pad + tx), tap t = ty * kernel_size + tx, out-of-bounds taps masked.
struct QnaAttentionInputs {
  int64_t B, Hi, Wi, Q, H, D;
  int64_t kernel_size, stride, pad, Ho, Wo;
  ElemType dtype;  // of cost, v, grad_out, out, dcost, dv
  // Element strides in [b, y, x, q, h] / [b, y, x, h, d] order (any values).
  const void* cost; int64_t cost_stride[5];
  const void* v; int64_t v_stride[5];
  // [k*k, Q, H] fp32, contiguous.
  const float* rpe;
  const float* attn_scale;
};

// Work split of a pass over image rows: task t covers image b = t / tasks_per_image and rows
// [(t % tasks_per_image) * rows_per_task, ...) of it. It depends only on the shapes, never on the
// thread count, so every result is bitwise reproducible for any number of threads.
struct RowTasks {
  int64_t rows_per_task, tasks_per_image;
};

struct QnaAttentionFwdArgs : QnaAttentionInputs {
  void* out;   // [B, Ho, Wo, H, D] contiguous
  float* lse;  // [B, Ho, Wo, Q, H] contiguous
  RowTasks tasks;  // over output rows
};

// The backward runs in two passes (see qna_attention_kernel.h):
//   by_output, tasks over output rows: delta = sum_t w * attn_scale * u per output pixel, and the
//     per-task partial sums of drpe and dattn_scale;
//   by_input, tasks over input rows: dcost and dv of each input pixel, gathered from the (at most
//     k*k) output pixels whose window holds it.
struct QnaAttentionBwdArgs : QnaAttentionInputs {
  const void* grad_out; int64_t grad_out_stride[5];  // [B, Ho, Wo, H, D], any strides
  const float* lse;  // [B, Ho, Wo, Q, H] contiguous
  float* delta;      // [B, Ho, Wo, Q, H] fp32 contiguous: written by by_output, read by by_input
  // [output tasks][2][k*k][Q][H]: per task, its drpe then its dattn_scale partial sums; every
  // task writes its whole slice.
  float* param_grad_partial;
  void* dcost;  // [B, Hi, Wi, Q, H] contiguous
  void* dv;     // [B, Hi, Wi, H, D] contiguous
  RowTasks output_tasks;  // by_output: over output rows
  RowTasks input_tasks;   // by_input: over input rows
};

// Entry points, one set per ISA: run tasks [task_begin, task_end).
#define FVK_DECLARE_QNA_ATTENTION_KERNELS(isa)                                                 \
  namespace isa {                                                                              \
  void qna_attention_forward(const QnaAttentionFwdArgs& args, int64_t task_begin,              \
                             int64_t task_end);                                                \
  void qna_attention_backward_by_output(const QnaAttentionBwdArgs& args, int64_t task_begin,   \
                                        int64_t task_end);                                     \
  void qna_attention_backward_by_input(const QnaAttentionBwdArgs& args, int64_t task_begin,    \
                                       int64_t task_end);                                      \
  }

FVK_DECLARE_QNA_ATTENTION_KERNELS(scalar)
FVK_DECLARE_QNA_ATTENTION_KERNELS(avx2)
FVK_DECLARE_QNA_ATTENTION_KERNELS(avx512)

#undef FVK_DECLARE_QNA_ATTENTION_KERNELS

}  // namespace cpu
}  // namespace fastvit_kernels
