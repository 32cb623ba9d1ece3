// Torch-facing half of the CPU GGeM pooling op: argument checks, output allocation, the
// per-channel exponents, the work split, the call into the ISA kernel chosen at run time
// (ggem_pool_{avx512,avx2,scalar}.cpp) and the deterministic reduction of dp. The contract is the
// docstring of fastvit_kernels/reference/ggem_pool.py.
#include "ggem_pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "common.h"  // poisoned(): NaN-filled outputs under FASTVIT_KERNELS_POISON=1
#include "ggem_pool_args.h"
#include "isa.h"
#include "isa_config.h"

namespace fastvit_kernels {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------

// x [B, N, C] float32/bfloat16/float16 on the CPU, p [groups] > 0 in x's dtype or float32.
void check_inputs(const char* fn, const at::Tensor& x, const at::Tensor& p, int64_t groups,
                  double eps, int64_t prefix) {
  TORCH_CHECK(x.defined() && p.defined(), fn, ": x and p must be defined");
  TORCH_CHECK(x.device().is_cpu(), fn, ": x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(p.device().is_cpu(), fn, ": p must be a CPU tensor, got device ", p.device());
  TORCH_CHECK(x.dim() == 3, fn, ": x must be 3-D [B, N, C], got shape ", x.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, fn,
              ": x must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(p.scalar_type() == dt || p.scalar_type() == at::kFloat, fn,
              ": p must be float32 or x's dtype ", dt, ", got ", p.scalar_type());
  TORCH_CHECK_VALUE(groups >= 1, fn, ": groups must be >= 1, got ", groups);
  TORCH_CHECK_VALUE(x.size(2) % groups == 0, fn, ": x.shape[2] (C) must be divisible by groups = ",
                    groups, ", got shape ", x.sizes());
  TORCH_CHECK_VALUE(p.dim() == 1 && p.size(0) == groups, fn, ": p must have shape [groups] = [",
                    groups, "], got ", p.sizes());
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= std::numeric_limits<float>::min(), fn,
                    ": eps must be finite and >= ", std::numeric_limits<float>::min(),
                    " (float32's smallest normal), got ", eps);
  TORCH_CHECK_VALUE(prefix >= 0 && prefix < x.size(1), fn,
                    ": num_prefix_tokens must be in [0, N = ", x.size(1), "), got ", prefix);
}

// p_c = p[g(c)] as fp32 [C]: g(c) = c // (C / G) (contiguous) or c % G (interleaved). Also checks
// that every p is finite and > 0.
at::Tensor per_channel_p(const char* fn, const at::Tensor& p, int64_t C, bool interleaved) {
  const at::Tensor p32 = p.to(at::kFloat).contiguous();
  const float* src = p32.data_ptr<float>();
  const int64_t G = p32.size(0);
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK_VALUE(std::isfinite(src[g]) && src[g] > 0.0f, fn,
                      ": every p must be finite and > 0, got p[", g, "] = ", src[g]);
  }
  at::Tensor pc = at::empty({C}, p32.options());
  float* dst = pc.data_ptr<float>();
  const int64_t per_group = C / G;
  for (int64_t c = 0; c < C; ++c) dst[c] = src[interleaved ? c % G : c / per_group];
  return pc;
}

// ---------------------------------------------------------------------------------------------
// Kernel selection and work split
// ---------------------------------------------------------------------------------------------

using FwdKernel = void (*)(const GGeMPoolFwdArgs&, int64_t, int64_t);
using BwdKernel = void (*)(const GGeMPoolBwdArgs&, int64_t, int64_t);

FwdKernel forward_kernel(CpuIsa isa) {
  switch (isa) {
#if FVK_X86_KERNELS
    case CpuIsa::kAvx512: return avx512::ggem_pool_forward;
    case CpuIsa::kAvx2: return avx2::ggem_pool_forward;
#endif
    default: return scalar::ggem_pool_forward;
  }
}

BwdKernel backward_kernel(CpuIsa isa) {
  switch (isa) {
#if FVK_X86_KERNELS
    case CpuIsa::kAvx512: return avx512::ggem_pool_backward;
    case CpuIsa::kAvx2: return avx2::ggem_pool_backward;
#endif
    default: return scalar::ggem_pool_backward;
  }
}

// Tasks are (b, block of channels). Whole rows (c_block = C) while the batch alone gives every
// thread several tasks; otherwise (small B, e.g. inference at B = 1) channels are split into
// blocks of at least kMinChannelBlock so that every core works. Results do not depend on the split.
constexpr int64_t kTasksPerThread = 4;
constexpr int64_t kMinChannelBlock = 64;

void split_work(GGeMPoolInputs& a) {
  const int64_t want = kTasksPerThread * std::max<int64_t>(1, at::get_num_threads());
  const int64_t blocks = std::max<int64_t>(1, (want + a.B - 1) / std::max<int64_t>(1, a.B));
  int64_t block = (a.C + blocks - 1) / blocks;
  block = std::max(block, kMinChannelBlock);
  block = (block + kGGeMChannelAlign - 1) / kGGeMChannelAlign * kGGeMChannelAlign;
  a.c_block = std::max<int64_t>(kGGeMChannelAlign, std::min(block, (a.C + kGGeMChannelAlign - 1) / kGGeMChannelAlign * kGGeMChannelAlign));
  a.c_tasks = (a.C + a.c_block - 1) / a.c_block;
}

// Fills what forward and backward share. `x` must have channel stride 1.
void fill_inputs(GGeMPoolInputs& a, const at::Tensor& x, const at::Tensor& pc, double eps,
                 int64_t prefix) {
  a.B = x.size(0); a.N = x.size(1); a.C = x.size(2); a.prefix = prefix;
  a.dtype = elem_type(x.scalar_type());
  a.eps = static_cast<float>(eps);
  a.log_count = static_cast<float>(std::log(static_cast<double>(a.N - prefix)));
  a.p = pc.data_ptr<float>();
  a.x = x.data_ptr(); a.x_stride_b = x.stride(0); a.x_stride_n = x.stride(1);
  split_work(a);
}

// Channels must be unit-stride for the vector loads; any batch / token strides are fine (a slice
// such as x[:, 1:] or a window of a bigger buffer is read in place).
at::Tensor channels_contiguous(const at::Tensor& x) {
  return x.size(2) <= 1 || x.stride(2) == 1 ? x : x.contiguous();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> ggem_pool_forward(const at::Tensor& x_in, const at::Tensor& p,
                                                     int64_t groups, double eps, bool interleaved,
                                                     int64_t num_prefix_tokens) {
  constexpr const char* fn = "ggem_pool_forward";
  check_inputs(fn, x_in, p, groups, eps, num_prefix_tokens);
  const int64_t B = x_in.size(0), C = x_in.size(2);
  at::Tensor y = poisoned(at::empty({B, C}, x_in.options()));
  at::Tensor log_mean = poisoned(at::empty({B, C}, x_in.options().dtype(at::kFloat)));
  const at::Tensor pc = per_channel_p(fn, p, C, interleaved);
  if (B * C == 0) return {y, log_mean};

  const at::Tensor x = channels_contiguous(x_in);
  GGeMPoolFwdArgs a{};
  fill_inputs(a, x, pc, eps, num_prefix_tokens);
  a.y = y.data_ptr();
  a.log_mean = log_mean.data_ptr<float>();
  const FwdKernel kernel = forward_kernel(current_cpu_isa());
  at::parallel_for(0, B * a.c_tasks, 1, [&](int64_t begin, int64_t end) { kernel(a, begin, end); });
  return {y, log_mean};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> ggem_pool_backward(const at::Tensor& grad_y, const at::Tensor& x_in,
                                                      const at::Tensor& p, const at::Tensor& log_mean_in,
                                                      int64_t groups, double eps, bool interleaved,
                                                      int64_t num_prefix_tokens) {
  constexpr const char* fn = "ggem_pool_backward";
  check_inputs(fn, x_in, p, groups, eps, num_prefix_tokens);
  const int64_t B = x_in.size(0), N = x_in.size(1), C = x_in.size(2);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_y", grad_y},
                                std::pair<const char*, const at::Tensor&>{"log_mean", log_mean_in}}) {
    TORCH_CHECK(t.defined() && t.device().is_cpu(), fn, ": ", name, " must be a CPU tensor");
    TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == C, fn, ": ", name,
                " must have shape [B, C] = [", B, ", ", C, "], got ", t.sizes());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), fn, ": ", name, " must be floating point, got ",
                t.scalar_type());
  }
  at::Tensor dx = poisoned(at::empty({B, N, C}, x_in.options()));
  const at::Tensor pc = per_channel_p(fn, p, C, interleaved);
  if (B * C == 0) return {dx, at::zeros({groups}, p.options())};

  // grad_y and log_mean are [B, C]: tiny next to x, so they are made dense fp32 here.
  const at::Tensor gy = grad_y.to(at::kFloat).contiguous();
  const at::Tensor log_mean = log_mean_in.to(at::kFloat).contiguous();
  at::Tensor dydp = poisoned(at::empty({B, C}, x_in.options().dtype(at::kFloat)));
  const at::Tensor x = channels_contiguous(x_in);
  GGeMPoolBwdArgs a{};
  fill_inputs(a, x, pc, eps, num_prefix_tokens);
  a.grad_y = gy.data_ptr<float>();
  a.log_mean = log_mean.data_ptr<float>();
  a.dx = dx.data_ptr();
  a.dydp = dydp.data_ptr<float>();
  const BwdKernel kernel = backward_kernel(current_cpu_isa());
  at::parallel_for(0, B * a.c_tasks, 1, [&](int64_t begin, int64_t end) { kernel(a, begin, end); });

  // dp[g] = Σ_{c in g} Σ_b dydp[b, c], summed in this fixed order (deterministic for any thread
  // count): first over b for each channel, then over the channels of each group.
  at::Tensor per_channel = at::empty({C}, dydp.options());
  const float* d = dydp.data_ptr<float>();
  float* pcs = per_channel.data_ptr<float>();
  at::parallel_for(0, C, 256, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) pcs[c] = 0.0f;
    for (int64_t b = 0; b < B; ++b) {
      const float* row = d + b * C;
      for (int64_t c = begin; c < end; ++c) pcs[c] += row[c];
    }
  });
  at::Tensor dp32 = at::zeros({groups}, dydp.options());
  float* dp = dp32.data_ptr<float>();
  const int64_t per_group = C / groups;
  for (int64_t c = 0; c < C; ++c) dp[interleaved ? c % groups : c / per_group] += pcs[c];
  return {dx, dp32.to(p.scalar_type())};
}

}  // namespace cpu
}  // namespace fastvit_kernels
