// Plain-data interface between the torch-facing code (varlen_attention.cpp) and the ISA-specific
// kernels (varlen_attention_{avx512,avx2,scalar}.cpp). No torch or intrinsics headers on purpose:
// the kernels are compiled with per-file target options and see only raw pointers, element
// strides and sizes.
#pragma once

#include <cstdint>

#include "elem_type.h"

namespace fastvit_kernels {
namespace cpu {

// Largest head width D the kernels take (their scratch holds a few rows of D floats per query
// row; wider heads are no ViT's and would only grow it).
constexpr int64_t kVarlenMaxHeadDim = 256;

// One unit of work: query rows [q_begin, q_end) (indices inside the segment) of segment `seg`,
// head `head`. Built by varlen_attention.cpp; tasks of one (seg, head) are consecutive, so a
// thread repacks k / v only when its (seg, head) changes.
struct VarlenTask {
  int64_t seg, head, q_begin, q_end;
};

// What forward and backward both read: sizes, scale, segments and q / k / v.
struct VarlenAttentionInputs {
  int64_t T, H, D;
  int64_t num_seqs, max_seqlen;  // max_seqlen: the longest segment (sizes the scratch)
  ElemType dtype;                // of q, k, v, grad_out, out and dq / dk / dv (all the same)
  float scale;
  const int64_t* cu_seqlens;     // [num_seqs + 1], 0 = cu[0] < cu[1] < ... < cu[num_seqs] = T
  // Element strides in [t, h, d] order (any values).
  const void* q; int64_t q_stride[3];
  const void* k; int64_t k_stride[3];
  const void* v; int64_t v_stride[3];
  const VarlenTask* tasks;       // the work list, run by index
};

struct VarlenAttentionFwdArgs : VarlenAttentionInputs {
  // Outputs, contiguous: out [T, H, D] in dtype, lse [T, H] fp32.
  void* out;
  float* lse;
};

struct VarlenAttentionBwdArgs : VarlenAttentionInputs {
  const void* grad_out; int64_t grad_out_stride[3];
  const void* out; int64_t out_stride[3];
  const float* lse; int64_t lse_stride[2];
  // Outputs, contiguous [T, H, D]. Every task covers all query rows of its (seg, head), so
  // dk / dv rows have exactly one owner (no atomics, no partial sums).
  void* dq;
  void* dk;
  void* dv;
  int64_t q_block;  // query rows per inner block (P / dS of a block stay in L1 / L2)
};

// Entry points, one set per ISA: run tasks [task_begin, task_end) of args.tasks.
#define FVK_DECLARE_VARLEN_ATTENTION_KERNELS(isa)                                              \
  namespace isa {                                                                              \
  void varlen_attention_forward(const VarlenAttentionFwdArgs& args, int64_t task_begin,        \
                                int64_t task_end);                                             \
  void varlen_attention_backward(const VarlenAttentionBwdArgs& args, int64_t task_begin,       \
                                 int64_t task_end);                                            \
  }

FVK_DECLARE_VARLEN_ATTENTION_KERNELS(scalar)
FVK_DECLARE_VARLEN_ATTENTION_KERNELS(avx2)
FVK_DECLARE_VARLEN_ATTENTION_KERNELS(avx512)

#undef FVK_DECLARE_VARLEN_ATTENTION_KERNELS

}  // namespace cpu
}  // namespace fastvit_kernels
