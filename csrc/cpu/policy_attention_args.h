// Plain-data interface between the torch-facing code (policy_attention.cpp) and the ISA-specific
// kernels (policy_attention_{avx512,avx2,scalar}.cpp). No torch or intrinsics headers on purpose:
// the kernels are compiled with per-file target options and see only raw pointers, element
// strides and sizes.
#pragma once

#include <cstdint>

#include "elem_type.h"

namespace fastvit_kernels {
namespace cpu {

// Key columns are processed in a per-batch order (see PolicyAttentionInputs::perm), padded to a
// multiple of kPolicyRowAlign floats, so any ISA whose vector width divides it reads whole vectors.
constexpr int64_t kPolicyRowAlign = 16;

// The kernels find the row argmax with key indices held exactly in fp32 lanes, which bounds the
// token count N (far beyond any attention size); D has no limit (scratch is sized at run time).
constexpr int64_t kPolicyMaxTokens = int64_t{1} << 24;

// What forward and backward both read. The caller (policy_attention.cpp) sorts each batch's keys
// into "kept" (policy != 0) first, then dropped, both in ascending order: column c of batch b is
// key perm[b * N + c], key j sits in column pos[b * N + j], and columns [0, n_kept[b]) are the
// kept keys. The kernels compute exp / P·V / dS only over the kept columns (plus the diagonal and
// row-argmax entries, handled one by one), which is what makes the cost fall with the keep ratio.
struct PolicyAttentionInputs {
  int64_t B, H, N, D;
  ElemType dtype;  // of q, k, v (and grad_out, out in backward, and the outputs)
  float scale, eps;
  // Element strides in [b, h, n, d] order (any values).
  const void* q; int64_t q_stride[4];
  const void* k; int64_t k_stride[4];
  const void* v; int64_t v_stride[4];
  // Column order and policy, see above; ld = round_up(N, kPolicyRowAlign).
  int64_t ld;
  const int32_t* perm;    // [B][N]
  const int32_t* pos;     // [B][N]
  const int32_t* n_kept;  // [B]
  const float* pk;        // [B][ld]: policy of column c's key for c < n_kept[b], else 0
  const float* col_mask;  // [ld]: 0 for c < N, -inf for the padding columns
};

struct PolicyAttentionFwdArgs : PolicyAttentionInputs {
  // Outputs: out with d-stride 1, statistics [B, H, N] with any strides.
  void* out; int64_t out_stride[4];
  float* row_max; int64_t row_max_stride[3];
  float* denom; int64_t denom_stride[3];
  int32_t* row_argmax; int64_t row_argmax_stride[3];
  // Task t covers (b, h) = divmod(t / q_blocks, H) and query rows [(t % q_blocks) * q_block,
  // ...). Tasks of one (b, h) are consecutive, so a thread repacks k / v only when (b, h) changes.
  int64_t q_block, q_blocks;
};

struct PolicyAttentionBwdArgs : PolicyAttentionInputs {
  const void* grad_out; int64_t grad_out_stride[4];
  const void* out; int64_t out_stride[4];
  const float* row_max; int64_t row_max_stride[3];
  const float* denom; int64_t denom_stride[3];
  const int32_t* row_argmax; int64_t row_argmax_stride[3];  // values validated in [0, N)
  // Outputs with d-stride 1.
  void* dq; int64_t dq_stride[4];
  void* dk; int64_t dk_stride[4];
  void* dv; int64_t dv_stride[4];
  // Per-(b, h) dpolicy partial sums [B][H][N] (key order), written in full by task (b, h); the
  // caller sums them over h in order. Null when dpolicy is not needed.
  float* dpolicy_partial;
  // Task t covers (b, h) = divmod(t, H): dk / dv rows have one owner. Query rows are processed in
  // blocks of q_block.
  int64_t q_block;
};

// Entry points, one set per ISA: run tasks [task_begin, task_end).
#define FVK_DECLARE_POLICY_ATTENTION_KERNELS(isa)                                              \
  namespace isa {                                                                              \
  void policy_attention_forward(const PolicyAttentionFwdArgs& args, int64_t task_begin,        \
                                int64_t task_end);                                             \
  void policy_attention_backward(const PolicyAttentionBwdArgs& args, int64_t task_begin,       \
                                 int64_t task_end);                                            \
  }

FVK_DECLARE_POLICY_ATTENTION_KERNELS(scalar)
FVK_DECLARE_POLICY_ATTENTION_KERNELS(avx2)
FVK_DECLARE_POLICY_ATTENTION_KERNELS(avx512)

#undef FVK_DECLARE_POLICY_ATTENTION_KERNELS

}  // namespace cpu
}  // namespace fastvit_kernels
