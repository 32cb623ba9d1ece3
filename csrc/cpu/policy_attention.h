// Torch-facing CPU entry points of the policy-attention op (the backend contract of
// fastvit_kernels/reference/policy_attention.py: forward / backward).
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastvit_kernels {
namespace cpu {

// -> (out [B,H,N,D] over [B,N,H,D] memory, row_max [B,H,N] fp32, denom [B,H,N] fp32,
//     row_argmax [B,H,N] int32)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& policy,
    double scale, double eps);

// -> (dq, dk, dv [B,H,N,D] contiguous, dpolicy [B,N] fp32: zeros unless need_dpolicy)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& policy, const at::Tensor& out, const at::Tensor& row_max,
    const at::Tensor& denom, const at::Tensor& row_argmax, double scale, double eps,
    bool need_dpolicy);

}  // namespace cpu
}  // namespace fastvit_kernels
