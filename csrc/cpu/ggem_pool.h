// Torch-facing CPU entry points of the GGeM pooling op (the backend contract of
// fastvit_kernels/reference/ggem_pool.py: forward / backward).
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace fastvit_kernels {
namespace cpu {

// x [B, N, C] (any strides), p [groups] -> (y [B, C] in x's dtype, log_mean [B, C] fp32)
std::tuple<at::Tensor, at::Tensor> ggem_pool_forward(const at::Tensor& x, const at::Tensor& p,
                                                     int64_t groups, double eps, bool interleaved,
                                                     int64_t num_prefix_tokens);

// -> (dx [B, N, C] contiguous in x's dtype, zero on the prefix rows; dp [groups] in p's dtype)
std::tuple<at::Tensor, at::Tensor> ggem_pool_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                      const at::Tensor& p, const at::Tensor& log_mean,
                                                      int64_t groups, double eps, bool interleaved,
                                                      int64_t num_prefix_tokens);

}  // namespace cpu
}  // namespace fastvit_kernels
