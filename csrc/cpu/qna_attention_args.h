// Plain-data interface between the torch-facing code (qna_attention.cpp) and the ISA-specific
// kernels (qna_attention_{avx512,avx2,scalar}.cpp). No torch or intrinsics headers on purpose:
// the kernels are compiled with per-file target options and see only raw pointers, element
// strides and sizes.
#pragma once

#include <cstdint>

#include "elem_type.h"

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

// The backward sweeps the output rows as the forward does (tasks over output rows). A task adds
// the gradient terms of its windows into its own buffers: drpe / dattn_scale partial sums, and
// dcost / dv of the input rows its windows read. Input rows that only one task reads are written
// to dcost / dv by that task; the at most edge_rows = k - stride rows read by two neighbouring
// tasks of an image go to the upper task's bottom edge slot and the lower task's top edge slot,
// summed afterwards (in that order) by the caller.
struct QnaAttentionBwdArgs : QnaAttentionInputs {
  const void* grad_out; int64_t grad_out_stride[5];  // [B, Ho, Wo, H, D], any strides
  // [tasks][2][k*k][Q][H]: per task, its drpe then its dattn_scale partial sums; every task
  // writes its whole slice.
  float* param_grad_partial;
  // [tasks][2 (top, bottom)][edge_rows][Wi][Q*H + H*D]: per shared input pixel, its dcost then
  // its dv terms from this task (fp32). A slot holds rows from the first row the task shares.
  float* edge_partial;
  int64_t edge_rows;
  void* dcost;  // [B, Hi, Wi, Q, H] contiguous
  void* dv;     // [B, Hi, Wi, H, D] contiguous
  // Over output rows. Every task but an image's last has at least ceil(k / stride) rows, so that
  // no input row is read by more than two tasks.
  RowTasks tasks;
};

// Entry points, one set per ISA: run tasks [task_begin, task_end).
#define FVK_DECLARE_QNA_ATTENTION_KERNELS(isa)                                                 \
  namespace isa {                                                                              \
  void qna_attention_forward(const QnaAttentionFwdArgs& args, int64_t task_begin,              \
                             int64_t task_end);                                                \
  void qna_attention_backward(const QnaAttentionBwdArgs& args, int64_t task_begin,             \
                              int64_t task_end);                                               \
  }

FVK_DECLARE_QNA_ATTENTION_KERNELS(scalar)
FVK_DECLARE_QNA_ATTENTION_KERNELS(avx2)
FVK_DECLARE_QNA_ATTENTION_KERNELS(avx512)

#undef FVK_DECLARE_QNA_ATTENTION_KERNELS

}  // namespace cpu
}  // namespace fastvit_kernels
