// Torch-facing CPU entry points of the bias-attention op (the backend contract of
// fastvit_kernels/reference/bias_attention.py: forward / backward).
#pragma once

#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastvit_kernels {
namespace cpu {

// -> (out [B,H,Nq,Dv] over [B,Nq,H,Dv] memory, o_pre (same, or 0-element), lse [B,H,Nq] fp32)
std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& index, double scale,
    const std::string& activation, bool save_pre_activation);

// -> (dq, dk, dv over [B,N,H,D] memory, dtable [H,T] in table's dtype or 0-element)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bias_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& index,
    const at::Tensor& o_pre, const at::Tensor& lse, double scale, const std::string& activation);

}  // namespace cpu
}  // namespace fastvit_kernels
