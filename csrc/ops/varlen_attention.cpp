// Torch-facing half of the CPU varlen-attention op (docs/varlen_attention.md): argument checks,
// output allocation in the contract's layouts, the cost-balanced work split, the kernels of the
// ISA chosen at run time (kernels/varlen_attention.h, through ops/dispatch.h), and the op's
// registration with PyTorch's dispatcher. The contract is the docstring of
// fastvit_kernels/reference/varlen_attention.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "kernels/varlen_attention.h"
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

// `name` has q's dtype and shape.
void check_like_q(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& q) {
  check_cpu_nd(fn, name, t, 3, "[T, H, D]");
  check_dtype(fn, name, t, q.scalar_type(), "q");
  TORCH_CHECK(t.sizes() == q.sizes(), fn, ": ", name, " must have q's shape [T, H, D] = ",
              q.sizes(), ", got ", t.sizes());
}

void check_qkv(const char* fn, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_cpu_nd(fn, "q", q, 3, "[T, H, D]");
  check_float_dtype(fn, "q", q);
  check_like_q(fn, "k", k, q);
  check_like_q(fn, "v", v, q);
  TORCH_CHECK(q.size(1) >= 1, fn, ": q needs at least one head (H >= 1), got shape ", q.sizes());
  TORCH_CHECK(q.size(2) >= 1 && q.size(2) <= kVarlenMaxHeadDim, fn,
              ": the head width D (q.shape[2]) must be in [1, ", kVarlenMaxHeadDim, "], got shape ",
              q.sizes());
}

// cu_seqlens: int64, contiguous CPU [num_seqs + 1], 0 = cu[0] < cu[1] < ... < cu[num_seqs] = T
// Returns the longest segment, which max_seqlen must cover.
int64_t check_cu_seqlens(const char* fn, const at::Tensor& cu, int64_t T, int64_t max_seqlen) {
  check_defined_cpu(fn, "cu_seqlens", cu);
  TORCH_CHECK(cu.scalar_type() == at::kLong, fn, ": cu_seqlens must be int64, got ",
              cu.scalar_type());
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, fn,
              ": cu_seqlens must be 1-D [num_images + 1] with at least one element, got shape ",
              cu.sizes());
  TORCH_CHECK(cu.is_contiguous(), fn, ": cu_seqlens must be contiguous, got strides ",
              cu.strides());
  // The messages are the ones the Python backends give (ops/varlen_attention.py).
  const int64_t* c = cu.data_ptr<int64_t>();
  const int64_t n = cu.size(0);
  TORCH_CHECK_VALUE(c[0] == 0, "varlen_attention: cu_seqlens[0] must be 0, got ", c[0]);
  int64_t longest = 0;
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(c[i] > c[i - 1], "varlen_attention: cu_seqlens must be strictly increasing "
                      "(every image keeps >= 1 token), got cu_seqlens[", i - 1, "] = ", c[i - 1],
                      " >= cu_seqlens[", i, "] = ", c[i]);
    longest = std::max(longest, c[i] - c[i - 1]);
  }
  TORCH_CHECK_VALUE(c[n - 1] == T, "varlen_attention: cu_seqlens[-1] must be the number of packed "
                    "tokens q.shape[0] = ", T, ", got ", c[n - 1]);
  TORCH_CHECK_VALUE(max_seqlen >= longest, "varlen_attention: max_seqlen must be >= the longest "
                    "segment (", longest, "), got ", max_seqlen);
  return longest;
}

// The part of the kernel arguments forward and backward share.
void fill_inputs(VarlenAttentionInputs& a, const at::Tensor& q, const at::Tensor& k,
                 const at::Tensor& v, const at::Tensor& cu, int64_t longest, double scale) {
  a.T = q.size(0); a.H = q.size(1); a.D = q.size(2);
  a.num_seqs = cu.size(0) - 1;
  a.max_seqlen = longest;
  a.dtype = elem_type(q.scalar_type());
  a.scale = static_cast<float>(scale);
  a.cu_seqlens = cu.data_ptr<int64_t>();
  a.q = q.data_ptr(); copy_strides(q, a.q_stride);
  a.k = k.data_ptr(); copy_strides(k, a.k_stride);
  a.v = v.data_ptr(); copy_strides(v, a.v_stride);
}

// ---------------------------------------------------------------------------------------------
// Work split
// ---------------------------------------------------------------------------------------------

// Forward tasks are (segment, head, block of query rows). Segments differ in length (cost ~ n^2
// per head), so a (segment, head) is split into query blocks only as far as needed for tasks of at
// most 1 / kTasksPerThread of a thread's share: a long segment next to short ones, or a single
// image, still spreads over every core. Blocks are whole kMinQueryBlock multiples (each split
// repacks k / v). Each row's result is independent of the split, so outputs are bitwise the same
// for any thread count.
constexpr int64_t kMinQueryBlock = 16;
constexpr int64_t kTasksPerThread = 8;
// Backward: P / dS of kBackwardQueryBlock query rows stay in L1 / L2.
constexpr int64_t kBackwardQueryBlock = 32;

// Modelled cost of `rows` query rows against n keys (the products, plus per-row softmax / load
// overhead and the per-task k / v packing).
int64_t task_cost(int64_t rows, int64_t n) { return rows * (n + 16) + 2 * n; }

int64_t num_threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// Boundaries of `parts` contiguous task ranges of about equal modelled cost: part p is tasks
// [bounds[p], bounds[p + 1]).
std::vector<int64_t> balanced_bounds(const std::vector<int64_t>& cost, int64_t parts) {
  int64_t total = 0;
  for (int64_t c : cost) total += c;
  std::vector<int64_t> bounds(parts + 1, static_cast<int64_t>(cost.size()));
  bounds[0] = 0;
  int64_t acc = 0, p = 1;
  for (size_t i = 0; i < cost.size() && p < parts; ++i) {
    // Task i goes to the part its cost midpoint falls into.
    while (p < parts && 2 * acc + cost[i] > 2 * total * p / parts) bounds[p++] = static_cast<int64_t>(i);
    acc += cost[i];
  }
  return bounds;
}

// Runs the current ISA's `entry` over the tasks, one cost-balanced contiguous range per thread
// (instead of run_tasks()' equal task counts).
template <class Args>
void run_balanced(KernelFn<Args> KernelTable::*entry, const Args& a,
                  const std::vector<int64_t>& cost) {
  const KernelFn<Args> kernel = current_kernels().*entry;
  const int64_t parts = std::min<int64_t>(num_threads(), static_cast<int64_t>(cost.size()));
  if (parts <= 1) {
    kernel(a, 0, static_cast<int64_t>(cost.size()));
    return;
  }
  const std::vector<int64_t> bounds = balanced_bounds(cost, parts);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    if (bounds[begin] < bounds[end]) kernel(a, bounds[begin], bounds[end]);
  });
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> varlen_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    int64_t max_seqlen, double scale) {
  constexpr const char* fn = "varlen_attention_forward";
  check_qkv(fn, q, k, v);
  check_scale(fn, scale);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t longest = check_cu_seqlens(fn, cu_seqlens, T, max_seqlen);

  at::Tensor out = poisoned(at::empty({T, H, D}, q.options()));
  at::Tensor lse = poisoned(at::empty({T, H}, q.options().dtype(at::kFloat)));
  if (T == 0) return {out, lse};

  const int64_t S = cu_seqlens.size(0) - 1;
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t s = 0; s < S; ++s) total += H * task_cost(cu[s + 1] - cu[s], cu[s + 1] - cu[s]);
  const int64_t target = std::max<int64_t>(1, total / (kTasksPerThread * num_threads()));

  std::vector<VarlenTask> tasks;
  std::vector<int64_t> cost;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = cu[s + 1] - cu[s];
    const int64_t max_blocks = (n + kMinQueryBlock - 1) / kMinQueryBlock;
    const int64_t blocks =
        std::max<int64_t>(1, std::min(max_blocks, (task_cost(n, n) + target - 1) / target));
    const int64_t block = (n + blocks - 1) / blocks;
    const int64_t qb = std::min(n, (block + kMinQueryBlock - 1) / kMinQueryBlock * kMinQueryBlock);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < n; i += qb) {
        const int64_t e = std::min(n, i + qb);
        tasks.push_back({s, h, i, e});
        cost.push_back(task_cost(e - i, n));
      }
  }

  VarlenAttentionFwdArgs a{};
  fill_inputs(a, q, k, v, cu_seqlens, longest, scale);
  a.tasks = tasks.data();
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  run_balanced(&KernelTable::varlen_attention_forward, a, cost);
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    double scale) {
  constexpr const char* fn = "varlen_attention_backward";
  check_qkv(fn, q, k, v);
  check_like_q(fn, "grad_out", grad_out, q);
  check_like_q(fn, "out", out, q);
  check_scale(fn, scale);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  check_defined_on_cpu(fn, "lse", lse);
  check_float32(fn, "lse", lse);
  check_shape(fn, "lse", lse, {T, H}, "[T, H]");
  const int64_t longest = check_cu_seqlens(fn, cu_seqlens, T, max_seqlen);

  at::Tensor dq = poisoned(at::empty({T, H, D}, q.options()));
  at::Tensor dk = poisoned(at::empty({T, H, D}, q.options()));
  at::Tensor dv = poisoned(at::empty({T, H, D}, q.options()));
  if (T == 0) return {dq, dk, dv};

  // One task per (segment, head): dk / dv rows have a single owner (no atomics).
  const int64_t S = cu_seqlens.size(0) - 1;
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  std::vector<VarlenTask> tasks;
  std::vector<int64_t> cost;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t n = cu[s + 1] - cu[s];
    for (int64_t h = 0; h < H; ++h) {
      tasks.push_back({s, h, 0, n});
      cost.push_back(task_cost(n, n));
    }
  }

  VarlenAttentionBwdArgs a{};
  fill_inputs(a, q, k, v, cu_seqlens, longest, scale);
  a.tasks = tasks.data();
  a.grad_out = grad_out.data_ptr(); copy_strides(grad_out, a.grad_out_stride);
  a.out = out.data_ptr(); copy_strides(out, a.out_stride);
  a.lse = lse.data_ptr<float>(); copy_strides(lse, a.lse_stride);
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.q_block = kBackwardQueryBlock;
  run_balanced(&KernelTable::varlen_attention_backward, a, cost);
  return {dq, dk, dv};
}

// ---------------------------------------------------------------------------------------------
// Autograd (ops/autograd.h; the Python backends' twin is in fastvit_kernels/ops/varlen_attention.py)
// ---------------------------------------------------------------------------------------------

class VarlenAttentionFunction : public torch::autograd::Function<VarlenAttentionFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                int64_t max_seqlen, double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = native_op<decltype(varlen_attention_forward)>("fastvit_kernels::varlen_attention_forward");
    auto [out, lse] = op.call(q, k, v, cu_seqlens, max_seqlen, scale);
    ctx->saved_data["max_seqlen"] = max_seqlen;
    ctx->saved_data["scale"] = scale;
    ctx->save_for_backward({q, k, v, out, lse, cu_seqlens});
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);  // backward fills a missing output gradient itself
    return {out, lse};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(saved[3]);
    static const auto op = native_op<decltype(varlen_attention_backward)>("fastvit_kernels::varlen_attention_backward");
    auto [dq, dk, dv] = op.call(grad_out, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                                ctx->saved_data["max_seqlen"].toInt(), ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> varlen_attention_forward_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    int64_t max_seqlen, double scale) {
  auto out = VarlenAttentionFunction::apply(q, k, v, cu_seqlens, max_seqlen, scale);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace cpu
}  // namespace fastvit_kernels

// ---------------------------------------------------------------------------------------------
// Registration: torch.ops.fastvit_kernels.varlen_attention_forward / _backward, the C++ CPU kernels of the
// op and their autograd (the Autograd section above); the fake (meta) implementations are registered by
// fastvit_kernels/ops/varlen_attention.py.
// ---------------------------------------------------------------------------------------------

TORCH_LIBRARY_FRAGMENT(fastvit_kernels, m) {
  m.set_python_module("fastvit_kernels.ops.varlen_attention");  // registers the fake implementations
  // -> (out [T, H, D], lse [T, H] fp32)
  m.def("varlen_attention_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, "
        "int max_seqlen, float scale) -> (Tensor, Tensor)");
  // -> (dq, dk, dv)
  m.def("varlen_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor cu_seqlens, int max_seqlen, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvit_kernels, CPU, m) {
  m.impl("varlen_attention_forward", &fastvit_kernels::cpu::varlen_attention_forward);
  m.impl("varlen_attention_backward", &fastvit_kernels::cpu::varlen_attention_backward);
}

TORCH_LIBRARY_IMPL(fastvit_kernels, Autograd, m) {
  m.impl("varlen_attention_forward", &fastvit_kernels::cpu::varlen_attention_forward_autograd);
}
