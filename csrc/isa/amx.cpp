// The amx level above avx512 (AMX-TILE + AMX-BF16 + AVX512-BF16, Sapphire Rapids and later):
// amx::kKernels.
//
// Only the attention kernels with bf16 products are compiled here (bias, policy, varlen), and only
// for bf16 inputs: their products run in bf16 with fp32 accumulation (kernels/attention_gemm.h,
// product<T>()), softmax statistics and everything else stay fp32. fp32 and fp16 inputs, and the
// other ops (qna_attention, ggem_pool), call the avx512 kernels, so their results are bitwise the
// avx512 level's. (fp16 would need AMX-FP16 for fp32-accumulated fp16 products; not required
// here, and absent on Sapphire Rapids.)
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
namespace fastvit_kernels {
namespace cpu {
namespace amx {
namespace {

#include "kernels/simd.h"
#include "kernels/kernel_common.h"
#include "kernels/attention_gemm.h"

#define FVK_KERNEL_BODIES 1
#include "kernels/bias_attention.h"
#include "kernels/policy_attention.h"
#include "kernels/varlen_attention.h"
#undef FVK_KERNEL_BODIES

// An entry point of the table: bf16 inputs run `bf16` (when the op has one) with the tiles
// configured for this thread; everything else runs the avx512 level's `entry`.
template <class Args, void (*bf16)(const Args&, int64_t, int64_t),
          KernelFn<Args> KernelTable::*entry>
void run(const Args& a, int64_t task_begin, int64_t task_end) {
  if constexpr (bf16 != nullptr) {
    if (a.dtype == ElemType::kBFloat16) {
      MatrixUnitScope tiles;
      bf16(a, task_begin, task_end);
      return;
    }
  }
  (avx512::kKernels.*entry)(a, task_begin, task_end);
}

constexpr ElemType kBf16 = ElemType::kBFloat16;

}  // namespace

// This level's table (declared in isa/kernel_table.h).
const KernelTable kKernels = {
    .bias_attention_forward =
        run<BiasAttentionFwdArgs, bias_attention::forward_impl<kBf16>,
            &KernelTable::bias_attention_forward>,
    .bias_attention_backward =
        run<BiasAttentionBwdArgs, bias_attention::backward_impl<kBf16>,
            &KernelTable::bias_attention_backward>,
    .qna_attention_forward =
        run<QnaAttentionFwdArgs, nullptr, &KernelTable::qna_attention_forward>,
    .qna_attention_backward =
        run<QnaAttentionBwdArgs, nullptr, &KernelTable::qna_attention_backward>,
    .policy_attention_forward =
        run<PolicyAttentionFwdArgs, policy_attention::forward_impl<kBf16>,
            &KernelTable::policy_attention_forward>,
    .policy_attention_backward =
        run<PolicyAttentionBwdArgs, policy_attention::backward_impl<kBf16>,
            &KernelTable::policy_attention_backward>,
    .varlen_attention_forward =
        run<VarlenAttentionFwdArgs, varlen_attention::forward_impl<kBf16>,
            &KernelTable::varlen_attention_forward>,
    .varlen_attention_backward =
        run<VarlenAttentionBwdArgs, varlen_attention::backward_impl<kBf16>,
            &KernelTable::varlen_attention_backward>,
    .ggem_pool_forward = run<GGeMPoolFwdArgs, nullptr, &KernelTable::ggem_pool_forward>,
    .ggem_pool_backward = run<GGeMPoolBwdArgs, nullptr, &KernelTable::ggem_pool_backward>,
};

}  // namespace amx
}  // namespace cpu
}  // namespace fastvit_kernels
#undef FVK_BF16_PRODUCTS
#undef FVK_SIMD_AVX512

#pragma GCC diagnostic pop
#pragma GCC pop_options

#endif  // FVK_BF16_KERNELS
