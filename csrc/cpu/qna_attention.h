// Torch-facing CPU entry points of the QnA-attention op (the backend contract of
// fastvit_kernels/reference/qna_attention.py: forward / backward).
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastvit_kernels {
namespace cpu {

// -> (out [B, Ho, Wo, h, d] in v's dtype, lse [B, Ho, Wo, Q, h] fp32), both contiguous
std::tuple<at::Tensor, at::Tensor> qna_attention_forward(
    const at::Tensor& cost, const at::Tensor& v, const at::Tensor& rpe,
    const at::Tensor& attn_scale, int64_t kernel_size, int64_t stride);

// -> (dcost, dv, drpe, dattn_scale), contiguous, each in the dtype of its input
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qna_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& cost, const at::Tensor& v,
    const at::Tensor& rpe, const at::Tensor& attn_scale, const at::Tensor& lse,
    int64_t kernel_size, int64_t stride);

}  // namespace cpu
}  // namespace fastvit_kernels
