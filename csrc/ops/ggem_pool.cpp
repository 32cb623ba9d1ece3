// Torch-facing half of the CPU GGeM pooling op (docs/ggem_pool.md): argument checks, output
// allocation, the per-channel exponents, the work split, the kernels of the ISA chosen at run time
// (kernels/ggem_pool.h, through ops/dispatch.h), the deterministic reduction of dp, and the op's
// registration with PyTorch's dispatcher. The contract is the docstring of
// fastvit_kernels/reference/ggem_pool.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <utility>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "kernels/ggem_pool.h"
#include "ops/autograd.h"
#include "ops/checks.h"
#include "ops/common.h"  // poisoned(): NaN-filled outputs under FASTVIT_KERNELS_POISON=1
#include "ops/dispatch.h"

namespace fastvit_kernels {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Argument checks (the shared ones are in ops/checks.h)
// ---------------------------------------------------------------------------------------------

// x [B, N, C] float32/bfloat16/float16 on the CPU, p [groups] > 0 in x's dtype or float32.
void check_inputs(const char* fn, const at::Tensor& x, const at::Tensor& p, int64_t groups,
                  double eps, int64_t prefix) {
  TORCH_CHECK(x.defined() && p.defined(), fn, ": x and p must be defined");
  check_cpu(fn, "x", x);
  check_cpu(fn, "p", p);
  check_dims(fn, "x", x, 3, "[B, N, C]");
  check_float_dtype(fn, "x", x);
  check_param_dtype(fn, "p", p, x.scalar_type(), "x");
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
  // The message is the one the Python backends give (ops/ggem_pool.py).
  float low = src[0], high = src[0];
  bool valid = true;
  for (int64_t g = 0; g < G; ++g) {
    valid = valid && std::isfinite(src[g]) && src[g] > 0.0f;
    low = std::min(low, src[g]);
    high = std::max(high, src[g]);
  }
  TORCH_CHECK_VALUE(valid, "ggem_pool: every p must be finite and > 0, got values from ", low,
                    " to ", high);
  at::Tensor pc = at::empty({C}, p32.options());
  float* dst = pc.data_ptr<float>();
  const int64_t per_group = C / G;
  for (int64_t c = 0; c < C; ++c) dst[c] = src[interleaved ? c % G : c / per_group];
  return pc;
}

// ---------------------------------------------------------------------------------------------
// Work split and kernel arguments
// ---------------------------------------------------------------------------------------------

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
  run_tasks(&KernelTable::ggem_pool_forward, a, B * a.c_tasks);
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
    check_defined_on_cpu(fn, name, t);
    check_shape(fn, name, t, {B, C}, "[B, C]");
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
  run_tasks(&KernelTable::ggem_pool_backward, a, B * a.c_tasks);

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

// ---------------------------------------------------------------------------------------------
// Autograd (ops/autograd.h; the Python backends' twin is in fastvit_kernels/ops/ggem_pool.py)
// ---------------------------------------------------------------------------------------------

class GGeMPoolFunction : public torch::autograd::Function<GGeMPoolFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& x, const at::Tensor& p,
                                                int64_t groups, double eps, bool interleaved,
                                                int64_t num_prefix_tokens) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = native_op<decltype(ggem_pool_forward)>("fastvit_kernels::ggem_pool_forward");
    auto [y, log_mean] = op.call(x, p, groups, eps, interleaved, num_prefix_tokens);
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["interleaved"] = interleaved;
    ctx->saved_data["num_prefix_tokens"] = num_prefix_tokens;
    ctx->save_for_backward({x, p, log_mean});
    ctx->mark_non_differentiable({log_mean});
    ctx->set_materialize_grads(false);  // backward fills a missing output gradient itself
    return {y, log_mean};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &log_mean = saved[2];
    const at::Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(log_mean, x.options());
    static const auto op = native_op<decltype(ggem_pool_backward)>("fastvit_kernels::ggem_pool_backward");
    auto [dx, dp] = op.call(grad_y, x, saved[1], log_mean, ctx->saved_data["groups"].toInt(),
                            ctx->saved_data["eps"].toDouble(), ctx->saved_data["interleaved"].toBool(),
                            ctx->saved_data["num_prefix_tokens"].toInt());
    return {dx, dp, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> ggem_pool_forward_autograd(const at::Tensor& x, const at::Tensor& p,
                                                              int64_t groups, double eps, bool interleaved,
                                                              int64_t num_prefix_tokens) {
  auto out = GGeMPoolFunction::apply(x, p, groups, eps, interleaved, num_prefix_tokens);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace cpu
}  // namespace fastvit_kernels

// ---------------------------------------------------------------------------------------------
// Registration: torch.ops.fastvit_kernels.ggem_pool_forward / _backward, the C++ CPU kernels of the
// op and their autograd (the Autograd section above); the fake (meta) implementations are registered by
// fastvit_kernels/ops/ggem_pool.py.
// ---------------------------------------------------------------------------------------------

TORCH_LIBRARY_FRAGMENT(fastvit_kernels, m) {
  m.set_python_module("fastvit_kernels.ops.ggem_pool");  // registers the fake implementations
  // -> (y [B, C] in x's dtype, log_mean [B, C] fp32)
  m.def("ggem_pool_forward(Tensor x, Tensor p, int groups, float eps, bool interleaved, "
        "int num_prefix_tokens) -> (Tensor, Tensor)");
  // -> (dx, dp)
  m.def("ggem_pool_backward(Tensor grad_y, Tensor x, Tensor p, Tensor log_mean, int groups, "
        "float eps, bool interleaved, int num_prefix_tokens) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvit_kernels, CPU, m) {
  m.impl("ggem_pool_forward", &fastvit_kernels::cpu::ggem_pool_forward);
  m.impl("ggem_pool_backward", &fastvit_kernels::cpu::ggem_pool_backward);
}

TORCH_LIBRARY_IMPL(fastvit_kernels, Autograd, m) {
  m.impl("ggem_pool_forward", &fastvit_kernels::cpu::ggem_pool_forward_autograd);
}
