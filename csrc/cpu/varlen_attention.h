// Torch-facing CPU entry points of the packed variable-length attention op (the backend contract
// of fastvit_kernels/reference/varlen_attention.py: forward / backward).
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastvit_kernels {
namespace cpu {

// q, k, v [T, H, D] (any strides), cu_seqlens int64 [num_images + 1]
// -> (out [T, H, D] contiguous in q's dtype, lse [T, H] contiguous fp32)
std::tuple<at::Tensor, at::Tensor> varlen_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    int64_t max_seqlen, double scale);

// -> (dq, dk, dv) [T, H, D] contiguous in q's dtype
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    double scale);

}  // namespace cpu
}  // namespace fastvit_kernels
