// Torch-facing half of the CPU policy-attention op (DynamicViT's softmax_with_policy attention,
// docs/policy_attention.md): argument checks, output allocation in the contract's layouts, the
// per-batch column order of the keys (kept first), the work split, the kernels of the ISA chosen
// at run time (kernels/policy_attention.h, through ops/dispatch.h), and the op's registration
// with PyTorch's dispatcher. The contract is the docstring of
// fastvit_kernels/reference/policy_attention.py.
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

#include "kernels/policy_attention.h"
#include "ops/autograd.h"
#include "ops/checks.h"
#include "ops/common.h"
#include "ops/dispatch.h"

namespace fastvit_kernels {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// Argument checks (the shared ones are in ops/checks.h)
// ---------------------------------------------------------------------------------------------

// q, k, v (and grad_out, out): [B, H, N, D], one floating dtype, q's shape.
void check_like_q(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& q) {
  check_cpu_4d(fn, name, t);
  check_dtype(fn, name, t, q.scalar_type(), "q");
  TORCH_CHECK(t.sizes() == q.sizes(), fn, ": ", name, " must have q's shape ", q.sizes(),
              " [B, H, N, D], got ", t.sizes());
}

void check_qkv(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cpu_4d(fn, "q", q);
  check_float_dtype(fn, "q", q);
  check_like_q(fn, "k", k, q);
  check_like_q(fn, "v", v, q);
  TORCH_CHECK(q.size(2) >= 1, fn, ": q needs at least one token (N >= 1), got shape ", q.sizes());
  TORCH_CHECK(q.size(3) >= 1, fn, ": q needs a head width D >= 1, got shape ", q.sizes());
  TORCH_CHECK(q.size(2) <= kPolicyMaxTokens, fn, ": N must be at most ", kPolicyMaxTokens,
              ", got shape ", q.sizes());
}

void check_policy(const char* fn, const at::Tensor& policy, const at::Tensor& q) {
  check_defined_cpu(fn, "policy", policy);
  check_float32(fn, "policy", policy);
  TORCH_CHECK(policy.dim() == 2 && policy.size(0) == q.size(0) && policy.size(1) == q.size(2), fn,
              ": policy must have shape [B, N] = [", q.size(0), ", ", q.size(2), "] (from q), got ",
              policy.sizes());
  TORCH_CHECK(policy.is_contiguous(), fn, ": policy must be contiguous, got strides ",
              policy.strides());
}

void check_scalars(const char* fn, double scale, double eps) {
  check_scale(fn, scale);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, fn, ": eps must be finite and >= 0, got ",
                    eps);
}

// [B, H, N] statistics of the forward, as passed back to the backward.
void check_stat(const char* fn, const char* name, const at::Tensor& t, at::ScalarType want,
                const at::Tensor& q) {
  check_defined_on_cpu(fn, name, t);
  TORCH_CHECK(t.scalar_type() == want, fn, ": ", name, " must be ", want, ", got ",
              t.scalar_type());
  check_shape(fn, name, t, {q.size(0), q.size(1), q.size(2)}, "[B, H, N]");
}

// ---------------------------------------------------------------------------------------------
// Layouts and the column order
// ---------------------------------------------------------------------------------------------

// Per batch: the keys with policy != 0 (kept) in ascending order, then the others (see
// PolicyAttentionInputs).
struct ColumnOrder {
  at::Tensor perm, pos, n_kept, pk, col_mask;  // int32 [B,N], [B,N], [B]; fp32 [B,ld], [ld]
  int64_t ld = 0;
};

ColumnOrder column_order(const at::Tensor& policy, int64_t B, int64_t N) {
  ColumnOrder o;
  o.ld = round_up(N, kPolicyRowAlign);
  const auto i32 = policy.options().dtype(at::kInt);
  o.perm = at::empty({B, N}, i32);
  o.pos = at::empty({B, N}, i32);
  o.n_kept = at::empty({B}, i32);
  o.pk = at::zeros({B, o.ld}, policy.options());
  o.col_mask = at::empty({o.ld}, policy.options());
  float* mask = o.col_mask.data_ptr<float>();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < o.ld; ++c) mask[c] = c < N ? 0.0f : neg_inf;
  const float* p = policy.data_ptr<float>();
  int32_t* perm = o.perm.data_ptr<int32_t>();
  int32_t* pos = o.pos.data_ptr<int32_t>();
  int32_t* n_kept = o.n_kept.data_ptr<int32_t>();
  float* pk = o.pk.data_ptr<float>();
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / N), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* pb = p + b * N;
      int32_t* pe = perm + b * N;
      int32_t* po = pos + b * N;
      float* pkb = pk + b * o.ld;
      int32_t c = 0;
      for (int64_t j = 0; j < N; ++j) {
        if (pb[j] != 0.0f) {  // NaN counts as kept, so it reaches the outputs
          pkb[c] = pb[j];
          po[j] = c;
          pe[c++] = static_cast<int32_t>(j);
        }
      }
      n_kept[b] = c;
      for (int64_t j = 0; j < N; ++j) {
        if (pb[j] == 0.0f) {
          po[j] = c;
          pe[c++] = static_cast<int32_t>(j);
        }
      }
    }
  });
  return o;
}

// The part of the kernel arguments forward and backward share.
void fill_inputs(PolicyAttentionInputs& a, const at::Tensor& q, const at::Tensor& k,
                 const at::Tensor& v, const ColumnOrder& cols, double scale, double eps) {
  a.B = q.size(0); a.H = q.size(1); a.N = q.size(2); a.D = q.size(3);
  a.dtype = elem_type(q.scalar_type());
  a.scale = static_cast<float>(scale);
  a.eps = static_cast<float>(eps);
  a.q = q.data_ptr(); copy_strides(q, a.q_stride);
  a.k = k.data_ptr(); copy_strides(k, a.k_stride);
  a.v = v.data_ptr(); copy_strides(v, a.v_stride);
  a.ld = cols.ld;
  a.perm = cols.perm.data_ptr<int32_t>();
  a.pos = cols.pos.data_ptr<int32_t>();
  a.n_kept = cols.n_kept.data_ptr<int32_t>();
  a.pk = cols.pk.data_ptr<float>();
  a.col_mask = cols.col_mask.data_ptr<float>();
}

// ---------------------------------------------------------------------------------------------
// Work split (the forward's is attention_query_block() of ops/common.h)
// ---------------------------------------------------------------------------------------------

// Backward tasks are (b, h), so dk / dv rows have one owner and no atomics are needed; queries go
// in blocks of kBackwardQueryBlock rows so that E / A / dA for a block stay in L1 / L2.
constexpr int64_t kBackwardQueryBlock = 32;

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& policy,
    double scale, double eps) {
  constexpr const char* fn = "policy_attention_forward";
  check_qkv(fn, q, k, v);
  check_policy(fn, policy, q);
  check_scalars(fn, scale, eps);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);

  at::Tensor out = empty_bhnd(B, H, N, D, q.options());
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor row_max = poisoned(at::empty({B, H, N}, f32));
  at::Tensor denom = poisoned(at::empty({B, H, N}, f32));
  at::Tensor row_argmax = poisoned_index(at::empty({B, H, N}, q.options().dtype(at::kInt)));
  if (B * H == 0) return {out, row_max, denom, row_argmax};

  const ColumnOrder cols = column_order(policy, B, N);
  PolicyAttentionFwdArgs a{};
  fill_inputs(a, q, k, v, cols, scale, eps);
  a.out = out.data_ptr(); copy_strides(out, a.out_stride);
  a.row_max = row_max.data_ptr<float>(); copy_strides(row_max, a.row_max_stride);
  a.denom = denom.data_ptr<float>(); copy_strides(denom, a.denom_stride);
  a.row_argmax = row_argmax.data_ptr<int32_t>(); copy_strides(row_argmax, a.row_argmax_stride);
  a.q_block = attention_query_block(B * H, N);
  a.q_blocks = (N + a.q_block - 1) / a.q_block;
  run_tasks(&KernelTable::policy_attention_forward, a, B * H * a.q_blocks);
  return {out, row_max, denom, row_argmax};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& policy, const at::Tensor& out, const at::Tensor& row_max,
    const at::Tensor& denom, const at::Tensor& row_argmax, double scale, double eps,
    bool need_dpolicy) {
  constexpr const char* fn = "policy_attention_backward";
  check_qkv(fn, q, k, v);
  check_like_q(fn, "grad_out", grad_out, q);
  check_like_q(fn, "out", out, q);
  check_policy(fn, policy, q);
  check_scalars(fn, scale, eps);
  check_stat(fn, "row_max", row_max, at::kFloat, q);
  check_stat(fn, "denom", denom, at::kFloat, q);
  check_stat(fn, "row_argmax", row_argmax, at::kInt, q);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  {
    // The kernels index with row_argmax: every value must be a key.
    const at::Tensor am = row_argmax.contiguous();
    const int32_t* p = am.data_ptr<int32_t>();
    const int64_t n = am.numel();
    int64_t bad = -1;
    for (int64_t x = 0; x < n && bad < 0; ++x)
      if (p[x] < 0 || p[x] >= N) bad = x;
    TORCH_CHECK_INDEX(bad < 0, fn, ": row_argmax values must lie in [0, N) with N = ", N,
                      "; got ", bad >= 0 ? p[bad] : 0, " at flat index ", bad);
  }

  const auto opt = q.options();
  at::Tensor dq = poisoned(at::empty({B, H, N, D}, opt));
  at::Tensor dk = poisoned(at::empty({B, H, N, D}, opt));
  at::Tensor dv = poisoned(at::empty({B, H, N, D}, opt));
  const auto f32 = opt.dtype(at::kFloat);
  at::Tensor partial = need_dpolicy && B * H > 0 ? at::empty({B, H, N}, f32) : at::Tensor();
  if (B * H > 0) {
    const ColumnOrder cols = column_order(policy, B, N);
    PolicyAttentionBwdArgs a{};
    fill_inputs(a, q, k, v, cols, scale, eps);
    a.grad_out = grad_out.data_ptr(); copy_strides(grad_out, a.grad_out_stride);
    a.out = out.data_ptr(); copy_strides(out, a.out_stride);
    a.row_max = row_max.data_ptr<float>(); copy_strides(row_max, a.row_max_stride);
    a.denom = denom.data_ptr<float>(); copy_strides(denom, a.denom_stride);
    a.row_argmax = row_argmax.data_ptr<int32_t>(); copy_strides(row_argmax, a.row_argmax_stride);
    a.dq = dq.data_ptr(); copy_strides(dq, a.dq_stride);
    a.dk = dk.data_ptr(); copy_strides(dk, a.dk_stride);
    a.dv = dv.data_ptr(); copy_strides(dv, a.dv_stride);
    a.dpolicy_partial = need_dpolicy ? partial.data_ptr<float>() : nullptr;
    a.q_block = kBackwardQueryBlock;
    run_tasks(&KernelTable::policy_attention_backward, a, B * H);
  }
  if (!need_dpolicy || B * H == 0) return {dq, dk, dv, at::zeros({B, N}, f32)};

  // dpolicy[b, j] = sum over h of the per-head partials, h in order: the same bits for any
  // thread count.
  at::Tensor dpolicy = poisoned(at::empty({B, N}, f32));
  const float* part = partial.data_ptr<float>();
  float* dp = dpolicy.data_ptr<float>();
  at::parallel_for(0, B * N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t x = begin; x < end; ++x) {
      const int64_t b = x / N, j = x % N;
      float s = 0.0f;
      for (int64_t h = 0; h < H; ++h) s += part[(b * H + h) * N + j];
      dp[x] = s;
    }
  });
  return {dq, dk, dv, dpolicy};
}

// ---------------------------------------------------------------------------------------------
// Autograd (ops/autograd.h; the Python backends' twin is in fastvit_kernels/ops/policy_attention.py)
// ---------------------------------------------------------------------------------------------

class PolicyAttentionFunction : public torch::autograd::Function<PolicyAttentionFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& policy,
                                                double scale, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = native_op<decltype(policy_attention_forward)>("fastvit_kernels::policy_attention_forward");
    auto [out, row_max, denom, row_argmax] = op.call(q, k, v, policy, scale, eps);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["eps"] = eps;
    ctx->save_for_backward({q, k, v, policy, out, row_max, denom, row_argmax});
    ctx->mark_non_differentiable({row_max, denom, row_argmax});
    ctx->set_materialize_grads(false);  // backward fills a missing output gradient itself
    return {out, row_max, denom, row_argmax};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(saved[4]);
    // The policy's gradient needs every key's weight, dropped ones too: only when it is wanted.
    const bool need_dpolicy = ctx->needs_input_grad(3);
    static const auto op = native_op<decltype(policy_attention_backward)>("fastvit_kernels::policy_attention_backward");
    auto [dq, dk, dv, dpolicy] = op.call(grad_out, saved[0], saved[1], saved[2], saved[3], saved[4],
                                         saved[5], saved[6], saved[7], ctx->saved_data["scale"].toDouble(),
                                         ctx->saved_data["eps"].toDouble(), need_dpolicy);
    return {dq, dk, dv, need_dpolicy ? dpolicy : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> policy_attention_forward_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& policy,
    double scale, double eps) {
  auto out = PolicyAttentionFunction::apply(q, k, v, policy, scale, eps);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace cpu
}  // namespace fastvit_kernels

// ---------------------------------------------------------------------------------------------
// Registration: torch.ops.fastvit_kernels.policy_attention_forward / _backward, the C++ CPU kernels of the
// op and their autograd (the Autograd section above); the fake (meta) implementations are registered by
// fastvit_kernels/ops/policy_attention.py.
// ---------------------------------------------------------------------------------------------

TORCH_LIBRARY_FRAGMENT(fastvit_kernels, m) {
  m.set_python_module("fastvit_kernels.ops.policy_attention");  // registers the fake implementations
  // -> (out [B,H,N,D] over [B,N,H,D] memory, row_max, denom [B,H,N] fp32, row_argmax [B,H,N] int32)
  m.def("policy_attention_forward(Tensor q, Tensor k, Tensor v, Tensor policy, float scale, "
        "float eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // -> (dq, dk, dv, dpolicy [B,N] fp32, zeros unless need_dpolicy)
  m.def("policy_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor policy, "
        "Tensor out, Tensor row_max, Tensor denom, Tensor row_argmax, float scale, float eps, "
        "bool need_dpolicy) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvit_kernels, CPU, m) {
  m.impl("policy_attention_forward", &fastvit_kernels::cpu::policy_attention_forward);
  m.impl("policy_attention_backward", &fastvit_kernels::cpu::policy_attention_backward);
}

TORCH_LIBRARY_IMPL(fastvit_kernels, Autograd, m) {
  m.impl("policy_attention_forward", &fastvit_kernels::cpu::policy_attention_forward_autograd);
}
